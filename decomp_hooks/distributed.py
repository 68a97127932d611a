"""Data-parallel runs under torchrun: the process group from the environment, per-rank batches, metric reductions,
rank-0 gating, and the DDP / FSDP2 wrappers of a training step (docs/multi-gpu.md#how-the-work-is-split,
docs/multi-gpu.md#fsdp2).

Outside torchrun (no WORLD_SIZE > 1 in the environment) everything here is a no-op for one process.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from decomp_hooks.config import ConfigError
from decomp_hooks.data import CallableSource, row_share


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and local rank (one process per device)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a lone process (readable before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def current() -> Dist:
    """The running process group's rank and size, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (once) and pick this rank's device: `cuda:LOCAL_RANK` on GPUs."""
    if not launched():
        return current(), device
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run with one process (no torchrun / --nproc).")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                              "use --nproc_per_node ≤ the number of GPUs.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
    return current(), device


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then leave the process group, so no rank exits while its communication threads run."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(record: dict[str, Any], keep: tuple[str, ...] = ("step",)) -> dict[str, Any]:
    """Average the numeric entries of a metrics record over all ranks (one all_reduce); `keep` entries pass through."""
    if not current().enabled:
        return record
    keys = [k for k, v in record.items() if k not in keep and isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool)]
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return {**record, **dict(zip(keys, values.tolist()))}


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank passes True (e.g. a signal one of them received)."""
    if not current().enabled:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (small, picklable, exchanged between this run's own processes), in rank order."""
    if not current().enabled:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Copy rank 0's values of `params` to every rank (after per-rank work that must not drift, e.g. a warmup)."""
    if current().enabled:
        for p in params:
            dist.broadcast(p.data, src=0)


@torch.no_grad()
def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of `t` on every rank (in place; one tensor shared by all ranks, e.g. shared PGD sources)."""
    if current().enabled:
        dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def mean_(t: torch.Tensor) -> torch.Tensor:
    """`t` averaged over ranks, in place (gradients of a quantity that all ranks share)."""
    if current().enabled:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


@torch.no_grad()
def max_(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elementwise maximum over ranks, in place."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on all ranks), concatenated on dim 0 in rank order: the global batch's values."""
    if not current().enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def slice_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous share of a global batch (tensors and dicts/tuples of tensors, split on dim 0)."""
    return row_share(batch, rank, world_size, "processes")


@contextmanager
def gradient_sync(step: nn.Module | None, sync: bool) -> Iterator[None]:
    """Inside: a backward through a DDP- or FSDP2-wrapped step reduces gradients over the ranks only if `sync`, so
    micro-batches accumulate locally and the last one reduces the sum once. A no-op for a plain module."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if sync or step is None:
        yield
    elif isinstance(step, DistributedDataParallel):
        with step.no_sync():
            yield
    elif isinstance(step, FSDPModule):
        step.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            step.set_requires_gradient_sync(True)
    else:
        yield


class RankSource:
    """A data source seen by one rank: every rank draws the same global batch and keeps its slice, so the ranks
    together see exactly what one process would. A sampler callable instead draws `batch_size / W` rows from this
    rank's own RNG stream (seeded `seed·W + rank`), like streaming data sharded per rank."""

    def __init__(self, source: Any, ctx: Dist):
        self.source, self.ctx = source, ctx
        if isinstance(source, CallableSource):
            if source.batch_size % ctx.world_size:
                raise ConfigError(f"train.batch_size={source.batch_size} is the global batch and must divide evenly "
                                  f"over {ctx.world_size} processes; use a multiple of {ctx.world_size}.")
            source.batch_size //= ctx.world_size

    def next(self) -> Any:
        batch = self.source.next()
        if isinstance(self.source, CallableSource):
            return batch
        return slice_batch(batch, self.ctx.rank, self.ctx.world_size)

    def __getattr__(self, name: str) -> Any:  # state_dict, load_state_dict, check_enough
        return getattr(self.source, name)


def shard_source(source: Any, ctx: Dist) -> Any:
    return RankSource(source, ctx) if ctx.enabled else source


# -- wrapping a training step ---------------------------------------------------------------------------------


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over a whole step module. The frozen target gets no gradient buckets; its buffers
    are the same on every rank, so they are not re-broadcast each step; gradients live in the buckets (no copy)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)


def _blocks(target: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a target: the members of its ModuleLists (transformer layers), outermost first."""
    blocks: list[nn.Module] = []
    for m in target.modules():
        if isinstance(m, nn.ModuleList) and not any(m is b or any(m is x for x in b.modules()) for b in blocks):
            blocks.extend(m)
    return blocks


def fully_shard_step(step: nn.Module, cm: nn.Module) -> nn.Module:
    """FSDP2: each block of the frozen target, then the target's remaining parameters, then (as the root, with the
    step module) all components and CI functions are sharded over the ranks. The root group stays gathered from
    the start of a step to the end of its backward, because the losses read V and U directly (ΔW, CI inputs) and
    reuse them across several forwards; its gradients are reduce-scattered once, after the whole backward."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(cm.target):
        fully_shard(block)
    fully_shard(cm.target)
    root = fully_shard(step, reshard_after_forward=False)
    root._get_fsdp_state()._lazy_init()  # make `step` the root now, before any direct target forward (preflight, eval)
    return root


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank calls it), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After loading full optimizer state from a checkpoint, cut each state tensor to its parameter's FSDP2 shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, state in opt.state.items():
        if isinstance(p, DTensor):
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


@contextmanager
def gathered(root: nn.Module | None, whole: bool = False) -> Iterator[None]:
    """Inside: an FSDP2 root's own group (components and CI functions) holds full parameters, for code that runs
    outside the step (evaluation). `whole=True` (the final save) gathers the sharded target too and leaves
    everything gathered: saving hands the weights to numpy/safetensors, after which FSDP cannot free them.
    Every rank must enter it. A no-op for anything else."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    shards = [m for m in root.modules() if isinstance(m, FSDPModule)] if whole else [root]
    for m in shards:
        m.unshard()
    yield
    if not whole:
        root.reshard()
