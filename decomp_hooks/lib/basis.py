"""The linear algebra of one node layer's basis (docs/methods/lib.md#the-basis, steps 1–6), in float64.

Coordinates: a node activation `f [.., d]` is extended by a constant 1 as its last coordinate (index d). Isolated
coordinates (the constant, LayerNorm variances) are kept as their own directions and never rotated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decomp_hooks.activations import Moments

F64 = torch.float64


def with_constant(f: Tensor) -> Tensor:
    """The node activation `[.., d]` with the constant coordinate 1 appended: `[.., d + 1]`."""
    return torch.cat([f, torch.ones_like(f[..., :1])], -1)


def centred_gram(moments: Moments) -> Tensor:
    """`G = E[(f − μ̃)ᵀ(f − μ̃)]` with the constant coordinate appended (it stays 1, so `G[d, d] = 1`)."""
    cov = moments.covariance()
    d = cov.shape[0]
    g = torch.zeros(d + 1, d + 1, dtype=F64, device=cov.device)
    g[:d, :d] = (cov + cov.T) / 2
    g[d, d] = 1.0
    return g


@dataclass(frozen=True)
class Truncation:
    """Which eigenvalues count as zero: |λ| ≤ max(`absolute`, `relative` · the largest |λ|). A Gram of quantities
    computed with relative rounding ε (the model's dtype) cannot tell an eigenvalue below ~ε² · λ_max from 0, so
    `relative` is n · ε² for an n × n Gram (float32: 1.4e-14 per dimension); the absolute floor is the config's
    `truncation_threshold`."""

    absolute: float
    relative: float = 0.0

    @classmethod
    def for_dtype(cls, absolute: float, dtype: torch.dtype, n: int) -> Truncation:
        """The floor for n × n Grams of values computed in `dtype`."""
        return cls(absolute, n * torch.finfo(dtype).eps ** 2)

    def floor(self, magnitudes: Tensor) -> float:
        """The largest |λ| still dropped among these eigenvalue magnitudes."""
        top = float(magnitudes.max()) if magnitudes.numel() else 0.0
        return max(self.absolute, self.relative * top)


@dataclass
class LayerBasis:
    """One node layer's basis: `C [d+1, k]`, `C⁺ [k, d+1]` and the importance of each direction (Λ for LIB, the
    Gram eigenvalues for PCA); direction 0 is the constant."""

    C: Tensor
    C_pinv: Tensor
    eigenvalues: Tensor


def centering(mu: Tensor) -> tuple[Tensor, Tensor]:
    """`Y` with `x Y = x − μ̃` (the constant coordinate, last, untouched) and its inverse."""
    d = mu.shape[0]
    y = torch.eye(d + 1, dtype=F64, device=mu.device)
    y_inv = y.clone()
    y[d, :d], y_inv[d, :d] = -mu, mu
    return y, y_inv


def pca(gram: Tensor, isolated: list[int], truncation: Truncation) -> tuple[Tensor, Tensor, int]:
    """Eigenvectors `U [d+1, d′]` and eigenvalues `D [d′]` of the Gram with the `isolated` coordinates (constant first)
    as their own unit directions, the rest sorted by |eigenvalue| descending; those at or below the truncation floor
    dropped. Also returns how many leading columns are isolated directions."""
    n = gram.shape[0]
    rest = [i for i in range(n) if i not in set(isolated)]
    vals, vecs = torch.linalg.eigh(gram[rest][:, rest])
    vals = vals.abs()
    threshold = truncation.floor(vals)
    order = vals.argsort(descending=True)
    keep = order[vals[order] > threshold]
    u = torch.zeros(n, len(isolated) + len(keep), dtype=F64, device=gram.device)
    for col, i in enumerate(isolated):
        u[i, col] = 1.0
    u[rest, len(isolated):] = vecs[:, keep]
    d = torch.cat([gram.diagonal()[isolated].abs(), vals[keep]])
    iso_keep = [0] + [c for c in range(1, len(isolated)) if d[c] > threshold]
    cols = iso_keep + list(range(len(isolated), u.shape[1]))
    return u[:, cols], d[cols], len(iso_keep)


def pca_basis(gram: Tensor, mu: Tensor, isolated: list[int], truncation: Truncation) -> LayerBasis:
    """The PCA baseline: `C = Y U` (centred rotation, no whitening, no Λ), `C⁺ = Uᵀ Y⁻¹`."""
    u, d, _ = pca(gram, isolated, truncation)
    y, y_inv = centering(mu)
    return LayerBasis(y @ u, u.T @ y_inv, d)


def identity_basis(d: int, device: torch.device) -> LayerBasis:
    """The unrotated final layer: `f̂ = [1, f]` (constant first), so `C` is a permutation."""
    perm = torch.cat([torch.tensor([d]), torch.arange(d)]).to(device)
    c = torch.eye(d + 1, dtype=F64, device=device)[:, perm]
    return LayerBasis(c, c.T.clone(), torch.ones(d + 1, dtype=F64, device=device))


def whitening(gram: Tensor, mu: Tensor, isolated: list[int], truncation: Truncation
              ) -> tuple[Tensor, Tensor, int]:
    """`R = Y U D^{-1/2}` and `R⁺ = D^{1/2} Uᵀ Y⁻¹` (step 3), and the number of isolated directions kept."""
    u, d, n_iso = pca(gram, isolated, truncation)
    y, y_inv = centering(mu)
    r = y @ u / d.sqrt()
    r_pinv = d.sqrt()[:, None] * (u.T @ y_inv)
    return r, r_pinv, n_iso


def lib_basis(r: Tensor, r_pinv: Tensor, n_iso: int, jac_gram: Tensor, truncation: Truncation) -> LayerBasis:
    """Steps 5–6: rotate onto the eigenvectors of `M = R⁺ M′ R⁺ᵀ` (isolated directions unrotated), scale by
    |Λ|^{1/2} (the constant direction stays 1), sort by |Λ| with the constant first, drop |Λ| at or below the
    truncation floor."""
    m = r_pinv @ jac_gram @ r_pinv.T
    m = (m + m.T) / 2
    k = m.shape[0]
    lam_rest, v_rest = torch.linalg.eigh(m[n_iso:, n_iso:])
    v = torch.zeros(k, k, dtype=F64, device=m.device)
    v[:n_iso, :n_iso] = torch.eye(n_iso, dtype=F64, device=m.device)
    v[n_iso:, n_iso:] = v_rest
    lam = torch.cat([m.diagonal()[:n_iso], lam_rest]).abs()
    order = 1 + lam[1:].argsort(descending=True)
    order = torch.cat([order.new_zeros(1), order[lam[order] > truncation.floor(lam[1:])]])
    v, lam = v[:, order], lam[order]
    scale = lam.sqrt()
    scale[0] = 1.0
    c = r @ v * scale
    c_pinv = (v.T @ r_pinv) / scale[:, None]
    return LayerBasis(c, c_pinv, lam)
