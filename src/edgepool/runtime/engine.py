"""One rank's part of a Plan: build its layers, run ``lower(plan)`` each step.

Composition order (fixed, as in torchtitan):

1. build only this stage's parts (blocks of its layer range; embed and head only on a
   data owner) at full size, seeded so they equal the same parts of a single-device
   model, and load the given state into them;
2. the stage's mode makes them this device's part (``Mode.apply`` of
   ``edgepool.modes``): tp slices each block to its heads and FFN columns
   (``models.tp``), sp gives each block its token slice of the sequence, fsdp shards
   every unit's parameters over the group (FSDP2 ``fully_shard``), dp keeps replicas;
3. replicas (dp, sp): their gradients are summed in the stage group once per step, in
   buckets launched during the last micro-batch's backward and waited for in the
   ``sync_grads`` op (``runtime.overlap.GradSync``, as DDP overlaps them);
4. the optimizer over the local parameters (an fsdp device's shards);
5. the pipeline schedule: the ops of ``sim.lower.lower_rank``, executed in order.

Precision (``precision``, the job's ``train.precision``): ``fp32`` computes in fp32 and
changes nothing. ``bf16``/``fp16`` run the embed, the blocks and the head under
``torch.autocast`` of the device type: parameters, gradients and optimizer state stay
fp32 (master weights; autocast casts weights per op), the loss is computed in fp32 on
``logits.float()``, and what crosses a stage boundary is cast back to the device dtype
(fp32; the wire dtype is a separate setting). Collectives *inside* a tp or sp group run
on what autocast produced (bf16/fp16 partial sums and K/V), so a split group rounds
differently from one device. ``fp16`` adds dynamic loss scaling over the whole pipeline
(``LossScaler``).

Compression on the wire (``wire``, the job's ``train.wire``; lossy, opt-in): the
boundary transfers go through the wire's codec (``runtime.compress.Codec``: fp16, bf16
or int8 activations and activation gradients), and a dp/sp group's gradient sync sums
PowerSGD factors (``runtime.compress.PowerSGD`` in ``GradSync``). The default sends and
sums everything whole, as without it. tp's partial sums of whole LoRA factors
(``_all_reduce_grads``) are exact sums of partial products, not replicas' gradients,
and are never compressed.

Gradient weighting: every loss is a sum over a device's own target tokens divided by
the number of target tokens in the whole global batch, so summing gradients over
micro-batches and over a group's replicas gives exactly the full-batch gradient, for
any (uneven) shares. Activations and their gradients cross stage boundaries as regions
of micro-batches (``specs.plan.boundary``); token ids and labels never leave the data
owner.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from edgepool import modes
from edgepool.data import IGNORE, Sampler
from edgepool.models.lora import Tuning, canonical
from edgepool.models.stage import StageModel, load_given
from edgepool.models.config import ModelConfig
from edgepool.models.parallel import ParallelCtx
from edgepool.runtime.compress import Codec, PowerSGD
from edgepool.runtime.device import CPU, TorchDevice
from edgepool.runtime.groups import StageGroups
from edgepool.errors import PeerError
from edgepool.machine import peak_rss_bytes
from edgepool.runtime.health import Heartbeat, blame
from edgepool.runtime.overlap import DEFAULT_BUCKET_BYTES, AllReduce, GradSync, grads_of, unit_of
from edgepool.runtime.wire import Wire
from edgepool.sim.lower import is_data_owner, lower_rank
from edgepool.specs.job import WireSpec
from edgepool.specs.layout import Layout
from edgepool.specs.plan import EMPTY, Plan, Region, Shape, role_of


# The compute dtype of each ``train.precision``: None computes in the device dtype.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaler:
    """Dynamic loss scaling for fp16 across a pipeline of ranks.

    torch's ``GradScaler`` assumes one process holds the loss and every parameter: it
    scales the loss, and its ``step`` unscales, checks and skips for the parameters
    *that process* holds. Here the loss lives on the data owners and the parameters on
    every stage, so each rank would decide on its own whether to skip, and one rank's
    overflow would let the others step (and the ranks' scales drift apart). This scaler
    splits the job instead:

    - the data owners multiply each micro-batch's loss by ``scale`` before its backward,
      so every gradient downstream (across boundaries, in every stage) is scaled by the
      same factor;
    - before the optimizer every rank unscales its own (already synchronised) gradients,
      checks them finite, and all-reduces an inf flag (MAX) over the WORLD, so every rank
      skips the same steps;
    - on an inf the scale halves (and the step is skipped); after ``growth_interval``
      good steps in a row it doubles (torch's defaults: 2**16, 2000).

    ``scale`` is a power of two, so scaling and unscaling are exact in fp32 unless a
    value overflows or underflows. Its state (``state``/``load``) travels with the
    optimizer scalars of ``Engine.pieces``, so checkpoints, resharding and in-memory
    recovery keep it (a rank that received no copy of it, as a new rank in a regrouped run
    may, learns it from ``sync``: an all-reduce at every engine's first step, on every
    rank).
    """

    KEY = "<loss-scale>"  # its entry among the optimizer scalars (no parameter has that name)

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale, self.growth_interval = float(init_scale), growth_interval
        self.good_steps = 0
        self.skipped: list[int] = []  # the steps skipped for an inf or NaN gradient
        self._known = True  # this rank knows the run's scale (not so for a rank given state without it)
        self.synced = False

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load(self, state: dict | None) -> None:
        self._known = state is not None
        if state is not None:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])

    def sync(self) -> None:
        """Collective over the world: every rank takes the scale the ranks that know it hold."""
        t = torch.tensor([self.scale, float(self.good_steps)] if self._known else [0.0, 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t[0] > 0:
            self.scale, self.good_steps = float(t[0]), int(t[1])
        self._known = self.synced = True

    def unscale_and_check(self, params) -> bool:
        """Collective over the world: unscale this rank's gradients; whether every
        rank's are finite (False: every rank skips this step)."""
        inv = 1.0 / self.scale
        bad = False
        for p in params:
            if p.grad is None:
                continue
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # an fsdp shard
            g.mul_(inv)
            bad = bad or not bool(torch.isfinite(g).all())
        flag = torch.tensor([float(bad)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())

    def update(self, ok: bool, step: int) -> None:
        if not ok:
            self.scale /= 2.0
            self.good_steps = 0
            self.skipped.append(step)
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0


@dataclass
class StepResult:
    loss: float  # the global loss of the step (same on every rank)
    step_time_s: float
    bytes_sent: int  # by this rank during the step
    peak_memory_bytes: int  # peak resident memory of this rank's process so far
    cpu_s: float  # CPU time of this rank's process during the step (all its threads)
    trace: list[tuple[str, float, float]] = field(default_factory=list)  # (op, start_s, end_s)
    skipped: bool = False  # fp16: the optimizer step was skipped (an inf or NaN gradient on some rank)


def _is_comm_failure(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return any(k in text for k in ("connection closed", "timed out", "timeout", "connection reset", "gloo"))


class Engine:
    def __init__(self, plan: Plan, cfg: ModelConfig, *, rank: int, sampler: Sampler | None, global_batch: int,
                 seq_len: int, groups: StageGroups, lr: float, optimizer: str = "adamw", weight_decay: float = 0.0,
                 seed: int = 0, timeout_s: float = 60.0, state_dict: dict[str, torch.Tensor] | None = None,
                 device: TorchDevice = CPU, heartbeat: Heartbeat | None = None, tuning: Tuning | None = None,
                 precision: str = "fp32", bucket_bytes: int = DEFAULT_BUCKET_BYTES, wire: WireSpec = WireSpec()):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        self.plan, self.cfg, self.rank, self.device = plan, cfg, rank, device
        self.precision, self.compute_dtype = precision, PRECISIONS[precision]
        self.scaler = LossScaler() if precision == "fp16" else None
        self.heartbeat, self.timeout_s = heartbeat, timeout_s
        self.role = role_of(plan, rank)
        self.shape = Shape(global_batch=global_batch, seq_len=seq_len, num_heads=cfg.num_heads, ffn=cfg.ffn,
                           num_kv_heads=cfg.num_kv_heads)
        self.layout = Layout.of(plan, self.shape)
        self.owner = is_data_owner(plan, rank)
        self.sampler = sampler
        if self.owner and sampler is None:
            raise ValueError("a data owner needs a sampler")
        self.ops = lower_rank(plan, rank)
        self.wire = Wire(rank, timeout_s, plan.devices, device=device, heartbeat=heartbeat,
                         codec=Codec(wire.activations, device))
        self.group = groups.of_stage(self.role.stage)
        s, i = self.role.stage, self.role.index
        self.region: Region = self.layout.regions[s][i]
        self.owner_region: Region = self.layout.owners[i] if s == 0 else EMPTY
        self.mb_size = global_batch // plan.num_microbatches
        self.num_targets = global_batch * (sampler.targets_per_sample() if sampler else 0)

        # 1. this stage's parts only, at full size, with the given state (full tensors);
        #    a mode that shards builds them one unit at a time in step 2 instead
        st = plan.stages[s]
        self.mode = modes.get(st.mode)
        deferred = self.group is not None and self.mode.builds_per_unit
        model = StageModel(cfg, st.layers, embed=self.owner, head=self.owner, seed=seed, deferred=deferred,
                           tuning=tuning)
        if not deferred:
            model = model.to(device.device, device.dtype)
            if state_dict is not None:
                load_given(model, state_dict)
        # 2. the stage's mode makes it this device's part (``edgepool.modes``): tp slices
        #    every block to its heads and FFN columns, sp gives every block its token
        #    slice, fsdp builds and shards unit by unit over the group (FSDP2); dp
        #    changes nothing
        ctx = ParallelCtx(wire=self.wire)
        self.shard_spec: dict[str, tuple[int, int, int]] = {}
        if self.group is not None:
            self.shard_spec = self.mode.apply(model, group=self.group, split=self.layout.splits[s], index=i, ctx=ctx,
                                              owner=self.owner, device=device, state=state_dict if deferred else None)
        for block in model.blocks.values():
            block.set_ctx(ctx)
        model.blocks.recompute = st.recompute
        self.model = model
        # 3. replicated parameters synchronised once per step (dp, sp); only what trains
        #    (``models.lora``: LoRA adapters, or all but the frozen); tp's whole adapter
        #    factors hold partial gradients, summed over the group before the optimizer
        #    summed in buckets while the last micro-batch's backward runs (``runtime.overlap``),
        #    in registration order (embed, blocks, head), which the buckets take in reverse
        synced = {id(p) for p in self.mode.sync_params(model, owner=self.owner)} if self.group is not None else set()
        named = [(n, p) for n, p in model.named_parameters() if id(p) in synced and p.requires_grad]
        self.sync_params = [p for _, p in named]
        compressor = PowerSGD(wire.rank, group=self.group, wire=self.wire, seed=seed) \
            if self.sync_params and wire.gradients == "powersgd" else None
        self.grad_sync = GradSync(self.sync_params, group=self.group, wire=self.wire, bucket_bytes=bucket_bytes,
                                  units=[unit_of(n) for n, _ in named], compressor=compressor) \
            if self.sync_params else None
        self.partial_params = self.mode.partial_grad_params(model) if self.group is not None else []
        self.trainable = {canonical(n) for n, p in model.named_parameters() if p.requires_grad}
        self.tuning = tuning
        # 4. optimizer, over what trains
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            self.optim = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
        else:
            self.optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        # 5. the boundaries this rank takes part in
        num_stages = len(plan.stages)
        self._fwd = dict(enumerate(self.layout.fwd))
        self._bwd = dict(enumerate(self.layout.bwd))
        self._tags = 2 * (num_stages + 1)
        self._state: dict[str, dict[int, object]] = {}

    # -- helpers -----------------------------------------------------------------------
    def _autocast(self):
        """Compute under autocast to the precision's dtype (nothing for fp32)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _tag(self, mb: int, k: int, grad: bool) -> int:
        return mb * self._tags + 2 * k + int(grad)

    def _send(self, tensor: torch.Tensor, have: Region, transfers, mb: int, k: int, grad: bool) -> None:
        hb, ht = have[0], have[2]
        for t in transfers:
            if t.src != self.rank:
                continue
            b0, b1, t0, t1 = t.region
            self.wire.send(tensor[b0 - hb : b1 - hb, t0 - ht : t1 - ht].detach().contiguous(), t.dst, self._tag(mb, k, grad))

    def _post_step(self) -> None:
        """Post every receive of the step at its start (``Wire.post``). The buffers are
        one boundary tensor per micro-batch, small next to a stage's kept activations."""
        S = len(self.plan.stages)
        k = self.role.stage
        wanted = {"recv_act": (self._fwd, k), "recv_grad": (self._bwd, k + 1), "head": (self._fwd, S),
                  "embed_bwd": (self._bwd, 0)}
        for op in self.ops:
            if op.kind not in wanted:
                continue
            table, b = wanted[op.kind]
            grad = table is self._bwd
            for t in table[b]:
                if t.dst == self.rank:
                    b0, b1, t0, t1 = t.region
                    self.wire.post((b1 - b0, t1 - t0, self.cfg.hidden), t.src, self._tag(op.mb, b, grad))

    def _recv(self, need: Region, transfers, mb: int, k: int, grad: bool) -> torch.Tensor:
        nb0, nb1, nt0, nt1 = need
        buf = self.device.zeros((nb1 - nb0, nt1 - nt0, self.cfg.hidden))
        for t in transfers:
            if t.dst != self.rank:
                continue
            b0, b1, t0, t1 = t.region
            what = f"{'gradients' if grad else 'activations'} of micro-batch {mb} across boundary {k}"
            piece = self.wire.recv((b1 - b0, t1 - t0, self.cfg.hidden), t.src, self._tag(mb, k, grad), what)
            buf[b0 - nb0 : b1 - nb0, t0 - nt0 : t1 - nt0] = piece
        return buf

    def _last_backward(self, kind: str, mb: int):
        """Around a backward op: the last micro-batch's arms the gradient sync's hooks."""
        if self.grad_sync is None or mb != self.plan.num_microbatches - 1:
            return contextlib.nullcontext()
        return self.grad_sync.armed(f"{kind}[{mb}]")

    def _put(self, key: str, mb: int, value) -> None:
        self._state.setdefault(key, {})[mb] = value

    def _pop(self, key: str, mb: int):
        return self._state[key].pop(mb)

    # -- ops (named after sim.lower's op kinds) ---------------------------------------
    def _op_embed(self, mb: int) -> None:
        b0, b1 = self.owner_region[0], self.owner_region[1]
        start = mb * self.mb_size
        ids, labels = self.sampler.batch(self._step, range(start + b0, start + b1))
        with self._autocast():
            e = self.model.embed(torch.from_numpy(ids))
        e = e.to(self.device.dtype)  # boundaries carry the device dtype (a no-op in fp32)
        self._put("embed", mb, e)
        self._put("labels", mb, torch.from_numpy(labels))
        self._send(e, self.owner_region, self._fwd[0], mb, 0, False)

    def _op_recv_act(self, mb: int) -> None:
        k = self.role.stage
        x = self._recv(self.region, self._fwd[k], mb, k, False).requires_grad_(True)
        self._put("x", mb, x)

    def _op_fwd(self, mb: int) -> None:
        x = self._state["x"][mb]
        with self._autocast():
            y = self.model.run_blocks(x)
        self._put("y", mb, y.to(self.device.dtype))

    def _op_send_act(self, mb: int) -> None:
        k = self.role.stage + 1
        self._send(self._state["y"][mb], self.region, self._fwd[k], mb, k, False)

    def _op_head(self, mb: int) -> None:
        k = len(self.plan.stages)
        h = self._recv(self.owner_region, self._fwd[k], mb, k, False).requires_grad_(True)
        with self._autocast():
            logits = self.model.head(h)
        labels = self._pop("labels", mb)
        # the loss in fp32 whatever the precision (``.float()`` is a no-op in fp32)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum") / self.num_targets
        with self._last_backward("head", mb):
            (loss * self.scaler.scale if self.scaler is not None else loss).backward()
        self._loss += loss.detach()
        self._send(h.grad, self.owner_region, self._bwd[k], mb, k, True)

    def _op_recv_grad(self, mb: int) -> None:
        k = self.role.stage + 1
        self._put("gy", mb, self._recv(self.region, self._bwd[k], mb, k, True))

    def _op_bwd(self, mb: int) -> None:
        y, gy = self._pop("y", mb), self._pop("gy", mb)
        with self._last_backward("bwd", mb):
            torch.autograd.backward(y, gy)

    def _op_send_grad(self, mb: int) -> None:
        k = self.role.stage
        x = self._pop("x", mb)
        self._send(x.grad, self.region, self._bwd[k], mb, k, True)

    def _op_embed_bwd(self, mb: int) -> None:
        g = self._recv(self.owner_region, self._bwd[0], mb, 0, True)
        e = self._pop("embed", mb)
        if e.requires_grad:  # a frozen embed (LoRA, ``train.freeze``) has nothing to learn
            with self._last_backward("embed_bwd", mb):
                e.backward(g)

    def _op_sync_grads(self, mb: int) -> None:
        # the buckets launched in the backward, then the rest; waits for all of them
        self.grad_sync.finish()

    def _all_reduce_grads(self, params: list) -> None:
        """Sum the gradients of ``params`` over the stage group (one flat all-reduce)."""
        AllReduce(grads_of(params), self.group, self.wire, dist.get_world_size(self.group)).exchange()

    def _op_optim(self, mb: int) -> None:
        if self.partial_params:
            self._all_reduce_grads(self.partial_params)
        if self.scaler is not None:
            ok = self.scaler.unscale_and_check(self.model.parameters())
            self.scaler.update(ok, self._step)
            if not ok:  # every rank skips this step (the flag was all-reduced)
                self._skipped = True
                self.optim.zero_grad(set_to_none=True)
                return
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)

    # -- one step ----------------------------------------------------------------------
    def step(self, step: int, *, trace: bool = False) -> StepResult:
        self._step = step
        self._loss = self.device.zeros(())
        self._skipped = False
        if self.scaler is not None and not self.scaler.synced:  # an engine's first step, on every rank
            self.scaler.sync()
        sent0 = self.wire.bytes_sent
        events: list[tuple[str, float, float]] = []
        t_start, cpu_start = time.perf_counter(), time.process_time()
        self.model.train()
        self._post_step()
        for op in self.ops:
            t0 = time.perf_counter()
            try:
                getattr(self, f"_op_{op.kind}")(op.mb)
            except RuntimeError as exc:
                # A collective inside the stage group (tp/sp/dp) lost a peer.
                if isinstance(exc, PeerError) or not _is_comm_failure(exc):
                    raise
                peers = [self.plan.devices[r] for r in self.role.group if r != self.rank] or ["-"]
                raise blame(self.heartbeat, self.plan.devices, self.rank, f"running {op} with its group "
                            f"({', '.join(peers)})", exc, timeout_s=self.timeout_s) from None
            if trace:
                events.append((str(op), t0 - t_start, time.perf_counter() - t_start))
        self.wire.flush()
        loss = self._loss.clone()
        try:
            dist.all_reduce(loss)  # the loss lives on the data owners; everyone learns the total
        except RuntimeError as exc:
            raise blame(self.heartbeat, self.plan.devices, self.rank, f"summing the loss of step {step}", exc,
                        timeout_s=self.timeout_s) from None
        return StepResult(
            loss=float(loss), step_time_s=time.perf_counter() - t_start, bytes_sent=self.wire.bytes_sent - sent0,
            peak_memory_bytes=peak_rss_bytes(), cpu_s=time.process_time() - cpu_start, trace=events,
            skipped=self._skipped,
        )

    # -- state in full-model coordinates ----------------------------------------------
    def _kept(self, name: str) -> bool:
        """Whether a tensor is part of the training state (``pieces``): all of them, or
        with ``tuning`` only those that train (the frozen rest never changes)."""
        return self.tuning is None or name in self.trainable

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's tensors in full-model names (shards where its mode shards;
        ``shard_spec`` says where each shard sits in the full tensor)."""
        return self.mode.local_state(self.model)

    def load_local_state(self, state: dict[str, torch.Tensor]) -> None:
        self.mode.load_local_state(self.model, state)

    def pieces(self) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """This rank's whole training state in full-model names (``runtime.reshard``):
        ``model/<name>`` and ``optim/<name>/<key>`` tensors (its shards where the mode
        shards; DTensor optimizer state as its local shard), and the optimizer's
        non-tensor state by parameter name."""
        out = {f"model/{k}": v.contiguous() for k, v in self.mode.local_state(self.model, keep=self._kept).items()}
        names = [canonical(n) for n, p in self.model.named_parameters() if p.requires_grad]
        scalars: dict[str, dict] = {}
        for idx, state in self.optim.state_dict()["state"].items():
            for key, val in state.items():
                if isinstance(val, torch.Tensor):
                    local = val.to_local() if hasattr(val, "to_local") else val
                    out[f"optim/{names[idx]}/{key}"] = local.detach().clone().contiguous()
                else:
                    scalars.setdefault(names[idx], {})[key] = val
        if self.scaler is not None:
            scalars[LossScaler.KEY] = self.scaler.state()
        return out, scalars

    def load_pieces(self, tensors: dict[str, torch.Tensor], scalars: dict[str, dict]) -> None:
        """Restore the state ``pieces`` returned, cut for this rank (``runtime.reshard.assemble``)."""
        own = [k for k in self.model.state_dict() if self._kept(k)]
        missing = [k for k in own if f"model/{k}" not in tensors]
        if missing:
            raise KeyError(f"the state is missing {len(missing)} of rank {self.rank}'s tensors, e.g. {missing[:3]}")
        if self.tuning is None:
            self.load_local_state({k: tensors[f"model/{k}"] for k in own})
        else:  # only what trains; the frozen rest is the run's initial state, already in place
            current = self.mode.local_state(self.model)
            self.load_local_state({k: tensors[f"model/{k}"] if k in own else v for k, v in current.items()})
        if self.scaler is not None:  # without it (state from a run in another precision) the first step syncs it
            self.scaler.load(scalars.get(LossScaler.KEY))
        params = {canonical(n): p for n, p in self.model.named_parameters() if p.requires_grad}
        index = {n: i for i, n in enumerate(params)}
        state: dict[int, dict] = {index[n]: dict(v) for n, v in scalars.items() if n in index}
        for key, t in tensors.items():
            if not key.startswith("optim/"):
                continue
            name, _, what = key[len("optim/"):].rpartition("/")
            p = params[name]
            if hasattr(p, "device_mesh") and t.dim() == p.dim():  # back to a DTensor laid out like its (FSDP2) shard
                from torch.distributed.tensor import DTensor

                t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False)
            state.setdefault(index[name], {})[what] = t
        self.optim.load_state_dict({"state": state, "param_groups": self.optim.state_dict()["param_groups"]})


def stitch(states: list[dict[str, torch.Tensor]], specs: list[dict[str, tuple[int, int, int]]]) -> dict[str, torch.Tensor]:
    """Full-model tensors from every rank's local state and shard spec."""
    full: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for state, spec in zip(states, specs):
        for name, t in state.items():
            if name in spec:
                dim, a, _ = spec[name]
                pieces.setdefault(name, []).append((dim, a, t))
            else:
                full.setdefault(name, t)
    for name, parts in pieces.items():
        parts.sort(key=lambda p: p[1])
        full[name] = torch.cat([t for _, _, t in parts], dim=parts[0][0])
    return full


def gather_full_state(engine: Engine) -> dict[str, torch.Tensor]:
    """The full model on every rank (all-gather of local states as safetensors bytes, and
    shard specs as JSON; small models only)."""
    from safetensors.torch import load, save

    from edgepool.runtime.health import Comm

    comm = Comm(engine.rank, engine.plan.devices, engine.heartbeat, engine.timeout_s)
    states = comm.gather_bytes(save({k: v.contiguous() for k, v in engine.local_state().items()}), "gathering the model")
    specs = comm.gather_json({k: list(v) for k, v in engine.shard_spec.items()}, "gathering shard specs")
    return stitch([load(b) for b in states], [{k: tuple(v) for k, v in sp.items()} for sp in specs])


