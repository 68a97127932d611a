"""Streaming activation passes over evaluation data: per site, causal importance and signed component activations.

`stream` runs the decomposition batch by batch (with a progress bar) and hands each batch's token ids and per-site
tensors to the caller, so statistics accumulate without holding activations for the whole data. `windows` makes a
second pass that reads back only the sequences holding the top examples, for their token contexts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from decomp_hooks.data import to_device
from decomp_hooks.export import neuronpedia as npd


class DashboardError(ValueError):
    """Dashboard or comparison input that cannot be used: no token ids, unknown sites or components, no batches."""


@dataclass
class SiteBatch:
    """One batch at one site: its input `x [N, d_in]`, causal importance and signed activations `[N, C]`."""

    x: torch.Tensor
    ci: torch.Tensor
    acts: torch.Tensor


def reiterable(data: Any) -> Any:
    """`data` itself when it can be iterated twice (tensor, list, TokenBatches), else its batches as a list."""
    if isinstance(data, (torch.Tensor, dict)) or (isinstance(data, Iterable) and iter(data) is not data):
        return data
    return list(data)


def stream(dec: Any, sites: list[str], data: Any, batch_size: int = 16, max_batches: int | None = None,
           desc: str = "activations", progress: bool = True) -> Iterator[tuple[torch.Tensor, dict[str, SiteBatch]]]:
    """Yield `(token ids [b, seq], {site: SiteBatch})` per batch of token ids; refuses batches that are not token ids."""
    total = max_batches
    if total is None and isinstance(data, torch.Tensor):
        total = -(-data.shape[0] // batch_size)
    seq_len = None
    bar = tqdm(npd.batches(data, batch_size, max_batches), total=total, desc=desc, unit="batch", disable=not progress)
    for batch in bar:
        ids = npd.token_ids(batch)
        if ids is None:
            raise DashboardError("dashboards show token contexts, so the data must be token ids [batch, seq] "
                                 f"(an integer tensor); got {type(batch).__name__}.")
        if seq_len not in (None, ids.shape[1]):
            raise DashboardError(f"batches have sequence lengths {seq_len} and {ids.shape[1]}; use one context length.")
        seq_len = ids.shape[1]
        yield ids.cpu(), site_batches(dec, sites, to_device(ids, dec.device))


@torch.no_grad()
def site_batches(dec: Any, sites: list[str], batch: torch.Tensor) -> dict[str, SiteBatch]:
    """One forward of the target: each site's input, causal importance and signed activations, flattened over positions."""
    _, inputs = dec.cm(batch, cache=True)
    ci = dec.cm.causal_importances({n: inputs[n] for n in sites})
    out = {}
    for n in sites:
        comps = dec.cm.component(n)
        x = inputs[n]
        out[n] = SiteBatch(x.reshape(-1, x.shape[-1]).float(), ci[n].lower.reshape(-1, comps.C).float(),
                           comps.inner_acts(x).reshape(-1, comps.C).float())
    return out


Contexts = dict[tuple[int, int], tuple[list[int], list[list[float]], int]]  # (i, pos) -> ids, values per tensor, index
Reader = Callable[[torch.Tensor], dict[str, list[torch.Tensor]]]


def site_reader(dec: Any, sites: list[str]) -> Reader:
    """A reader for `windows`: per site, causal importance and signed activations `[N, C]`."""
    def read(ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        got = site_batches(dec, sites, to_device(ids, dec.device))
        return {n: [b.ci, b.acts] for n, b in got.items()}
    return read


def windows(read: Reader, data: Any, wanted: dict[str, list[tuple[int, int]]], batch_size: int,
            max_batches: int | None = None, progress: bool = True) -> dict[str, Contexts]:
    """Token windows around the wanted `(index, flattened position)` pairs per key: token ids and, for each tensor
    `read(ids)[key]` returns (`[N, K]` over the batch's flattened positions), its values over the window."""
    by_seq: dict[int, list[tuple[str, int, int]]] = {}
    seq_len = None
    result: dict[str, Contexts] = {k: {} for k in wanted}
    offset = 0
    bar = tqdm(npd.batches(data, batch_size, max_batches), desc="contexts", unit="batch", disable=not progress)
    for batch in bar:
        ids = npd.token_ids(batch)
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
                _, start, stop, q = npd.window(pos, seq_len)
                lo = j * seq_len
                result[key][i, pos] = (ids[r, start:stop].tolist(),
                                       [t[lo + start:lo + stop, i].tolist() for t in got[key]], q)
    return result
