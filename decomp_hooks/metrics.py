"""Evaluation metrics (docs/toys.md#metrics): CI-L0, MMCS/ML2R, CI-pattern errors, component norms, KL/CE/MSE.

Layouts: a site's components are ``V`` [d_in, C] and ``U`` [C, d_out]; the target weight ``W`` is [d_out, d_in];
causal importances ``ci`` are [..., C]. All functions are pure and never modify their inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

HUNGARIAN_MAX_DIM = 500
_EPS = 1e-12


def ci_l0(ci: Tensor, threshold: float) -> float:
    """Mean over positions (all leading dims) of how many components have CI above ``threshold``."""
    return (ci > threshold).sum(-1).double().mean().item()


def mmcs_ml2r(V: Tensor, U: Tensor, W: Tensor, group_size: int = 1) -> tuple[float, float]:
    """Mean max cosine similarity and mean L2 ratio of the best component per feature column ``W[:, j]``, among the
    non-negligible components (`non_negligible`): a dead component of norm ~0 that happens to point along a feature
    must not stand in for the component that carries it.

    Component c's contribution to column j is ``V[j, c] * U[c, :]``; it is never materialised: its dot product with
    ``W[:, j]`` is ``V[j, c] * (U @ W)[c, j]`` and its norm ``|V[j, c]| * ||U[c]||``. With ``group_size`` g > 1
    (APD), each run of g consecutive columns is one rank-g component, compared as a whole:
    ``Σ_k V[j, cg+k] U[cg+k, :]``.
    """
    V, U, W = V.detach().double(), U.detach().double(), W.detach().double()
    if group_size > 1:
        C = V.shape[1] // group_size
        contrib = torch.einsum("jck,cko->jco", V.reshape(V.shape[0], C, group_size), U.reshape(C, group_size, -1))
        dots = torch.einsum("jco,oj->jc", contrib, W)  # [d_in, C]
        contrib_norms = contrib.norm(dim=-1)  # [d_in, C]
    else:
        dots = V * (U @ W).T  # [d_in, C]
        contrib_norms = V.abs() * U.norm(dim=1)  # [d_in, C]
    w_norms = W.norm(dim=0)  # [d_in]
    cos = dots / (contrib_norms * w_norms[:, None]).clamp_min(_EPS)
    live = non_negligible(V, U, group_size=group_size)
    best_cos, best_c = cos.masked_fill(~live, -math.inf).max(dim=1) if live.any() else cos.max(dim=1)
    ratio = contrib_norms.gather(1, best_c[:, None]).squeeze(1) / w_norms.clamp_min(_EPS)
    return best_cos.mean().item(), ratio.mean().item()


def _match_hungarian(scores: np.ndarray) -> np.ndarray:
    """Optimal row -> column assignment maximising the summed scores (rows <= columns)."""
    _, cols = linear_sum_assignment(scores, maximize=True)
    return cols


def _match_greedy(scores: np.ndarray) -> np.ndarray:
    """Rows, most confident first, each take their best still-free column (rows <= columns); O(rows * columns)."""
    free = np.ones(scores.shape[1], dtype=bool)
    cols = np.empty(scores.shape[0], dtype=np.int64)
    for row in np.argsort(-scores.max(axis=1), kind="stable"):
        col = int(np.argmax(np.where(free, scores[row], -np.inf)))
        cols[row], free[col] = col, False
    return cols


def permute_to_identity(ci: Tensor) -> Tensor:
    """Column order of ``ci`` [n, C] placing each row's matched column on the diagonal, then the rest by mass.

    The matching maximises total CI (Hungarian when min(n, C) < 500, else greedy); unmatched columns follow in
    descending column mass. Returns a permutation of all C column indices (int64, on ``ci``'s device).
    """
    n, C = ci.shape
    m = min(n, C)
    scores = ci[:m].detach().double().cpu().numpy()
    matcher = _match_hungarian if m < HUNGARIAN_MAX_DIM else _match_greedy
    matched = torch.as_tensor(matcher(scores), dtype=torch.long, device=ci.device)
    unmatched = torch.ones(C, dtype=torch.bool, device=ci.device)
    unmatched[matched] = False
    rest = unmatched.nonzero().squeeze(1)
    mass = ci.detach().sum(0)[rest]
    rest = rest[torch.argsort(mass, descending=True, stable=True)]
    return torch.cat([matched, rest])


def identity_ci_error(ci: Tensor, tol: float = 0.1) -> int:
    """Entries of the identity-permuted ``ci`` [n, C] breaking the one-component-per-feature pattern; 0 = perfect.

    Counts off-diagonal entries > ``tol`` plus diagonal entries < 1 - ``tol``.
    """
    permuted = ci[:, permute_to_identity(ci)]
    diag = torch.eye(*ci.shape, dtype=torch.bool, device=ci.device)
    return int(((permuted > tol) & ~diag).sum() + ((permuted < 1 - tol) & diag).sum())


def dense_ci_error(ci: Tensor, k: int, tol: float = 0.1) -> int:
    """Entries of ``ci`` [n, C] breaking "k columns on, all others off" as docs/toys.md#metrics (and SPD main)
    define it.

    Columns ranked by mass; each of the first k needs at least one probe with CI >= 1 - ``tol`` (one error per column
    without), every other column must stay <= ``tol`` on every probe (one error per entry above). 0 = perfect.
    """
    on, off = _split_by_mass(ci, k)
    return int(((on >= 1 - tol).sum(0) == 0).sum() + (off > tol).sum())


def dense_always_on_error(ci: Tensor, k: int, tol: float = 0.1) -> int:
    """The stricter reading of the dense pattern ("CI >= 0.9 on every probe"; docs/toys.md#metrics,
    docs/results.md#always-on-or-not): entries of the k heaviest columns below 1 - ``tol``, plus entries of the other
    columns above ``tol``. 0 = k always-on columns."""
    on, off = _split_by_mass(ci, k)
    return int((on < 1 - tol).sum() + (off > tol).sum())


def columns_by_mass(ci: Tensor) -> Tensor:
    """Column indices of ``ci`` [n, C], largest total CI first: the dense pattern's ranking of components."""
    return torch.argsort(ci.detach().sum(0), descending=True)


def _split_by_mass(ci: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k columns of ``ci`` with the largest total CI, and the rest."""
    mass_order = columns_by_mass(ci)
    return ci[:, mass_order[:k]], ci[:, mass_order[k:]]


def one_hot_probes(n_features: int, value: float = 0.75, device: torch.device | str | None = None) -> Tensor:
    """The CI probe batch ``value * e_i``, i = 1..n_features, as an [n, n] matrix."""
    return value * torch.eye(n_features, device=device)


def norms(V: Tensor, U: Tensor, group_size: int = 1) -> Tensor:
    """Per-component norm ``||V[:, c]|| * ||U[c, :]||`` (the Frobenius norm of the rank-one matrix), shape [C].

    With ``group_size`` g > 1, the Frobenius norm of each rank-g component ``V_c U_c`` (shape [C // g])."""
    V, U = V.detach(), U.detach()
    if group_size == 1:
        return V.norm(dim=0) * U.norm(dim=1)
    C = V.shape[1] // group_size
    Vg, Ug = V.reshape(V.shape[0], C, group_size), U.reshape(C, group_size, -1)
    gram = torch.einsum("ick,icl->ckl", Vg, Vg) * torch.einsum("cko,clo->ckl", Ug, Ug)  # ||V_c U_c||_F^2 = tr(VᵀV UUᵀ)
    return gram.sum((1, 2)).clamp_min(0).sqrt()


def non_negligible(V: Tensor, U: Tensor, rel: float = 0.05, group_size: int = 1) -> Tensor:
    """Which components have norm >= ``rel`` times the site's largest (all-zero components never count), `[C]`."""
    component_norms = norms(V, U, group_size)
    return (component_norms >= rel * component_norms.max()) & (component_norms > 0)


def n_non_negligible(V: Tensor, U: Tensor, rel: float = 0.05, group_size: int = 1) -> int:
    """How many components are non-negligible (`non_negligible`)."""
    return int(non_negligible(V, U, rel, group_size).sum())


def kl_logits(pred_logits: Tensor, target_logits: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(pred)) summed over the last dim and averaged over all leading dims (fp32)."""
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    log_q = F.log_softmax(pred_logits.float(), dim=-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1).mean()


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Sum of squared errors divided by the number of elements."""
    return (pred.float() - target.float()).pow(2).mean()


def ce_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of ``logits`` [..., T, V] against ``tokens`` [..., T] (logits at t predict t + 1)."""
    return F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), tokens[..., 1:].flatten())


def mechanism_counts(scores: Tensor, rel: float = 0.1) -> dict[str, int]:
    """From one-hot probe attributions `[n_features, C]`: `split_features`, features with more than one component
    attributed ≥ `rel` × that feature's largest; `shared_components`, features whose top component is also another
    feature's (n_features − distinct top components); `dead_features`, features with no attribution at all."""
    top = scores.max(-1)
    live = top.values > 0
    split = ((scores >= rel * top.values[:, None]) & live[:, None]).sum(-1) > 1
    distinct = len(set(top.indices[live].tolist()))
    return {"split_features": int(split.sum()), "shared_components": int(live.sum()) - distinct,
            "dead_features": int((~live).sum())}
