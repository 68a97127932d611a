"""Reconstruction of the target output with masked components: one of three mask kinds (stochastic, CI-masked,
unmasked) under one of three routings (all sites, one site at a time, a random subset per position)."""
from __future__ import annotations

import torch

from decomp_hooks.methods.spd.terms.base import Term

#: loss type -> (mask kind, routing)
RECON_TERMS = {
    "stochastic_recon": ("stochastic", "all"),
    "stochastic_recon_layerwise": ("stochastic", "layerwise"),
    "stochastic_recon_subset": ("stochastic", "subset"),
    "ci_masked_recon": ("ci", "all"),
    "ci_masked_recon_layerwise": ("ci", "layerwise"),
    "ci_masked_recon_subset": ("ci", "subset"),
    "unmasked_recon": ("unmasked", "all"),
}


def recon_term(kind: str, routing: str) -> Term:
    """The mean reconstruction loss over the routing's site groups, fresh masks of `kind` for each."""
    def fn(spd, ctx, lc, frac) -> torch.Tensor:
        groups = spd.site_groups(ctx, routing, lc)
        return torch.stack([spd.recon(ctx, spd.masks(ctx, kind, g)) for g in groups]).mean()
    return Term(fn)


TERMS = {name: recon_term(kind, routing) for name, (kind, routing) in RECON_TERMS.items()}
