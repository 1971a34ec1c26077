"""Local data that stays on its device: reading, tokenising and deterministic sampling.

Each device reads only its own file (plain text, or JSONL with a text field), tokenised
with the checkpoint's tokenizer (``tokenizer.json``) when there is one, else as bytes.

Sampling is a pure function of (seed, step, global sample index): sample g of step s
is the window starting at a position drawn from a generator seeded with
``(seed, s, g)``. So the global batch does not depend on the plan: when every device
holds the same file, every plan trains on exactly the same batch, which is what the
parity tests use. With different files, each device's samples come from its own file.

Targets: causal families (gpt, llama) predict the next token, so a window holds
``seq_len + 1`` tokens. BERT uses masked-language modelling with exactly
``max(1, round(mlm_fraction * seq_len))`` masked positions per sequence (always the
[MASK] token; the 80/10/10 replacement rule is left out), so the number of target
tokens of a step is known to every device without a collective.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgepool.errors import SpecError

IGNORE = -100


class ByteTokenizer:
    """UTF-8 bytes, plus four specials for BERT: [PAD] 256, [CLS] 257, [SEP] 258, [MASK] 259."""

    vocab_size = 260
    mask_token_id = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (no transformers)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        # A checkpoint's tokenizer.json may truncate and pad to its model length (MiniLM:
        # 128); a whole data file must be tokenised as it is.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = self._tok.get_vocab_size()
        mask = self._tok.token_to_id("[MASK]")
        self.mask_token_id = mask if mask is not None else 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


def load_tokenizer(pretrained: str | None):
    if pretrained is not None and (Path(pretrained) / "tokenizer.json").is_file():
        return HFTokenizer(Path(pretrained) / "tokenizer.json")
    return ByteTokenizer()


def read_text(path: str | Path, fmt: str | None = None, text_field: str = "text") -> str:
    """A data file's text: UTF-8 text as it is, or the ``text_field`` of every line of a
    JSONL file. A missing, unreadable or binary file (NUL bytes, not UTF-8) is a
    one-line ``SpecError``: nothing is trained on bytes that are not text."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"data file {str(p)!r} does not exist; each device needs its own local file (data.path / data.paths)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SpecError(f"data file {str(p)!r} cannot be read ({exc.strerror}); fix its permissions") from None
    if b"\0" in data:
        raise SpecError(f"data file {str(p)!r} holds NUL bytes at offset {data.index(0)}: it is binary, not text; "
                        "give a UTF-8 text or JSONL file")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"data file {str(p)!r} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                        "give a UTF-8 text or JSONL file") from None
    fmt = fmt or ("jsonl" if p.suffix in (".jsonl", ".json") else "text")
    if fmt == "text":
        return raw
    parts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise SpecError(f"{p}:{n}: not valid JSON; each line of a JSONL file must be one JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise SpecError(f"{p}:{n}: no text field {text_field!r}; set data.text_field to the field holding the text")
        parts.append(obj[text_field])
    return "\n".join(parts)


def check_file(path: str, *, seq_len: int, fmt: str | None, text_field: str, pretrained: str | None) -> np.ndarray:
    """A data file's tokens, or a one-line ``SpecError`` saying why it cannot be trained
    on (missing, unreadable, binary, bad JSONL, or shorter than one sample of
    ``seq_len + 1`` tokens). The launcher runs it before any process starts."""
    toks = _tokens(path, fmt, text_field, pretrained)
    if len(toks) < seq_len + 1:
        raise SpecError(f"data file {path!r} has {len(toks)} tokens, fewer than one sample (seq_len + 1 = "
                        f"{seq_len + 1}); give it more text or lower train.seq_len")
    return toks


@lru_cache(maxsize=8)
def _tokens(path: str, fmt: str | None, text_field: str, pretrained: str | None) -> np.ndarray:
    return np.asarray(load_tokenizer(pretrained).encode(read_text(path, fmt, text_field)), dtype=np.int64)


@dataclass(frozen=True)
class Sampler:
    """Draws samples of one device's local file."""

    path: str
    seq_len: int
    family: str
    seed: int
    mask_token_id: int
    mlm_fraction: float = 0.15
    fmt: str | None = None
    text_field: str = "text"
    pretrained: str | None = None

    def tokens(self) -> np.ndarray:
        return check_file(self.path, seq_len=self.seq_len, fmt=self.fmt, text_field=self.text_field,
                          pretrained=self.pretrained)

    @property
    def num_masked(self) -> int:
        return max(1, round(self.mlm_fraction * self.seq_len))

    def targets_per_sample(self) -> int:
        return self.num_masked if self.family == "bert" else self.seq_len

    def sample(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, targets) of global sample ``index`` of ``step``; targets use -100 to ignore."""
        toks = self.tokens()
        rng = np.random.default_rng([self.seed, step, index])
        start = int(rng.integers(0, len(toks) - self.seq_len))  # a window holds seq_len + 1 tokens
        window = toks[start : start + self.seq_len + 1]
        if self.family != "bert":
            return window[:-1].copy(), window[1:].copy()
        ids = window[:-1].copy()
        labels = np.full(self.seq_len, IGNORE, dtype=np.int64)
        pos = rng.choice(self.seq_len, size=self.num_masked, replace=False)
        labels[pos] = ids[pos]
        ids[pos] = self.mask_token_id
        return ids, labels

    def batch(self, step: int, indices: range) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.sample(step, g) for g in indices]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
