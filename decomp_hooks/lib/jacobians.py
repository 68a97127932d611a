"""Batched vector-Jacobian products of a section map: one forward, then `torch.func.vmap` over output directions.

The cotangents `φ` are one-hot over (output position, output dim), or ±1 random mixtures over output positions
(Hutchinson sources, docs/methods/lib.md#the-basis, step 4); they are processed in chunks sized to a memory budget.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

INTEGRATION_RULES = ("gradient", "trapezoidal", "gauss-legendre")


def integration_points(rule: str, n_intervals: int) -> tuple[list[float], list[float]]:
    """Points α and weights w of an integration rule on [0, 1] (docs/methods/lib.md#integration-rules)."""
    if rule == "gradient":
        if n_intervals != 0:
            raise ValueError(f"integration 'gradient' evaluates at α = 1 only; set n_intervals=0 (got {n_intervals}).")
        return [1.0], [1.0]
    if n_intervals < 0:
        raise ValueError(f"n_intervals={n_intervals}: must be ≥ 0.")
    if rule == "trapezoidal":
        if n_intervals == 0:
            return [0.5], [1.0]
        eps = 1e-3 / (n_intervals + 1)
        alphas = np.linspace(eps, 1 - eps, n_intervals + 1)
        weights = np.full(n_intervals + 1, 1.0 / n_intervals)
        weights[[0, -1]] /= 2
        return alphas.tolist(), weights.tolist()
    if rule == "gauss-legendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_intervals + 1)
        return ((nodes + 1) / 2).tolist(), (weights / 2).tolist()
    raise ValueError(f"integration={rule!r}; use one of {', '.join(INTEGRATION_RULES)}.")


class Directions:
    """Output directions φ over (position t, LIB dim i) of an output `[B, P, d]` whose LIB functions are `[f, 1] C`:
    one-hot over (t, i) when `n_sources` is None, else per source r and dim i the mixture `ε_{r,b,t} δ_i` with
    random signs ε ∈ {±1} over positions. Chunks are built on demand and pulled back through `C` to the raw output
    (the constant row drops out), so neither the full set nor the `@ C` backward is ever materialised."""

    def __init__(self, shape: torch.Size, c: Tensor, n_sources: int | None, generator: torch.Generator):
        self.b, self.p, _ = shape
        self.k = c.shape[1]
        self.ct = c[:-1].T  # [k, d]
        self.signs = None
        if n_sources is not None:
            signs = torch.randint(0, 2, (n_sources, self.b, self.p), generator=generator, device=generator.device)
            self.signs = (2 * signs - 1).to(c)
        self.n = (self.p if n_sources is None else n_sources) * self.k

    def __len__(self) -> int:
        return self.n

    def chunk(self, start: int, stop: int) -> Tensor:
        """Directions `start … stop−1` as raw-output cotangents `[stop − start, B, P, d]`; index n = (t or r)·k + i."""
        idx = torch.arange(start, stop, device=self.ct.device)
        outer, dim = idx // self.k, idx % self.k
        rows = self.ct[dim]  # [n, d]
        if self.signs is None:
            where = torch.nn.functional.one_hot(outer, self.p).to(rows)  # [n, P]
            return (where[:, None, :, None] * rows[:, None, None, :]).expand(-1, self.b, -1, -1)
        return self.signs[outer][..., None] * rows[:, None, None, :]


def chunk_size(n_phi: int, per_phi_bytes: int, budget_bytes: int) -> int:
    """How many output directions fit in one vmapped VJP under the budget (at least one)."""
    return max(1, min(n_phi, budget_bytes // max(per_phi_bytes, 1)))


def vjp_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, make: Callable[[torch.Size], Directions],
               budget_bytes: int, alphas: list[float], weights: list[float]) -> Iterator[Tensor]:
    """Yield `Σ_α w_α φ·∂fn(αx)/∂(αx)` `[chunk, *x.shape]` for the directions `make(out.shape)`, chunk by chunk; one
    forward per α, then the VJP vmapped over the chunk's directions."""
    outs, vjps = zip(*(torch.func.vjp(fn, a * x) for a in alphas))
    directions = make(outs[0].shape)
    batched = [torch.func.vmap(v) for v in vjps]
    elem = torch.finfo(x.dtype).bits // 8
    per_phi = elem * 4 * (x.numel() + outs[0].numel())  # gradient buffer + backward intermediates, roughly
    step = chunk_size(len(directions), per_phi, budget_bytes)
    for start in range(0, len(directions), step):
        phi = directions.chunk(start, min(start + step, len(directions)))
        total = None
        for w, vjp in zip(weights, batched):
            (g,) = vjp(phi)
            total = w * g if total is None else total + w * g
        yield total
