"""Look at components the way one looks at SAE features, and put the two side by side.

    from decomp_hooks.dashboard import build_dashboards, compare_with_sae
    build_dashboards(dec, tokens, "dash/")                 # one self-contained HTML page per site + Neuronpedia JSON
    result = compare_with_sae(dec, "blocks.0.mlp.W_out", "saes/mlp0", tokens, out="cmp/")

Both stream over the data (memory does not grow with it) and show progress bars. `--engine sae-dashboard` in the
CLI renders components exported as ±-split transcoders with sae-dashboard's `SaeVisRunner` instead
(`decomp_hooks.dashboard.sae_dashboard`).
"""
from __future__ import annotations

from decomp_hooks.dashboard.build import DashboardConfig, DashboardError, build_dashboards
from decomp_hooks.dashboard.compare import CompareConfig, Comparison, compare_with_sae

__all__ = ["CompareConfig", "Comparison", "DashboardConfig", "DashboardError", "build_dashboards", "compare_with_sae"]
