"""Fine-tuning a part of the model: LoRA adapters (``peft``) and frozen parameters.

``Tuning`` (from ``train.lora`` and ``train.freeze``) is applied to every unit as
``models.stage`` builds it, inside the unit's seeded RNG, so the adapters of a block are
the same numbers on every device and in every plan, as the block's weights are:

- **LoRA.** ``peft.inject_adapter_in_model`` wraps the block's target linears in peft's
  ``lora.Linear`` (``W x + scaling * B A dropout(x)``, ``B`` zero at the start); every
  other parameter is frozen. peft names the wrapped tensors ``q_proj.base_layer.weight``
  and ``q_proj.lora_A.default.weight``; state-dict hooks on each wrapped linear give them
  edgepool's full-model names (``q_proj.weight``, ``q_proj.lora_A.weight``), so
  checkpoints, resharding, pretrained weights and export see one naming whatever wraps
  the linear (``canonical`` does the same for ``named_parameters``).
- **freeze**: parameters whose full-model name matches a pattern (``fnmatch``) get no
  gradient.

Only trainable parameters get gradients, collectives (the engine's syncs) and optimizer
state, and only they are checkpointed: the frozen base comes from the run's initial
state (its pretrained folder, or the seed), which the checkpoint's identity names
(``RunSpec.identity``).

Tensor parallelism (``models.tp``) slices an adapter with its linear, by hand: peft has
no notion of a linear split over devices. A column-parallel linear (q, k, v, up, gate:
output rows sliced) keeps ``A`` whole and slices ``B``'s rows; a row-parallel one (o_proj,
down: input columns sliced) slices ``A``'s columns and keeps ``B`` whole, so its partial
products ``B A_i x_i`` are summed by the block's own all-reduce of the linear's output.
The whole factors' gradients are partial sums on each device (``tp_whole_factors``), which
the engine all-reduces over the group before the optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from edgepool.specs.job import LoraSpec

# A LoRA target's path inside a block (``models.layers.Block``).
TARGET_PATHS = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "o_proj": "attn.o_proj",
                "up": "mlp.up", "gate": "mlp.gate", "down": "mlp.down"}
ADAPTER = "default"  # peft's adapter name; never seen outside this module


def canonical(name: str) -> str:
    """A parameter's full-model name whatever wraps its linear: peft's
    ``x.base_layer.weight`` is ``x.weight``, ``x.lora_A.default.weight`` is ``x.lora_A.weight``."""
    return (("." + name).replace(".base_layer.", ".").replace(f".lora_A.{ADAPTER}.", ".lora_A.")
            .replace(f".lora_B.{ADAPTER}.", ".lora_B."))[1:]


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _ours_to_peft(local: str) -> str:
    if local.startswith(("lora_A.", "lora_B.")):
        factor, rest = local.split(".", 1)
        return f"{factor}.{ADAPTER}.{rest}"
    return f"base_layer.{local}"


def _save_hook(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + canonical(key[len(prefix):])] = state_dict.pop(key)


def _load_hook(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if "." not in local or (local.startswith(("lora_A.", "lora_B.")) and f".{ADAPTER}." not in local):
            state_dict[prefix + _ours_to_peft(local)] = state_dict.pop(key)


@dataclass(frozen=True)
class Tuning:
    """Which parameters train: LoRA adapters only, or all but the frozen patterns."""

    lora: "LoraSpec | None" = None
    freeze: tuple[str, ...] = ()

    @classmethod
    def of(cls, train) -> "Tuning | None":
        """From a job's ``TrainSpec``; None when every parameter trains."""
        if train.lora is None and not train.freeze:
            return None
        return cls(lora=train.lora, freeze=tuple(train.freeze))

    def trainable(self, name: str) -> bool:
        """Whether the full-model parameter ``name`` trains."""
        if self.lora is not None:
            return is_adapter(name)
        return not any(fnmatchcase(name, p) for p in self.freeze)

    def apply(self, unit: str, module: "nn.Module") -> None:
        """Adapt unit ``unit`` (``embed``, ``blocks.<i>``, ``head``) as it is built: LoRA
        adapters on a block's targets (drawn from the torch RNG the caller seeded), and
        each parameter's ``requires_grad``."""
        if self.lora is not None and unit.startswith("blocks."):
            from peft import LoraConfig, inject_adapter_in_model

            paths = [TARGET_PATHS[t] for t in self.lora.targets if _has(module, TARGET_PATHS[t])]
            cfg = LoraConfig(r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                             target_modules=paths, bias="none")
            inject_adapter_in_model(cfg, module, adapter_name=ADAPTER)
            for path in paths:
                wrapped = module.get_submodule(path)
                wrapped.register_state_dict_post_hook(_save_hook)
                wrapped.register_load_state_dict_pre_hook(_load_hook)
        for name, p in module.named_parameters():
            p.requires_grad_(self.trainable(f"{unit}.{canonical(name)}"))


def adapter_shapes(shapes: dict[str, tuple[int, ...]], rank: int, targets: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The adapters' full shapes (``A`` [rank, in], ``B`` [out, rank]) beside the
    model's, from the full shapes of the adapted linears' weights."""
    out = {}
    for key, shape in shapes.items():
        if key.startswith("blocks.") and key.endswith(".weight"):
            inner = key.split(".", 2)[2][: -len(".weight")]
            if any(inner == TARGET_PATHS[t] for t in targets):
                base = key[: -len(".weight")]
                out[f"{base}.lora_A.weight"] = (rank, shape[1])
                out[f"{base}.lora_B.weight"] = (shape[0], rank)
    return out


def tp_whole_factors(model: "nn.Module") -> list:
    """The adapter factors a tp device holds whole (column-parallel ``A``, row-parallel
    ``B``): their gradients are this device's partial sums, to be summed over the group."""
    from edgepool.modes.tp import _SLICED

    out = []
    for block in model.blocks.values():
        for path, (dim, _) in _SLICED.items():
            lin = block.get_submodule(path) if _has(block, path) else None
            if lin is None or not hasattr(lin, "lora_A"):  # not adapted
                continue
            factor = lin.lora_A[ADAPTER] if dim == 0 else lin.lora_B[ADAPTER]
            if factor.weight.requires_grad:
                out.append(factor.weight)
    return out


def _has(block, path: str) -> bool:
    parent, _, leaf = path.partition(".")
    return getattr(getattr(block, parent), leaf, None) is not None
