"""Batches from whatever the user holds: a sampler callable, a tensor, a dict batch, or an iterable/DataLoader.

Training draws from a source (`make_source`) that records its position (`state_dict`), so a resumed run continues
where it stopped. Every finite pass over data (exports, dashboards, comparisons, LIB) reads `iter_batches`.
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


def batch_rows(batch: Any) -> int:
    """Rows (dim 0) of a tensor batch, or of a dict or tuple batch's first tensor."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) \
        else batch
    return first.shape[0]


def draw(sampler: Callable[[int], Any], n: int) -> Any:
    """`sampler(n)`, refused unless it holds the `n` rows asked for: more or fewer would silently change the batch
    size (and the loss normalisation) of every step."""
    batch = sampler(n)
    try:
        got = batch_rows(batch)
    except (AttributeError, IndexError, StopIteration, TypeError):
        raise DataError(f"the sampler returned a {type(batch).__name__} for sample({n}); return a tensor (or a dict "
                        f"of tensors) of {n} rows (dim 0).") from None
    if got != n:
        raise DataError(f"the sampler returned {got} rows when asked for {n} (sample({n})); return exactly n rows "
                        "(dim 0) for sample(n).")
    return batch


def row_share(batch: Any, index: int, parts: int, what: str = "parts") -> Any:
    """The `index`-th of `parts` equal contiguous shares of a batch's rows (tensors and dicts/tuples of tensors,
    split on dim 0); `what` names the parts in the error when the rows do not divide evenly."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        if n % parts:
            raise DataError(f"a batch of {n} rows cannot be split evenly into {parts} {what}; use a batch size "
                            f"divisible by {parts}.")
        share = n // parts
        return batch[index * share:(index + 1) * share]
    if isinstance(batch, dict):
        return {k: row_share(v, index, parts, what) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(row_share(v, index, parts, what) for v in batch)
    return batch


def split_rows(batch: Any, parts: int) -> list[Any]:
    """A batch as `parts` equal micro-batches of consecutive rows (the batch itself when `parts` is 1)."""
    return [batch] if parts == 1 else [row_share(batch, i, parts, "micro-batches") for i in range(parts)]


def iter_batches(data: Any, batch_size: int, max_batches: int | None = None, device: torch.device | None = None,
                 *, n_samples: int | None = None) -> Iterator[Any]:
    """Batches from a tensor (its rows split by `batch_size`), a dict (one batch), an iterable of batches, or a
    sampler `fn(n) -> batch` (which needs `n_samples`): at most `max_batches` batches and `n_samples` rows (an
    iterable's last batch is kept whole), moved to `device` when given."""
    for i, batch in enumerate(_batches(data, batch_size, n_samples)):
        if max_batches is not None and i >= max_batches:
            return
        yield batch if device is None else to_device(batch, device)


def _batches(data: Any, batch_size: int, n_samples: int | None) -> Iterator[Any]:
    """The batches of `data` before the batch limit and device (see `iter_batches`)."""
    if isinstance(data, torch.Tensor):
        yield from (data[:n_samples] if n_samples else data).split(batch_size)
    elif isinstance(data, dict):
        yield data
    elif callable(data) and not hasattr(data, "__iter__"):
        if not n_samples:
            raise DataError("a sampler callable yields batches without end; draw a finite sample first (e.g. "
                            "sampler(4096)) or, where the call takes one, pass n_samples (how many rows to draw).")
        for start in range(0, n_samples, batch_size):
            yield draw(data, min(batch_size, n_samples - start))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        seen = 0
        for batch in data:
            yield batch
            seen += batch_rows(batch) if n_samples else 0
            if n_samples and seen >= n_samples:
                return
    else:
        raise DataError(f"cannot read batches from a {type(data).__name__}; pass a tensor, a dict batch, an iterable "
                        "of batches or a sampler callable.")


def batch_count(data: Any, batch_size: int, max_batches: int | None = None) -> int | None:
    """How many batches `iter_batches` yields, where that is known without reading them (for progress bars)."""
    known = -(-data.shape[0] // batch_size) if isinstance(data, torch.Tensor) else 1 if isinstance(data, dict) else None
    if known is None or max_batches is None:
        return max_batches if known is None else known
    return min(known, max_batches)


def reiterable(data: Any) -> Any:
    """`data` itself when it can be read twice (a tensor, dict, list, TokenBatches) or is no iterable at all, else
    its batches as a list (a one-shot iterator)."""
    if not isinstance(data, Iterable) or isinstance(data, (torch.Tensor, dict)) or iter(data) is not data:
        return data
    return list(data)


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
        return draw(self.fn, self.batch_size)

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
