"""Reconstruction of the target output with masked components: one of three mask kinds (stochastic, CI-masked,
unmasked) under one of three routings (all sites, one site at a time, a random subset per position). The one-site-at-a-
time terms weight each site's forward by `site_coeffs` (a site at 0 is not run), so a term can act on chosen sites."""
from __future__ import annotations

import torch

from decomp_hooks.config import ConfigError
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
LAYERWISE_TERMS = tuple(name for name, (_, routing) in RECON_TERMS.items() if routing == "layerwise")


def recon_term(kind: str, routing: str) -> Term:
    """The mean reconstruction loss over the routing's site groups, fresh masks of `kind` for each; one-site groups
    carry their site's `site_coeffs` multiplier (1 where unnamed), and those at 0 are skipped."""
    def fn(spd, ctx, lc, frac) -> torch.Tensor:
        groups = spd.site_groups(ctx, routing, lc)
        weights = spd.site_weights(ctx, lc) if routing == "layerwise" else {}
        weighted = [(weights.get(next(iter(g)), 1.0), g) for g in groups]
        losses = [w * spd.recon(ctx, spd.masks(ctx, kind, g)) for w, g in weighted if w > 0]
        if not losses:
            raise ConfigError(f"{lc.type}: site_coeffs {lc.site_coeffs} set every site to 0, so the term reads no "
                              "site; give one a multiplier above 0 or remove the term.")
        return torch.stack(losses).sum() / len(groups)
    return Term(fn)


TERMS = {name: recon_term(kind, routing) for name, (kind, routing) in RECON_TERMS.items()}
