"""Hidden-activation reconstruction: Σ_l ‖a_l(masked) − a_l(target)‖² / Σ_l numel(a_l) over the sites' inputs,
under stochastic masks."""
from __future__ import annotations

import torch

from decomp_hooks.methods.spd.terms.base import Term


def _term(spd, ctx, lc, frac) -> torch.Tensor:
    masks = spd.masks(ctx, "stochastic", {n: None for n in ctx.ci})
    _, masked_inputs = ctx.cm(ctx.batch, masks=masks, cache=True, delta_ws=ctx.delta_ws, reuse=ctx.reuse)
    names = [n for n, x in ctx.inputs.items() if x.is_floating_point()]
    sq = sum((masked_inputs[n].float() - ctx.inputs[n].float()).pow(2).sum() for n in names)
    return sq / max(sum(ctx.inputs[n].numel() for n in names), 1)


TERMS = {"stochastic_hidden_acts_recon": Term(_term)}
