"""Reading spec files (YAML or JSON) into pydantic models with one-line errors.

Every failure, a missing file, bad YAML or a wrong field, becomes a ``SpecError`` whose
message is a single line naming the file, the field and the fix. Nothing here imports
torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgepool.errors import SpecError

M = TypeVar("M", bound=BaseModel)


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Load a YAML/JSON file that must hold a mapping."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{what} file {str(p)!r} does not exist; check the path (see examples/ for working files)")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first}); fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: the {what} file must be a mapping of fields, got {type(data).__name__}")
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
