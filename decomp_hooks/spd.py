"""Stochastic Parameter Decomposition: its loss terms on a ComponentModel (methods.md §1.5–§1.6).

Every reconstruction term is one of three mask kinds (stochastic, CI-masked, unmasked) or PGD, under one of three
routings (all sites, one site at a time, a random subset per position); fresh masks are drawn for every term.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from decomp_hooks import distributed
from decomp_hooks.component_model import CausalImportance, ComponentModel
from decomp_hooks.components import SiteMask
from decomp_hooks.config import DecomposeConfig, LossConfig
from decomp_hooks.metrics import ce_loss, ci_l0, kl_logits, mse
from decomp_hooks.sites import match_targets

#: the LM evaluation mask types of methods.md §5: component mask as a function of the CI g
MASK_TYPES = {
    "ci_masked": lambda g: g,
    "unmasked": torch.ones_like,
    "stoch_masked": lambda g: g + (1 - g) * torch.rand_like(g),
    "random_masked": torch.rand_like,
    "zero_masked": torch.zeros_like,
}

#: loss type -> (mask kind, routing)
RECON_TERMS = {
    "stochastic_recon": ("stochastic", "all"),
    "stochastic_recon_layerwise": ("stochastic", "layerwise"),
    "stochastic_recon_subset": ("stochastic", "subset"),
    "ci_masked_recon": ("ci", "all"),
    "ci_masked_recon_layerwise": ("ci", "layerwise"),
    "ci_masked_recon_subset": ("ci", "subset"),
    "unmasked_recon": ("unmasked", "all"),
    "pgd_recon": ("pgd", "all"),
    "pgd_recon_layerwise": ("pgd", "layerwise"),
    "pgd_recon_subset": ("pgd", "subset"),
}

Forward = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepContext:
    """What every loss term of one step reads: the batch, target output and site inputs, CI, ΔW per site (where a term
    needs it), and the sites' `x V` that masked forwards may reuse."""

    fwd: Forward
    batch: object
    target_out: torch.Tensor
    inputs: dict[str, torch.Tensor]
    ci: dict[str, CausalImportance]
    delta_ws: dict[str, torch.Tensor]
    reuse: dict[str, torch.Tensor]


def annealed_p(loss: LossConfig, frac: float) -> float:
    """p(t) = p₀ + (p_f − p₀)·clip((t/T − f_s)/(f_e − f_s), 0, 1)."""
    if loss.p_anneal_final_p is None:
        return loss.pnorm
    span = max(loss.p_anneal_end_frac - loss.p_anneal_start_frac, 1e-12)
    t = min(max((frac - loss.p_anneal_start_frac) / span, 0.0), 1.0)
    return loss.pnorm + (loss.p_anneal_final_p - loss.pnorm) * t


def importance_minimality(ci: dict[str, CausalImportance], p: float, eps: float, beta: float, world_size: int,
                          site_weights: dict[str, float] | None = None) -> torch.Tensor:
    """Σ_l w_l Σ_c [μ + β μ log₂(1 + N·W·μ)], μ_{l,c} = mean over positions of (g⁺ + ε)^p; w_l from `site_weights`
    (1 for the sites it does not name), so that one site can be held to a weaker or stronger sparsity than the rest."""
    weights = site_weights or {}
    total = 0.0
    for name, c in ci.items():
        g = c.upper.flatten(0, -2).float()
        mu = (g + eps).mean(0) if p == 1 else (g + eps).pow(p).mean(0)
        term = mu + beta * mu * torch.log2(1 + g.shape[0] * world_size * mu) if beta else mu
        total = total + weights.get(name, 1.0) * term.sum()
    return total


def faithfulness(cm: ComponentModel, delta_ws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_l ‖W_l − (V_l U_l)ᵀ‖²_F / Σ_l numel(W_l), over the decomposed parameters."""
    sq = sum(dw.float().pow(2).sum() for dw in delta_ws.values())
    return sq / sum(dw.numel() for dw in delta_ws.values())


class SPD:
    """The SPD objective: the configured loss terms, each with its coefficient."""

    def __init__(self, cfg: DecomposeConfig, world_size: int = 1):
        self.cfg = cfg
        self.world_size = world_size
        self.divergence = kl_logits if cfg.output_loss == "kl" else mse
        self._site_weights: dict[tuple, dict[str, float]] = {}  # site_coeffs items -> site -> multiplier, resolved once

    def prepare(self, cm: ComponentModel, fwd: Forward, batch: object, noise: bool = True,
                delta: bool | None = None) -> StepContext:
        """Target forward caching site inputs, CI, and ΔW per site (if `delta`, by default if a loss term reads it):
        the shared start of every step. Sites that ran once keep their `x V` for the masked forwards to reuse."""
        calls: dict[str, int] = {}
        with torch.no_grad():
            target_out, inputs = fwd(batch, cache=True, calls=calls)
        ci = cm.causal_importances(inputs, noise=noise, keep_inner=True)
        reuse = {n: c.inner for n, c in ci.items() if c.inner is not None and calls.get(n) == 1}
        if delta is None:
            delta = any(lc.type == "faithfulness" for lc in self.cfg.losses)
        delta_ws = {n: cm.component(n).delta_weight() for n in cm.site_names} if delta else {}
        return StepContext(fwd, batch, target_out, inputs, ci, delta_ws, reuse)

    def loss(self, cm: ComponentModel, fwd: Forward, batch: object, frac: float) -> tuple[torch.Tensor, dict[str, float], StepContext]:
        """Total loss and each term's raw value, at training-progress fraction `frac`."""
        ctx = self.prepare(cm, fwd, batch)
        total = torch.zeros((), device=ctx.target_out.device)
        terms: dict[str, float] = {}
        for lc in self.cfg.losses:
            value = self.term(lc, cm, ctx, frac)
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss term {lc.type!r} is {value.item()} (not finite){blame(cm, ctx)}")
            terms[lc.type] = value.detach()
            total = total + lc.coeff * value
        return total, terms, ctx

    def current_p(self, frac: float) -> float | None:
        """The importance-minimality exponent at progress `frac`, or None without that term."""
        return next((annealed_p(lc, frac) for lc in self.cfg.losses if lc.type == "importance_minimality"), None)

    def after_backward(self, cm: ComponentModel) -> None:
        """Nothing to adjust between backward and the optimizer step."""

    def after_step(self, cm: ComponentModel) -> None:
        """Nothing to adjust after the optimizer step."""

    def evaluate(self, cm: ComponentModel, fwd: Forward, batch: object) -> dict[str, float]:
        """Faithfulness, reconstruction under each mask kind, the PGD probe, and CI-L0 / live components per site."""
        ctx = self.prepare(cm, fwd, batch, noise=False, delta=True)
        everywhere = {n: None for n in ctx.ci}
        out = {"faithfulness": faithfulness(cm, ctx.delta_ws).item()}
        for kind in ("stochastic", "ci", "unmasked"):
            out[f"{kind}_recon"] = self.recon(ctx, self.masks(ctx, kind, everywhere)).item()
        if self.cfg.train.eval_pgd_steps > 0:
            out["pgd_probe"] = pgd_probe(self, ctx, n_steps=self.cfg.train.eval_pgd_steps)
        tau = self.cfg.ci_alive_threshold
        labels = token_labels(ctx.batch)
        if self.cfg.output_loss == "kl" and labels is not None:
            out.update(self.lm_metrics(ctx, labels))
        for name, c in ctx.ci.items():
            g = c.lower.flatten(0, -2).float()
            out[f"l0/{name}"] = ci_l0(g, tau)
            out[f"live/{name}"] = int((g.max(0).values > tau).sum())
        return out

    def lm_metrics(self, ctx: StepContext, labels: torch.Tensor) -> dict[str, float]:
        """KL to the target and CE against the next tokens under each mask type, plus ce_difference / ce_unrecovered."""
        mask_fns = {**MASK_TYPES, "rounded_masked": lambda g: (g > self.cfg.ci_alive_threshold).to(g.dtype)}
        ce_target = ce_loss(ctx.target_out, labels).item()
        out, ce = {"ce_target": ce_target}, {}
        for mt, fn in mask_fns.items():
            logits, _ = ctx.fwd(ctx.batch, masks={n: SiteMask(fn(c.lower)) for n, c in ctx.ci.items()})
            out[f"kl_{mt}"] = kl_logits(logits, ctx.target_out).item()
            ce[mt] = ce_loss(logits, labels).item()
        for mt, value in ce.items():
            out[f"ce_difference_{mt}"] = value - ce_target
            out[f"ce_unrecovered_{mt}"] = (value - ce_target) / max(ce["zero_masked"] - ce_target, 1e-12)
        return out

    def term(self, lc: LossConfig, cm: ComponentModel, ctx: StepContext, frac: float) -> torch.Tensor:
        if lc.type == "faithfulness":
            return faithfulness(cm, ctx.delta_ws)
        if lc.type == "importance_minimality":
            key = tuple(lc.site_coeffs.items())
            if key not in self._site_weights:
                self._site_weights[key] = match_targets(ctx.ci, lc.site_coeffs, what="site")
            weights = self._site_weights[key]
            return importance_minimality(ctx.ci, annealed_p(lc, frac), lc.eps, lc.beta, self.world_size, weights)
        if lc.type == "stochastic_hidden_acts_recon":
            return self.hidden_acts_recon(ctx)
        kind, routing = RECON_TERMS[lc.type]
        groups = self.site_groups(ctx, routing, lc)
        if kind == "pgd":
            return torch.stack([self.pgd_recon(ctx, g, lc) for g in groups]).mean()
        return torch.stack([self.recon(ctx, self.masks(ctx, kind, g)) for g in groups]).mean()

    # -- masks and routing -------------------------------------------------------------------------------------

    def site_groups(self, ctx: StepContext, routing: str, lc: LossConfig | None) -> list[dict[str, torch.Tensor | None]]:
        """Which sites are masked in each forward of a term: {site: route or None (all positions)}."""
        names = list(ctx.ci)
        if routing == "all":
            return [{n: None for n in names}]
        if routing == "layerwise":
            return [{n: None} for n in names]
        shape = next(iter(ctx.ci.values())).lower.shape[:-1]
        device = next(iter(ctx.ci.values())).lower.device
        if lc.routing == "static_probability":
            route = torch.rand(*shape, len(names), device=device) < lc.routing_p
        else:
            ranks = torch.rand(*shape, len(names), device=device).argsort(-1).argsort(-1)
            k = torch.randint(1, len(names) + 1, (*shape, 1), device=device)
            route = ranks < k
        return [{n: route[..., i] for i, n in enumerate(names)}]

    def masks(self, ctx: StepContext, kind: str, group: dict[str, torch.Tensor | None]) -> dict[str, SiteMask]:
        """Component (and delta) masks of one mask kind for the sites in `group`."""
        out = {}
        for name, route in group.items():
            g = ctx.ci[name].lower
            if kind == "stochastic":
                r = torch.rand_like(g) if self.cfg.ci.sampling == "continuous" else torch.randint_like(g, 2)
                delta = torch.rand(g.shape[:-1], device=g.device, dtype=g.dtype) if self.cfg.use_delta_component else None
                out[name] = SiteMask(torch.addcmul(g, 1 - g, r), delta, route)  # g + (1 − g) r
            elif kind == "ci":
                out[name] = SiteMask(g, None, route)
            else:
                out[name] = SiteMask(torch.ones_like(g), None, route)
        return out

    def recon(self, ctx: StepContext, masks: dict[str, SiteMask]) -> torch.Tensor:
        out, _ = ctx.fwd(ctx.batch, masks=masks, delta_ws=ctx.delta_ws, reuse=ctx.reuse)
        return self.divergence(out, ctx.target_out)

    def hidden_acts_recon(self, ctx: StepContext) -> torch.Tensor:
        """Σ_l ‖a_l(masked) − a_l(target)‖² / Σ_l numel(a_l) over the sites' inputs, under stochastic masks."""
        masks = self.masks(ctx, "stochastic", {n: None for n in ctx.ci})
        _, masked_inputs = ctx.fwd(ctx.batch, masks=masks, cache=True, delta_ws=ctx.delta_ws, reuse=ctx.reuse)
        names = [n for n, x in ctx.inputs.items() if x.is_floating_point()]
        sq = sum((masked_inputs[n].float() - ctx.inputs[n].float()).pow(2).sum() for n in names)
        return sq / max(sum(ctx.inputs[n].numel() for n in names), 1)

    # -- PGD -----------------------------------------------------------------------------------------------------

    def pgd_sources(self, ctx: StepContext, names: list[str], lc: LossConfig) -> dict[str, torch.Tensor]:
        """Adversarial sources s ∈ [0,1]^{C+1} per site (last entry: the delta mask), per position or shared."""
        sources = {}
        for name in names:
            g = ctx.ci[name].lower
            shape = g.shape[:-1] if lc.mask_scope == "unique_per_datapoint" else (1,) * (g.dim() - 1)
            shape = (*shape, g.shape[-1] + 1)
            init = {"random": torch.rand, "ones": torch.ones, "zeroes": torch.zeros}[lc.init]
            sources[name] = init(shape, device=g.device)
            if lc.mask_scope == "shared_across_batch":
                distributed.broadcast_from_main(sources[name])  # one source for the global batch, as on one rank
        return sources

    def pgd_masks(self, ctx: StepContext, sources: dict[str, torch.Tensor], group: dict, detach_ci: bool) -> dict[str, SiteMask]:
        out = {}
        for name, route in group.items():
            g = ctx.ci[name].lower.detach() if detach_ci else ctx.ci[name].lower
            s = sources[name]
            delta = s[..., -1].expand(g.shape[:-1]) if self.cfg.use_delta_component else None
            out[name] = SiteMask(g + (1 - g) * s[..., :-1], delta, route)
        return out

    def pgd_recon(self, ctx: StepContext, group: dict, lc: LossConfig) -> torch.Tensor:
        """n_steps of sign ascent on the sources, then the reconstruction loss at the final sources."""
        sources = self.pgd_sources(ctx, list(group), lc)
        delta_ws = {n: dw.detach() for n, dw in ctx.delta_ws.items()}
        reuse = {n: r.detach() for n, r in ctx.reuse.items()}
        for _ in range(lc.n_steps):
            for s in sources.values():
                s.requires_grad_(True)
            out, _ = ctx.fwd(ctx.batch, masks=self.pgd_masks(ctx, sources, group, True), delta_ws=delta_ws, reuse=reuse)
            grads = torch.autograd.grad(self.divergence(out, ctx.target_out), list(sources.values()))
            if lc.mask_scope == "shared_across_batch":
                grads = [distributed.mean_(gr) for gr in grads]  # the ascent direction of the global-batch loss
            sources = {n: (s.detach() + lc.step_size * gr.sign()).clamp(0, 1) for (n, s), gr in zip(sources.items(), grads)}
        return self.recon(ctx, self.pgd_masks(ctx, sources, group, False))


def blame(cm: ComponentModel, ctx: StepContext) -> str:
    """Which sites carry non-finite values (inputs, CI, components), to name them in a non-finite-loss error."""
    bad = []
    for name in cm.site_names:
        comps = cm.component(name)
        checks = {"input": ctx.inputs.get(name), "causal importance": ctx.ci[name].lower, "V": comps.V, "U": comps.U}
        bad += [f"{what} of site {name!r}" for what, t in checks.items()
                if t is not None and t.is_floating_point() and not torch.isfinite(t).all()]
    return f"; non-finite values in: {', '.join(bad)}" if bad else "; every site's inputs, CI and components are finite (the model output is not)"


def token_labels(batch: object) -> torch.Tensor | None:
    """The token ids of a language-model batch (a LongTensor or a dict with `input_ids`), else None."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    return ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None


def pgd_probe(spd: SPD, ctx: StepContext, n_steps: int = 20, step_size: float = 0.1) -> float:
    """The evaluation PGD probe: fresh sign-PGD over all sites, per position."""
    lc = LossConfig(type="pgd_recon", n_steps=n_steps, step_size=step_size, mask_scope="unique_per_datapoint")
    with torch.enable_grad():
        return spd.pgd_recon(ctx, {n: None for n in ctx.ci}, lc).item()

