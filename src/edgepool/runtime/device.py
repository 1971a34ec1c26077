"""Where a rank's tensors live and in what type: the one place that says so.

``TorchDevice`` names the torch device, the dtype of parameters, activations and the
buffers the wire receives into, and the process-group backend that can move them.
The engine, the wire, the groups and the modes take it as an argument and never name a
device or a dtype themselves, so a CUDA path (NCCL, bf16) is a new ``TorchDevice``, not a
change to the modes. Only the CPU (gloo, fp32) is built and tested today: NCCL would need
every rank of a group to hold CUDA tensors (``docs/runtime.md``).
``dtype`` is the storage dtype (master weights, boundaries); the compute precision of
``train.precision`` is the engine's autocast over it, not a different ``TorchDevice``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TorchDevice:
    type: str = "cpu"  # torch device type, also the DeviceMesh's
    dtype: torch.dtype = torch.float32
    backend: str = "gloo"

    @property
    def device(self) -> torch.device:
        return torch.device(self.type)

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)


CPU = TorchDevice()
