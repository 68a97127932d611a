"""Sums across ranks: under torchrun every accumulator (Grams, Jacobian Grams, edges) adds up all ranks' data."""
from __future__ import annotations

import torch
from torch import Tensor


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(t: Tensor) -> Tensor:
    """`t` summed over ranks in place (a no-op outside a process group); returns it."""
    if is_distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def total(x: float, device: torch.device) -> float:
    """A Python number summed over ranks."""
    return all_reduce_sum(torch.tensor([x], dtype=torch.float64, device=device)).item() if is_distributed() else x
