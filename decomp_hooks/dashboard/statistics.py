"""Streaming per-component statistics for dashboards: firing, CI and signed-activation histograms, co-activation.

Everything is accumulated batch by batch in fixed-size tensors, so memory does not grow with the data. A component
fires at a position when its causal importance exceeds the decomposition's `ci_alive_threshold` τ (as in CI-L0 and
the exported `sparsity.safetensors`). The CI histogram, firing counts and top examples come from the exporter's
`FeatureStats`; this module adds what a dashboard shows beside them.
"""
from __future__ import annotations

import torch

from decomp_hooks.export.neuronpedia import FeatureStats

SIGNED_BINS = 16  # magnitude bins per sign


class SignedHistogram:
    """Histogram of each component's signed activation at its firing positions, on a range that doubles as needed.

    Per component, `SIGNED_BINS` bins of width R/SIGNED_BINS cover |a| ∈ [0, R) on each sign. When a batch holds a
    larger |a|, R doubles (repeatedly) and the existing counts merge pairwise, so one pass suffices."""

    def __init__(self, C: int):
        self.counts = torch.zeros(C, 2, SIGNED_BINS, dtype=torch.float64)
        self.range = torch.zeros(C, dtype=torch.float64)

    def update(self, acts: torch.Tensor, fire: torch.Tensor) -> None:
        """Add activations `[N, C]` where `fire [N, C]` is true."""
        a = acts.double()
        peak = (a.abs() * fire).amax(0)
        empty = self.range == 0
        self.range[empty] = peak[empty]
        grow = torch.where(self.range > 0, (peak / self.range.clamp_min(1e-30)).log2().ceil().clamp_min(0), 0).long()
        if grow.any():
            self._rescale(grow)
        width = (self.range / SIGNED_BINS).clamp_min(1e-30)
        bins = (a.abs() / width).floor().clamp(0, SIGNED_BINS - 1).long()
        side = (a < 0).long()
        C = a.shape[1]
        flat = (torch.arange(C) * 2 * SIGNED_BINS + side * SIGNED_BINS + bins)[fire]
        self.counts.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))

    def _rescale(self, grow: torch.Tensor) -> None:
        """Double the range `grow[c]` times: old bin j of component c lands in bin j >> grow[c]."""
        C = self.counts.shape[0]
        j = torch.arange(SIGNED_BINS)
        target = j[None, :] >> grow.clamp_max(62)[:, None]  # [C, B]
        index = (torch.arange(C)[:, None, None] * 2 * SIGNED_BINS + torch.arange(2)[None, :, None] * SIGNED_BINS
                 + target[:, None, :])
        merged = torch.zeros_like(self.counts).view(-1)
        merged.index_add_(0, index.reshape(-1), self.counts.reshape(-1))
        self.counts = merged.view_as(self.counts)
        self.range = self.range * torch.pow(2.0, grow.double())

    def bins(self, c: int) -> tuple[list[float], list[float], float]:
        """(bin centres from −R to R, counts, bin width) of component c."""
        width = float(self.range[c]) / SIGNED_BINS
        centres = [-(b + 0.5) * width for b in reversed(range(SIGNED_BINS))] + [(b + 0.5) * width for b in range(SIGNED_BINS)]
        counts = self.counts[c, 1].flip(0).tolist() + self.counts[c, 0].tolist()
        return centres, counts, width


def add_cofiring(coactive: torch.Tensor, fire: torch.Tensor) -> None:
    """Add a batch's co-firing counts `fireᵀ fire` (`fire [N, C]` booleans) to `coactive [C, C]` in place. Sparse
    firing (a mean of at most √C firing components per row) is counted pair by pair, far cheaper than the dense
    product it equals; denser firing takes one float32 product (exact: each count is at most N < 2²⁴)."""
    per_row = fire.sum(1)
    pairs = int((per_row * per_row).sum())
    C = fire.shape[1]
    if pairs > fire.numel():
        f = fire.float()
        coactive += (f.T @ f).to(coactive.dtype)
        return
    rows, cols = fire.nonzero(as_tuple=True)
    partners = per_row[rows]  # each firing entry pairs with every firing entry of its row, itself included
    row_start = (torch.cumsum(per_row, 0) - per_row)[rows]
    first = cols.repeat_interleave(partners)
    step = torch.arange(pairs) - (torch.cumsum(partners, 0) - partners).repeat_interleave(partners)
    second = cols[row_start.repeat_interleave(partners) + step]
    coactive.view(-1).index_add_(0, first * C + second, torch.ones(pairs, dtype=coactive.dtype))


class ComponentStats:
    """One site's dashboard statistics: `features` (FeatureStats over causal importance: firing, CI histogram, and the
    top examples ranked by |CI-gated activation| g·|a|), `signed` (SignedHistogram), `coactive` (co-firing `[C, C]`)."""

    def __init__(self, C: int, threshold: float, n_examples: int):
        self.C, self.threshold = C, float(threshold)
        self.features = FeatureStats(C, split=False, threshold=threshold, n_examples=n_examples, ranked=True)
        self.signed = SignedHistogram(C)
        self.coactive = torch.zeros(C, C, dtype=torch.float64)

    def update(self, ci: torch.Tensor, acts: torch.Tensor, first_position: int = 0) -> None:
        """Add one batch of causal importances and signed activations (`[..., C]` each)."""
        ci, acts = ci.detach().float().cpu().reshape(-1, self.C), acts.detach().float().cpu().reshape(-1, self.C)
        self.features.update(ci, acts, first_position, rank=(ci * acts).abs())
        fire = ci > self.threshold
        self.signed.update(acts, fire)
        add_cofiring(self.coactive, fire)

    @property
    def positions(self) -> int:
        return self.features.positions

    def frequency(self) -> torch.Tensor:
        """Firing frequency per component `[C]`."""
        return self.features.frequency()

    def live(self) -> list[int]:
        """Components that fired at least once."""
        return torch.nonzero(self.features.fires > 0).flatten().tolist()

    def most_coactive(self, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Per component, the `k` others with the highest Jaccard index of firing, `(indices [C, k], jaccard [C, k])`."""
        n = self.features.fires
        union = n[:, None] + n[None, :] - self.coactive
        jac = torch.where(union > 0, self.coactive / union.clamp_min(1), 0.0)
        jac.fill_diagonal_(-1.0)
        k = min(k, max(self.C - 1, 0))
        values, index = jac.topk(k, dim=1)
        return index, values.clamp_min(0).float()
