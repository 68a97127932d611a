"""SPD as a Method: the configured loss terms, each with its coefficient, on rank-one components with CI functions.

Every reconstruction term draws fresh masks of its kind (stochastic, CI-masked, unmasked, PGD) under its routing
(all sites, one site at a time, a random subset per position); see docs/methods/spd.md.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteMask
from decomp_hooks.config import ConfigError, DecomposeConfig, check, did_you_mean
from decomp_hooks.methods.base import Method, StepOutput
from decomp_hooks.methods.spd.config import LossConfig
from decomp_hooks.methods.spd.context import StepContext
from decomp_hooks.methods.spd.terms import TERMS, Term
from decomp_hooks.methods.spd.terms.importance_minimality import annealed_beta, annealed_gamma, annealed_p
from decomp_hooks.methods.spd.terms.pgd import pgd_probe
from decomp_hooks.methods.spd.terms.reconstruction import LAYERWISE_TERMS
from decomp_hooks.lm.metrics import ce_summary, lm_metrics
from decomp_hooks.metrics import ci_l0, kl_logits, mse
from decomp_hooks.sites import match_targets

ROUTINGS = ("uniform_k_subset", "static_probability")
#: mask kind -> the language-model mask type that is the same mask (its KL is that kind's reconstruction loss)
LM_RECON = {"stochastic": "stoch_masked", "ci": "ci_masked", "unmasked": "unmasked"}
MINIMALITY_TERMS = ("importance_minimality", "frequency_minimality")
MASK_SCOPES = ("unique_per_datapoint", "shared_across_batch")


def validate_loss(loss: LossConfig, where: str, terms: dict[str, Term]) -> None:
    """One `losses:` entry: a known type and values in range, each error naming the key."""
    check(loss.type in terms, f"{where}.type={loss.type!r} is unknown.{did_you_mean(loss.type, list(terms))}")
    check(0 <= loss.coeff < math.inf, f"{where}.coeff={loss.coeff}: must be finite and ≥ 0.")
    check(0 < loss.pnorm < math.inf, f"{where}.pnorm={loss.pnorm}: must be finite and > 0.")
    check(loss.p_anneal_final_p is None or 0 < loss.p_anneal_final_p < math.inf,
          f"{where}.p_anneal_final_p={loss.p_anneal_final_p}: must be finite and > 0 (or null: no annealing).")
    fracs = ("p_anneal_start_frac", "p_anneal_end_frac", "beta_anneal_start_frac", "beta_anneal_end_frac",
             "gamma_anneal_start_frac", "gamma_anneal_end_frac", "routing_p")
    for key in fracs:
        check(0 <= getattr(loss, key) <= 1, f"{where}.{key}={getattr(loss, key)}: must be in [0, 1].")
    check(0 <= loss.beta < math.inf, f"{where}.beta={loss.beta}: must be finite and ≥ 0.")
    check(loss.beta_anneal_final is None or 0 <= loss.beta_anneal_final < math.inf,
          f"{where}.beta_anneal_final={loss.beta_anneal_final}: must be finite and ≥ 0 (or null: no annealing).")
    check(loss.beta_anneal_final is None or loss.type == "importance_minimality",
          f"{where}.beta_anneal_final: only importance_minimality has a β; remove it from {loss.type!r}.")
    for key in ("gamma", "gamma_anneal_final"):
        value = getattr(loss, key)
        check(value is None or 0 < value < math.inf, f"{where}.{key}={value}: must be finite and > 0 (or null).")
    check(loss.gamma_anneal_final is None or loss.gamma is not None,
          f"{where}.gamma_anneal_final needs a starting width: set {where}.gamma too.")
    check(loss.gamma is None or loss.type in MINIMALITY_TERMS,
          f"{where}.gamma: only the minimality terms take a smooth-L0 width; remove it from {loss.type!r}.")
    check(0 < loss.eps < 1, f"{where}.eps={loss.eps}: must be in (0, 1).")
    check(0 < loss.step_size < math.inf, f"{where}.step_size={loss.step_size}: must be finite and > 0.")
    check(not loss.site_coeffs or loss.type in MINIMALITY_TERMS + LAYERWISE_TERMS,
          f"{where}.site_coeffs: only {', '.join(MINIMALITY_TERMS + LAYERWISE_TERMS)} take per-site multipliers; "
          f"remove it from {loss.type!r}.")
    for pattern, w in loss.site_coeffs.items():
        check(w >= 0, f"{where}.site_coeffs[{pattern!r}]={w}: must be ≥ 0.")
    check(loss.routing in ROUTINGS, f"{where}.routing={loss.routing!r}; use 'uniform_k_subset' or 'static_probability'.")
    check(loss.init in ("random", "ones", "zeroes"), f"{where}.init={loss.init!r}; use 'random', 'ones' or 'zeroes'.")
    check(loss.mask_scope in MASK_SCOPES,
          f"{where}.mask_scope={loss.mask_scope!r}; use 'unique_per_datapoint' or 'shared_across_batch'.")
    check(loss.n_steps >= 1, f"{where}.n_steps={loss.n_steps}: must be ≥ 1.")


class SPD(Method):
    """Stochastic Parameter Decomposition: `losses:` lists the terms (from `terms`); CI functions (`ci:`)."""

    name = "spd"
    terms: dict[str, Term] = TERMS

    def __init__(self, cfg: DecomposeConfig, world_size: int = 1):
        super().__init__(cfg, world_size)
        self.divergence = kl_logits if cfg.output_loss == "kl" else mse
        self.needs_delta = any(self.terms[lc.type].needs_delta for lc in cfg.losses)
        self._site_weights: dict[tuple, dict[str, float]] = {}  # site_coeffs items -> site -> multiplier, resolved once

    @classmethod
    def validate(cls, cfg: DecomposeConfig) -> None:
        for i, loss in enumerate(cfg.losses):
            validate_loss(loss, f"losses[{i}]", cls.terms)
        check(len({loss.type for loss in cfg.losses}) == len(cfg.losses), "losses: each type may appear once.")

    @classmethod
    def check_trainable(cls, cfg: DecomposeConfig) -> None:
        if not cfg.losses:
            raise ConfigError("no loss terms: set `losses:` in the config (see examples/*.yaml).")

    # -- one step ------------------------------------------------------------------------------------------------

    def prepare(self, cm: ComponentModel, batch: object, noise: bool = True, delta: bool | None = None) -> StepContext:
        """Target forward caching site inputs, CI, and ΔW per site (if `delta`, by default if a loss term reads it):
        the shared start of every step. Sites that ran once keep their `x V` for the masked forwards to reuse."""
        calls: dict[str, int] = {}
        with torch.no_grad():
            target_out, inputs = cm(batch, cache=True, calls=calls)
        ci = cm.causal_importances(inputs, noise=noise, keep_inner=True)
        reuse = {n: c.inner for n, c in ci.items() if c.inner is not None and calls.get(n) == 1}
        delta = self.needs_delta if delta is None else delta
        delta_ws = {n: cm.component(n).delta_weight() for n in cm.site_names} if delta else {}
        return StepContext(cm, batch, target_out, inputs, ci, delta_ws, reuse)

    def loss(self, cm: ComponentModel, batch: Any, frac: float) -> StepOutput:
        ctx = self.prepare(cm, batch)
        total = torch.zeros((), device=ctx.target_out.device)
        terms: dict[str, torch.Tensor] = {}
        for lc in self.cfg.losses:
            value = self.term(lc, ctx, frac)
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss term {lc.type!r} is {value.item()} (not finite){blame(ctx)}")
            terms[lc.type] = value.detach()
            total = total + lc.coeff * value
        return StepOutput(total, terms, {n: c.lower.detach() for n, c in ctx.ci.items()}, self.step_log(frac))

    def step_log(self, frac: float) -> dict[str, float]:
        """Schedules worth logging at progress `frac`: the minimality exponent p (or the smooth-L0 width γ), and β
        where it is annealed."""
        minimality = next((lc for lc in self.cfg.losses if lc.type in MINIMALITY_TERMS), None)
        if minimality is None:
            log = {}
        elif minimality.gamma is None:
            log = {"importance_p": annealed_p(minimality, frac)}
        else:
            log = {"importance_gamma": annealed_gamma(minimality, frac)}
        annealed = [lc for lc in self.cfg.losses if lc.beta_anneal_final is not None]
        return {**log, "importance_beta": annealed_beta(annealed[0], frac)} if annealed else log

    def term(self, lc: LossConfig, ctx: StepContext, frac: float) -> torch.Tensor:
        """The raw value of one configured loss term."""
        return self.terms[lc.type].fn(self, ctx, lc, frac)

    def site_weights(self, ctx: StepContext, lc: LossConfig) -> dict[str, float]:
        """The per-site multiplier of a term from `lc.site_coeffs`, resolved against the sites once."""
        key = tuple(lc.site_coeffs.items())
        if key not in self._site_weights:
            self._site_weights[key] = match_targets(ctx.ci, lc.site_coeffs, what="site")
        return self._site_weights[key]

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, cm: ComponentModel, batch: Any) -> dict[str, float]:
        """Faithfulness, reconstruction under each mask kind, the PGD probe, CI-L0 / live components per site, and
        for language models (KL output loss, token-id batches) KL and CE under every mask type."""
        ctx = self.prepare(cm, batch, noise=False, delta=True)
        out = {"faithfulness": cm.faithfulness(ctx.delta_ws).item()}
        t, tau = self.cfg.train, self.cfg.ci_alive_threshold
        labels = token_labels(ctx.batch)
        lm = self.cfg.output_loss == "kl" and labels is not None
        if not lm:  # for language models the KLs of the same masks below are these reconstructions
            everywhere = {n: None for n in ctx.ci}
            for kind in LM_RECON:
                out[f"{kind}_recon"] = self.recon(ctx, self.masks(ctx, kind, everywhere)).item()
        adversarial = pgd_probe(self, ctx, t.eval_pgd_steps, scope=t.eval_pgd_scope) if t.eval_pgd_steps > 0 else None
        if adversarial is not None:
            out["pgd_probe"] = self.divergence(adversarial, ctx.target_out).item()
        if lm:
            out.update(lm_metrics(ctx, labels, tau, adversarial))
            out.update(ce_summary(out))
            out.update({f"{kind}_recon": out[f"kl_{mask}"] for kind, mask in LM_RECON.items()})
        for name, c in ctx.ci.items():
            g = c.lower.flatten(0, -2).float()
            out[f"l0/{name}"] = ci_l0(g, tau)
            out[f"live/{name}"] = int((g.max(0).values > tau).sum())
        return out

    # -- masks and routing ---------------------------------------------------------------------------------------

    def site_groups(self, ctx: StepContext, routing: str, lc: LossConfig | None) -> list[dict[str, torch.Tensor | None]]:
        """Which sites are masked in each forward of a term: {site: route or None (all positions)}."""
        return GROUPINGS[routing](list(ctx.ci), next(iter(ctx.ci.values())).lower, lc)

    def masks(self, ctx: StepContext, kind: str, group: dict[str, torch.Tensor | None]) -> dict[str, SiteMask]:
        """Component (and delta) masks of one mask kind for the sites in `group`."""
        make = MASK_KINDS[kind]
        return {name: make(self.cfg, ctx.ci[name].lower, route) for name, route in group.items()}

    def recon(self, ctx: StepContext, masks: dict[str, SiteMask]) -> torch.Tensor:
        """The divergence of the masked forward's output from the target's."""
        out, _ = ctx.cm(ctx.batch, masks=masks, delta_ws=ctx.delta_ws, reuse=ctx.reuse)
        return self.divergence(out, ctx.target_out)


def stochastic_mask(cfg: DecomposeConfig, g: torch.Tensor, route: torch.Tensor | None) -> SiteMask:
    """`g + (1 − g)·r`, r uniform (or binary with `ci.sampling: binomial`), and a uniform delta mask."""
    r = torch.rand_like(g) if cfg.ci.sampling == "continuous" else torch.randint_like(g, 2)
    delta = torch.rand(g.shape[:-1], device=g.device, dtype=g.dtype) if cfg.use_delta_component else None
    return SiteMask(torch.addcmul(g, 1 - g, r), delta, route)


#: mask kind -> the site mask it makes from the CI g (and the routing)
MASK_KINDS = {
    "stochastic": stochastic_mask,
    "ci": lambda cfg, g, route: SiteMask(g, None, route),
    "unmasked": lambda cfg, g, route: SiteMask(torch.ones_like(g), None, route),
}


def subset_route(names: list[str], g: torch.Tensor, lc: LossConfig) -> torch.Tensor:
    """Which sites each position routes through its masked components `[..., n_sites]`: each with probability
    `routing_p` (static_probability), or a uniformly random k of them, k uniform in 1..n_sites (uniform_k_subset)."""
    shape, device = g.shape[:-1], g.device
    if lc.routing == "static_probability":
        return torch.rand(*shape, len(names), device=device) < lc.routing_p
    ranks = torch.rand(*shape, len(names), device=device).argsort(-1).argsort(-1)
    k = torch.randint(1, len(names) + 1, (*shape, 1), device=device)
    return ranks < k


#: routing -> the site groups of one term's forwards, each {site: route or None}
GROUPINGS = {
    "all": lambda names, g, lc: [{n: None for n in names}],
    "layerwise": lambda names, g, lc: [{n: None} for n in names],
    "subset": lambda names, g, lc: [{n: r for n, r in zip(names, subset_route(names, g, lc).unbind(-1))}],
}


def blame(ctx: StepContext) -> str:
    """Which sites carry non-finite values (inputs, CI, components), to name them in a non-finite-loss error."""
    bad = []
    for name in ctx.cm.site_names:
        comps = ctx.cm.component(name)
        checks = {"input": ctx.inputs.get(name), "causal importance": ctx.ci[name].lower, "V": comps.V, "U": comps.U}
        bad += [f"{what} of site {name!r}" for what, t in checks.items()
                if t is not None and t.is_floating_point() and not torch.isfinite(t).all()]
    return f"; non-finite values in: {', '.join(bad)}" if bad else "; every site's inputs, CI and components are finite (the model output is not)"


def token_labels(batch: object) -> torch.Tensor | None:
    """The token ids of a language-model batch (a LongTensor or a dict with `input_ids`), else None."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    return ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None
