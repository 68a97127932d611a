"""SPD's loss terms as configured: `losses:` in a config is a list of these."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LossConfig:
    """One loss term. `type` picks it; the remaining fields apply to the types named in their comments."""

    type: str
    coeff: float = 1.0
    # importance_minimality
    pnorm: float = 2.0
    p_anneal_start_frac: float = 1.0
    p_anneal_final_p: float | None = None
    p_anneal_end_frac: float = 1.0
    eps: float = 1e-12
    beta: float = 0.0
    beta_anneal_start_frac: float = 1.0
    beta_anneal_final: float | None = None
    beta_anneal_end_frac: float = 1.0
    gamma: float | None = None  # smooth-L0 width (null: the p-norm)
    gamma_anneal_start_frac: float = 1.0
    gamma_anneal_final: float | None = None
    gamma_anneal_end_frac: float = 1.0
    # the minimality terms, stochastic_recon_layerwise and ci_masked_recon_layerwise
    site_coeffs: dict[str, float] = field(default_factory=dict)  # fnmatch glob -> multiplier on those sites (others 1)
    # *_subset terms
    routing: str = "uniform_k_subset"
    routing_p: float = 0.5
    # pgd_* terms
    init: str = "random"
    step_size: float = 1.0
    n_steps: int = 1
    mask_scope: str = "shared_across_batch"
