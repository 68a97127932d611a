"""Look at components the way one looks at SAE features, and put the two side by side.

    from decomp_hooks.dashboard import build_dashboards, compare_with_sae
    build_dashboards(dec, tokens, "dash/")                 # one self-contained HTML page per site + Neuronpedia JSON
    result = compare_with_sae(dec, "blocks.0.mlp.W_out", "saes/mlp0", tokens, out="cmp/")

Both stream over the data (memory does not grow with it) and show progress bars. `--engine sae-dashboard` in the
CLI renders components exported as ±-split transcoders with sae-dashboard's `SaeVisRunner` instead
(`decomp_hooks.dashboard.sae_dashboard`).
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module defining it, imported on first use so that the statistics module (which the harvest
#: uses) does not pull in jinja2, the optional `dashboard` extra the pages need
_EXPORTS = {"DashboardConfig": "build", "DashboardError": "build", "build_dashboards": "build",
            "CompareConfig": "compare", "Comparison": "compare", "compare_with_sae": "compare"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
