"""edgepool: train big Transformer models on a pool of trusted edge devices.

Vocabulary (used the same way everywhere in the code and docs):

- *device*: a physical participant of a pool (a Jetson board, a laptop, ...).
- *rank*: one process of a run; edgepool runs exactly one rank per device.
- *stage*: a contiguous range of Transformer blocks, one pipeline stage.
- *group*: the devices that serve one stage together, in one intra-stage mode
  (``dp``, ``tp`` or ``sp``).
- *replica*: a full copy of a stage's parameters (``dp`` and ``sp`` groups).
- *shard*: a part of a stage's parameters (``tp`` groups).
- *micro-batch*: one slice of the global batch that flows through the pipeline.
- *step*: one optimizer update over the global batch.

Importing this package is cheap: it never imports torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
