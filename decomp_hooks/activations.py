"""The streaming activation pass shared by exports, dashboards and comparisons, and the running moments LIB shares.

batches (`decomp_hooks.data.iter_batches`) -> each site's input (`dec.cm(batch, cache=True)`) -> its causal
importance and signed component activations (`SiteBatch`) -> running statistics (`Moments` here; the feature
statistics of exports and dashboards). `stream` yields one `PassBatch` at a time, so memory does not grow with the
data. `windows` is the second pass: it reads back only the sequences that hold wanted positions, for their token
contexts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from decomp_hooks.data import to_device
from decomp_hooks.progress import progress_bar

WINDOW_LEFT, WINDOW_RIGHT = 24, 8  # tokens shown before and after a wanted position


@dataclass
class SiteBatch:
    """One batch at one site, flattened over positions: its input `[N, d_in]` (token ids `[N]` for an embedding),
    the causal importance `[N, C]` and the signed component activations `a V` `[N, C]`."""

    inputs: torch.Tensor
    ci: torch.Tensor
    acts: torch.Tensor


@dataclass
class PassBatch:
    """One batch of the pass: its token ids `[batch, seq]` on the CPU (None unless the batch is token ids), the
    flattened index of its first position in the whole pass, and `SiteBatch` per site."""

    tokens: torch.Tensor | None
    first: int
    sites: dict[str, SiteBatch]


def token_ids(batch: Any) -> torch.Tensor | None:
    """The batch's token ids `[batch, seq]` when it is a 2-d integer tensor, else None."""
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point() and batch.dim() == 2:
        return batch
    return None


@torch.no_grad()
def site_batches(dec: Any, sites: list[str], batch: Any) -> dict[str, SiteBatch]:
    """One forward of the target on `batch` (already on `dec.device`): each site's `SiteBatch`."""
    _, inputs = dec.cm(batch, cache=True)
    ci = dec.method.importances(dec.cm, batch, inputs)  # every site's input: a global CI function reads them all
    out = {}
    for n in sites:
        comps, x = dec.cm.component(n), inputs[n]
        flat = x.reshape(-1) if comps.kind.reads_tokens else x.reshape(-1, x.shape[-1]).float()
        acts = comps.inner_acts(x).reshape(-1, comps.C).float()
        out[n] = SiteBatch(flat, ci[n].reshape(-1, comps.C).float(), acts)
    return out


def stream(dec: Any, sites: list[str], batches: Iterable[Any], *, total: int | None = None,
           desc: str = "activations", progress: bool = True) -> Iterator[PassBatch]:
    """The pass: one `PassBatch` per batch of `batches` (on the CPU; each is moved to `dec.device`), with a
    progress bar of `total` batches."""
    first = 0
    for batch in progress_bar(batches, total=total, desc=desc, unit="batch", disable=not progress):
        got = site_batches(dec, sites, to_device(batch, dec.device))
        ids = token_ids(batch)
        yield PassBatch(None if ids is None else ids.cpu(), first, got)
        first += next(iter(got.values())).ci.shape[0]


Contexts = dict[tuple[int, int], tuple[list[int], list[list[float]], int]]  # (i, pos) -> ids, values per tensor, index
Reader = Callable[[torch.Tensor], dict[str, list[torch.Tensor]]]


def window(position: int, seq_len: int) -> tuple[int, int, int, int]:
    """(sequence, start, stop, index of the position inside the window) for a flattened position."""
    seq, pos = divmod(position, seq_len)
    start, stop = max(0, pos - WINDOW_LEFT), min(seq_len, pos + WINDOW_RIGHT + 1)
    return seq, start, stop, pos - start


def windows(read: Reader, batches: Iterable[torch.Tensor], wanted: dict[str, list[tuple[int, int]]],
            progress: bool = True) -> dict[str, Contexts]:
    """Token windows around the wanted `(index, flattened position)` pairs per key, over the same token-id batches
    as the first pass: token ids and, for each tensor `read(ids)[key]` returns (`[N, K]` over the flattened
    positions of the rows read), its values over the window. Only rows holding a wanted position are read."""
    by_seq: dict[int, list[tuple[str, int, int]]] = {}
    seq_len = None
    result: dict[str, Contexts] = {k: {} for k in wanted}
    offset = 0
    for ids in progress_bar(batches, desc="contexts", unit="batch", disable=not progress):
        if seq_len is None:
            seq_len = ids.shape[1]
            for key, pairs in wanted.items():
                for i, pos in pairs:
                    by_seq.setdefault(pos // seq_len, []).append((key, i, pos))
        first = offset // seq_len
        if first > max(by_seq, default=-1):
            break
        rows = [r for r in range(ids.shape[0]) if first + r in by_seq]
        offset += ids.numel()
        if not rows:
            continue
        got = read(ids[rows])
        for j, r in enumerate(rows):
            for key, i, pos in by_seq[first + r]:
                _, start, stop, q = window(pos, seq_len)
                lo = j * seq_len
                result[key][i, pos] = (ids[r, start:stop].tolist(),
                                       [t[lo + start:lo + stop, i].tolist() for t in got[key]], q)
    return result


class Moments:
    """Running float64 sums over rows of `x [.., A]`, and optionally of paired rows `y [.., B]`: the count, means,
    per-coordinate second moments and the cross moment `Σ xᵀy` (`Σ xᵀx` without y, LIB's Gram). Streams: memory is
    fixed, and `sums()` can be all-reduced across ranks."""

    def __init__(self, A: int, B: int | None = None, device: torch.device | str | None = None):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0.0
        self.paired = B is not None
        self.sum_x, self.sq_x = zeros(A), zeros(A)
        self.sum_y, self.sq_y = (zeros(B), zeros(B)) if self.paired else (self.sum_x, self.sq_x)
        self.cross = zeros(A, B if self.paired else A)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add rows (leading dimensions flattened); `y` is required exactly when the moments are paired."""
        if (y is not None) != self.paired:
            raise ValueError(f"these Moments are {'paired' if self.paired else 'unpaired'}: call update(x"
                             f"{', y' if self.paired else ''}).")
        x = x.reshape(-1, x.shape[-1]).to(self.cross)
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sq_x += (x * x).sum(0)
        if self.paired:
            y = y.reshape(-1, y.shape[-1]).to(self.cross)
            self.sum_y += y.sum(0)
            self.sq_y += (y * y).sum(0)
        self.cross += x.T @ (y if self.paired else x)

    def sums(self) -> list[torch.Tensor]:
        """The accumulators (each once), for a sum across ranks; `n` is summed separately."""
        return [self.sum_x, self.sq_x, self.cross] + ([self.sum_y, self.sq_y] if self.paired else [])

    def mean(self) -> torch.Tensor:
        """The mean of x `[A]`."""
        return self.sum_x / self.n

    def covariance(self) -> torch.Tensor:
        """`E[xᵀy] − E[x]ᵀE[y]` `[A, B]` (the covariance of x without y)."""
        n = max(self.n, 1)
        return self.cross / n - torch.outer(self.sum_x / n, self.sum_y / n)

    def corr(self) -> torch.Tensor:
        """Pearson correlation `[A, B]` in float32 (0 where either side is constant)."""
        n = max(self.n, 1)
        vx = (self.sq_x / n - (self.sum_x / n) ** 2).clamp_min(0)
        vy = (self.sq_y / n - (self.sum_y / n) ** 2).clamp_min(0)
        denom = torch.outer(vx, vy).sqrt()
        return torch.where(denom > 1e-20, self.covariance() / denom.clamp_min(1e-30), 0.0).float()
