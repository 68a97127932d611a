"""Faithfulness: the components must sum to the target weights, Σ_l ‖W_l − (V_l U_l)ᵀ‖²_F / Σ_l numel(W_l)."""
from __future__ import annotations

from decomp_hooks.methods.spd.terms.base import Term

TERMS = {"faithfulness": Term(lambda spd, ctx, lc, frac: ctx.cm.faithfulness(ctx.delta_ws), needs_delta=True)}
