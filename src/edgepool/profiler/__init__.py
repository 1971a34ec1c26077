"""Measured profiles: per-layer time and memory on this host, and link speed with gloo.

``measure_profile(cfg)`` times one Transformer block, the embedding, the head and the
optimizer step on this host (one thread, as every rank runs) at several batch and
sequence shapes, and fits

    time(tokens, ctx) = fixed + tokens * a + tokens * ctx * q

by least squares (``tokens`` = batch x sequence, ``ctx`` = the sequence attended to).
``q`` is the attention's quadratic part. The linear part ``a`` is split between the
cost model's parts (``rep``, ``head``, ``ffn``) in proportion to their analytic FLOPs
(``cost.profile.block_flops``): the total is measured, the split between parts is
modelled. Activation memory kept for backward is measured by summing the bytes of the
tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``) and fitted the
same way. The optimizer's time per parameter byte is timed on one block's parameters.

The result is a ``cost.profile.ModelProfile`` with ``source: measured`` whose
reference device is this host's CPU (catalog kind ``host-cpu``): the cost model scales
it to any catalog device by speed ratio (see ``cost.profile``), and the testbed's CPU
caps give the ratio for emulated devices. Profiles are cached as JSON keyed by model,
host and shape.

``measure_link(...)`` runs a gloo ping-pong between two ranks for latency and
bandwidth.
"""
