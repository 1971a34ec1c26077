"""Reading spec files (YAML or JSON) into pydantic models with one-line errors.

Every failure, a missing file, bad YAML or a wrong field, becomes a ``SpecError`` whose
message is a single line naming the file, the field and the fix. Nothing here imports
torch.

A spec file is small and plain, so what reading one may cost is bounded before
pydantic sees it:

- at most ``MAX_FILE_BYTES`` bytes;
- a key given twice in one mapping is an error (YAML and JSON would keep the last);
- at most ``MAX_DEPTH`` levels of nesting, and at most ``MAX_NODES`` values counted
  with YAML aliases expanded (a "billion laughs" file is refused, not expanded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgepool.errors import SpecError

M = TypeVar("M", bound=BaseModel)

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 100_000


class _Duplicate(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                fresh = key not in seen
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                break
            if not fresh:
                raise _Duplicate(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(f"key {k!r} is given twice; keep one")
        out[k] = v
    return out


def _measure(data: Any, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH or more than MAX_NODES values (aliases
    counted each time they are used), without expanding anything."""
    seen: dict[int, tuple[int, int]] = {}  # id -> (values, levels below)
    too_deep = SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep; a spec file is flat, fix its structure")

    def walk(x: Any, depth: int) -> tuple[int, int]:
        if not isinstance(x, (dict, list)):
            return 1, 0
        if id(x) in seen:
            n, below = seen[id(x)]
        else:
            if depth > MAX_DEPTH:
                raise too_deep
            seen[id(x)] = (MAX_NODES + 1, 0)  # a cycle (a recursive YAML alias) counts as too big
            n, below = 1, 0
            for k in (x.values() if isinstance(x, dict) else x):
                kn, kb = walk(k, depth + 1)
                n, below = n + kn, max(below, kb + 1)
                if n > MAX_NODES:
                    break
            seen[id(x)] = (n, below)
        if depth + below > MAX_DEPTH:
            raise too_deep
        return n, below

    if walk(data, 1)[0] > MAX_NODES:
        raise SpecError(f"{source}: holds more than {MAX_NODES} values (YAML aliases counted where used); "
                        "a spec file is small, fix its structure")


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Load a YAML/JSON file that must hold a mapping."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{what} file {str(p)!r} does not exist; check the path (see examples/ for working files)")
    lang = "JSON" if p.suffix == ".json" else "YAML"
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SpecError(f"{p}: {size} bytes, more than a {what} file's limit of {MAX_FILE_BYTES}; "
                            "is it the right file?")
        text = p.read_bytes().decode("utf-8")
        if p.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _Duplicate as exc:
        raise SpecError(f"{p}: {exc}") from None
    except RecursionError:
        raise SpecError(f"{p}: nested too deeply to read; a spec file is flat, fix its structure") from None
    except OSError as exc:
        raise SpecError(f"{what} file {str(p)!r} cannot be read ({exc.strerror}); check its permissions") from None
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{p}: not valid {lang} ({first}); fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: the {what} file must be a mapping of fields, got {type(data).__name__}")
    _measure(data, str(p))
    return data


def validation_message(exc: ValidationError, source: str) -> str:
    """One line for the first error of a pydantic ValidationError."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] == "missing":
        msg = "required field is missing; add it"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    extra = ""
    if err["type"] not in ("missing", "value_error") and not isinstance(got, (dict, list)):
        extra = f" (got {got!r})"
    more = len(exc.errors()) - 1
    tail = f" [and {more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {loc or '<top>'}: {msg}{extra}{tail}"


def parse(model: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(exc, source)) from None


def load(model: type[M], path: str | Path, what: str) -> M:
    return parse(model, read_mapping(path, what), str(path))
