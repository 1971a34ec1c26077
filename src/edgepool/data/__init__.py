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
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"data file {str(p)!r} does not exist; each device needs its own local file (data.path / data.paths)")
    fmt = fmt or ("jsonl" if p.suffix in (".jsonl", ".json") else "text")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if fmt == "text":
        return raw
    parts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise SpecError(f"{p}:{n}: not valid JSON; each line of a JSONL file must be one JSON object") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise SpecError(f"{p}:{n}: no field {text_field!r}; set data.text_field to the field holding the text")
        parts.append(str(obj[text_field]))
    return "\n".join(parts)


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
        toks = _tokens(self.path, self.fmt, self.text_field, self.pretrained)
        if len(toks) < self.seq_len + 2:
            raise SpecError(
                f"data file {self.path!r} has {len(toks)} tokens, fewer than seq_len + 2 = {self.seq_len + 2}; "
                "give it more text or lower train.seq_len"
            )
        return toks

    @property
    def num_masked(self) -> int:
        return max(1, round(self.mlm_fraction * self.seq_len))

    def targets_per_sample(self) -> int:
        return self.num_masked if self.family == "bert" else self.seq_len

    def sample(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, targets) of global sample ``index`` of ``step``; targets use -100 to ignore."""
        toks = self.tokens()
        rng = np.random.default_rng([self.seed, step, index])
        start = int(rng.integers(0, len(toks) - self.seq_len - 1))
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
