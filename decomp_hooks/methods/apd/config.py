"""APD's own config section, `apd:`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class APDConfig:
    """APD: C components spanning every site, each of rank `rank` per site (None = full rank,
    min(d_in, d_out)), chosen per input by the top-k of their attributions; the loss coefficients (docs/methods/apd.md)."""

    C: int | None = None  # None: the (common) C of `targets`
    rank: int | None = None
    topk: float = 1.0  # batch top-k: mean active components per position (may be fractional); else k per position
    batch_topk: bool = True
    attribution_type: str = "gradient"  # gradient | ablation | activation
    attribution_model: str = "target"  # gradient attributions at the target's parameters, or at the APD model's
    attribution_chunk: int | None = None  # output directions per batched VJP (None: all in one call)
    schatten_p: float = 1.0
    param_match_coeff: float = 1.0
    topk_recon_coeff: float = 1.0
    act_recon_coeff: float = 0.0
    schatten_coeff: float = 1.0
    act_recon_sites: list[str] = field(default_factory=lambda: ["*mlp_in"])  # fnmatch globs; outputs ReLU'd
    unit_norm_matrices: bool = False
    init_scale: float = 1.0
    distil_from_target: bool = False  # the last component is always on and outside the top-k
