"""The runtime: executes a Plan on torch.distributed (gloo on CPU).

Why not ``torch.distributed.pipelining`` for the pipeline schedule: its stages are one
rank each and pass whole micro-batches between neighbours. edgepool's plans pass
*regions* of micro-batches between groups of different sizes and modes (a dp group of
two feeding a tp group of three, per-device shares, data owners that embed and take the
loss on their own samples). So the schedule is ours (``sim.lower``), executed with
torch.distributed point-to-point and collective calls; process groups, timeouts and
collectives are torch's.
"""
