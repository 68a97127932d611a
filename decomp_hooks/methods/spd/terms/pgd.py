"""PGD reconstruction: masks `g + (1 − g)·s` whose sources s ∈ [0, 1] are pushed by sign ascent towards the worst
reconstruction, then the loss at the final sources; and the evaluation probe built on it."""
from __future__ import annotations

import torch

from decomp_hooks import distributed
from decomp_hooks.components import SiteMask
from decomp_hooks.methods.spd.config import LossConfig
from decomp_hooks.methods.spd.context import StepContext
from decomp_hooks.methods.spd.terms.base import Term

INITS = {"random": torch.rand, "ones": torch.ones, "zeroes": torch.zeros}


def pgd_sources(ctx: StepContext, names: list[str], lc: LossConfig) -> dict[str, torch.Tensor]:
    """Adversarial sources s ∈ [0,1]^{C+1} per site (last entry: the delta mask), per position or shared."""
    sources = {}
    for name in names:
        g = ctx.ci[name].lower
        shape = g.shape[:-1] if lc.mask_scope == "unique_per_datapoint" else (1,) * (g.dim() - 1)
        sources[name] = INITS[lc.init]((*shape, g.shape[-1] + 1), device=g.device)
        if lc.mask_scope == "shared_across_batch":
            distributed.broadcast_from_main(sources[name])  # one source for the global batch, as on one rank
    return sources


def pgd_masks(spd, ctx: StepContext, sources: dict[str, torch.Tensor], group: dict, detach_ci: bool) -> dict[str, SiteMask]:
    out = {}
    for name, route in group.items():
        g = ctx.ci[name].lower.detach() if detach_ci else ctx.ci[name].lower
        s = sources[name]
        delta = s[..., -1].expand(g.shape[:-1]) if spd.cfg.use_delta_component else None
        out[name] = SiteMask(g + (1 - g) * s[..., :-1], delta, route)
    return out


def pgd_attack(spd, ctx: StepContext, group: dict, lc: LossConfig) -> dict[str, torch.Tensor]:
    """`lc.n_steps` steps of sign ascent from fresh sources on the reconstruction loss (CI held fixed): the sources
    of the worst masks found."""
    sources = pgd_sources(ctx, list(group), lc)
    delta_ws = {n: dw.detach() for n, dw in ctx.delta_ws.items()}
    reuse = {n: r.detach() for n, r in ctx.reuse.items()}
    for _ in range(lc.n_steps):
        for s in sources.values():
            s.requires_grad_(True)
        out, _ = ctx.cm(ctx.batch, masks=pgd_masks(spd, ctx, sources, group, True), delta_ws=delta_ws, reuse=reuse)
        grads = torch.autograd.grad(spd.divergence(out, ctx.target_out), list(sources.values()))
        if lc.mask_scope == "shared_across_batch":
            grads = [distributed.mean_(gr) for gr in grads]  # the ascent direction of the global-batch loss
        sources = {n: (s.detach() + lc.step_size * gr.sign()).clamp(0, 1) for (n, s), gr in zip(sources.items(), grads)}
    return sources


def pgd_recon(spd, ctx: StepContext, group: dict, lc: LossConfig) -> torch.Tensor:
    """The reconstruction loss at the sources `pgd_attack` found (its gradient reaches the CI through g)."""
    return spd.recon(ctx, pgd_masks(spd, ctx, pgd_attack(spd, ctx, group, lc), group, False))


def pgd_probe(spd, ctx: StepContext, n_steps: int = 20, step_size: float = 0.1,
              scope: str = "unique_per_datapoint") -> torch.Tensor:
    """The evaluation PGD probe: a fresh sign-PGD attack on all sites, its sources per position or one shared by
    the whole batch (`scope`); returns the model output under the adversarial masks it found."""
    lc = LossConfig(type="pgd_recon", n_steps=n_steps, step_size=step_size, mask_scope=scope)
    group = {n: None for n in ctx.ci}
    with torch.enable_grad():
        sources = pgd_attack(spd, ctx, group, lc)
    out, _ = ctx.cm(ctx.batch, masks=pgd_masks(spd, ctx, sources, group, True), delta_ws=ctx.delta_ws, reuse=ctx.reuse)
    return out


def pgd_term(routing: str) -> Term:
    def fn(spd, ctx, lc, frac) -> torch.Tensor:
        return torch.stack([pgd_recon(spd, ctx, g, lc) for g in spd.site_groups(ctx, routing, lc)]).mean()
    return Term(fn)


TERMS = {"pgd_recon": pgd_term("all"), "pgd_recon_layerwise": pgd_term("layerwise"),
         "pgd_recon_subset": pgd_term("subset")}
