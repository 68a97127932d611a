"""Batches from whatever the user holds: a sampler callable, a tensor, or an iterable/DataLoader.

Each source records its position (`state_dict`) so a resumed run continues where it stopped.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


class DataError(ValueError):
    """Data that cannot feed a run: empty, exhausted, non-finite or of the wrong kind."""


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors of a dict/tuple batch, to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def check_finite(batch: Any, step: int) -> None:
    """Refuse NaN/Inf in floating-point inputs before they reach a loss."""
    tensors = batch.values() if isinstance(batch, dict) else [batch]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"input batch at step {step} contains NaN or Inf; clean the data before decomposing.")


class CallableSource:
    """`sample(batch_size) -> batch`: synthetic toys; its randomness is the global RNG, saved with checkpoints."""

    def __init__(self, fn: Callable[[int], Any], batch_size: int):
        self.fn, self.batch_size = fn, batch_size

    def next(self) -> Any:
        return self.fn(self.batch_size)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TensorSource:
    """Shuffled batches of rows of a tensor, one permutation per epoch drawn from (seed, epoch)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        if data.shape[0] == 0:
            raise DataError("the data tensor is empty; pass at least one row.")
        self.data, self.batch_size, self.seed = data, min(batch_size, data.shape[0]), seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.data.shape[0], generator=g)

    def next(self) -> torch.Tensor:
        if self.index + self.batch_size > self.data.shape[0]:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        rows = self._perm[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return self.data[rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._perm = self._permutation()


class IterableSource:
    """Batches from an iterable; re-iterable data (lists, DataLoaders) starts a new epoch, a one-shot iterator may not run out."""

    def __init__(self, data: Iterable):
        self.data = data
        self.one_shot = iter(data) is data
        self.epoch, self.index = 0, 0
        self._it: Iterator = iter(data)

    def next(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            if self.one_shot:
                raise DataError(f"the data iterator ran out after {self.index} batches; pass a re-iterable "
                                "(list, DataLoader) or more data than train.steps batches.") from None
            if self.index == 0:
                raise DataError("the data iterable yields no batches; it is empty.") from None
            self.epoch, self.index = self.epoch + 1, 0
            self._it = iter(self.data)
            batch = next(self._it)
        self.index += 1
        return batch

    def check_enough(self, needed: int) -> None:
        """Refuse up front a one-shot iterator that says it holds fewer batches than the run will draw."""
        hint = operator.length_hint(self.data)
        if self.one_shot and 0 < hint < needed:
            raise DataError(f"the data iterator holds {hint} batches but the run draws {needed} (train.steps plus "
                            "evaluation batches); pass more data, a re-iterable (list, DataLoader) or fewer steps.")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Skip to the saved position (re-iterating the data; a one-shot iterator continues where it is)."""
        if not self.one_shot:
            self._it = iter(self.data)
            for _ in range(state["index"]):
                next(self._it)
        self.epoch, self.index = state["epoch"], state["index"]


def make_source(data: Any, batch_size: int, seed: int = 0) -> CallableSource | TensorSource | IterableSource:
    """Pick the source for `data`: a callable sampler, a tensor of rows, or an iterable of batches."""
    if isinstance(data, torch.Tensor):
        return TensorSource(data, batch_size, seed)
    if callable(data) and not hasattr(data, "__iter__"):
        return CallableSource(data, batch_size)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        return IterableSource(data)
    raise DataError(f"cannot draw batches from a {type(data).__name__}; pass a tensor, a callable "
                    "sample(batch_size) -> batch, or an iterable/DataLoader of batches.")
