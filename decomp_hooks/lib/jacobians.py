"""Batched vector-Jacobian products of a section map: one forward, then `torch.func.vmap` over output directions.

The cotangents `φ` are one-hot over (output position, output dim), or ±1 random mixtures over output positions
(Hutchinson sources, methods.md 3.2 step 4); they are processed in chunks sized to a memory budget.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

INTEGRATION_RULES = ("gradient", "trapezoidal", "gauss-legendre")


def integration_points(rule: str, n_intervals: int) -> tuple[list[float], list[float]]:
    """Points α and weights w of an integration rule on [0, 1] (methods.md 3.4)."""
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


def cotangents(shape: tuple[int, int, int], n_sources: int | None, generator: torch.Generator | None,
               device: torch.device, dtype: torch.dtype) -> Tensor:
    """Output directions `[n_φ, B, P_out, k]`: one-hot over (t, i) when `n_sources` is None, else per source r and
    output dim i the mixture `ε_{r,b,t} δ_{i,·}` with random signs ε ∈ {±1} over positions."""
    b, p, k = shape
    if n_sources is None:
        eye = torch.eye(p * k, device=device, dtype=dtype).view(p * k, 1, p, k)
        return eye.expand(p * k, b, p, k)
    signs = torch.randint(0, 2, (n_sources, b, p), generator=generator, device=generator.device if generator else "cpu")
    signs = (2 * signs - 1).to(device=device, dtype=dtype)
    eye = torch.eye(k, device=device, dtype=dtype)
    return torch.einsum("rbp,ik->ribpk", signs, eye).reshape(n_sources * k, b, p, k)


def chunk_size(n_phi: int, per_phi_bytes: int, budget_bytes: int) -> int:
    """How many output directions fit in one vmapped VJP under the budget (at least one)."""
    return max(1, min(n_phi, budget_bytes // max(per_phi_bytes, 1)))


def vjp_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, make_phis: Callable[[torch.Size], Tensor],
               budget_bytes: int, alphas: list[float], weights: list[float]) -> Iterator[Tensor]:
    """Yield `Σ_α w_α φ·∂fn(αx)/∂(αx)` `[chunk, *x.shape]` for the directions `make_phis(out.shape)` `[n_φ, *out.shape]`,
    chunk by chunk; one forward per α, then the VJP vmapped over the chunk's directions."""
    outs, vjps = zip(*(torch.func.vjp(fn, a * x) for a in alphas))
    phis = make_phis(outs[0].shape)
    batched = [torch.func.vmap(v) for v in vjps]
    elem = torch.finfo(x.dtype).bits // 8
    per_phi = elem * 4 * (x.numel() + phis[0].numel())  # gradient buffer + backward intermediates, roughly
    step = chunk_size(phis.shape[0], per_phi, budget_bytes)
    for start in range(0, phis.shape[0], step):
        phi = phis[start:start + step]
        total = None
        for w, vjp in zip(weights, batched):
            (g,) = vjp(phi)
            total = w * g if total is None else total + w * g
        yield total
