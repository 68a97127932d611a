"""APD as a Method (docs/methods/apd.md).

A component c spans every decomposed site (rank m_l at site l, see `layout`). Per input, the components with the
largest attributions are on (batch or per-sample top-k); a `[..., C]` mask becomes the shared masked forward's
`[..., C·m]` mask by `repeat_interleave(m)`, without the delta component (APD matches parameters with a loss instead).
Losses, with the reference code's normalisations: parameter matching, top-k reconstruction, hidden-activation
reconstruction (ResidMLP) and the Schatten-p simplicity penalty weighted by how often each component is on.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch

from decomp_hooks import distributed
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteComponents, SiteMask
from decomp_hooks.config import ConfigError, DecomposeConfig, check
from decomp_hooks.methods.apd.attributions import (
    ablation_attributions,
    activation_attributions,
    gradient_attributions,
    probe_attributions,
)
from decomp_hooks.methods.apd.layout import apd_layout, expand, full_masks, groups, n_components
from decomp_hooks.methods.apd.losses import act_recon, schatten, topk_mask
from decomp_hooks.methods.base import Layout, Method, StepOutput
from decomp_hooks.metrics import kl_logits, mechanism_counts, mse
from decomp_hooks.sites import Site


@dataclass
class APDContext:
    """One step's shared quantities: target output, site inputs/outputs, attribution scores and the top-k mask."""

    batch: object
    target_out: torch.Tensor
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    scores: torch.Tensor
    mask: torch.Tensor


class APD(Method):
    """The APD objective on a ComponentModel laid out by `layout` (no CI functions, grouped columns)."""

    name = "apd"
    section = "apd"
    importance_kind = "topk"

    def __init__(self, cfg: DecomposeConfig, world_size: int = 1):
        super().__init__(cfg, world_size)
        self.a = cfg.apd
        self.divergence = kl_logits if cfg.output_loss == "kl" else mse

    # -- configuration and layout ---------------------------------------------------------------------------------

    @classmethod
    def validate(cls, cfg: DecomposeConfig) -> None:
        """The `apd:` section, and the parts of the rest of the config APD reads differently."""
        a = cfg.apd
        check(not cfg.losses, "losses: lists SPD loss terms; APD's loss coefficients are in `apd:` "
              "(param_match_coeff, topk_recon_coeff, act_recon_coeff, schatten_coeff). Remove `losses:` or use method 'spd'.")
        check(a.C is None or a.C > 0, f"apd.C={a.C}: must be a positive integer.")
        check(a.rank is None or a.rank > 0, f"apd.rank={a.rank}: must be a positive integer, or null for full rank.")
        check(a.topk > 0, f"apd.topk={a.topk}: must be > 0.")
        check(a.batch_topk or float(a.topk).is_integer(),
              f"apd.topk={a.topk}: per-sample top-k (batch_topk: false) needs an integer k.")
        check(a.attribution_type in ("gradient", "ablation", "activation"),
              f"apd.attribution_type={a.attribution_type!r}; use 'gradient', 'ablation' or 'activation'.")
        check(a.attribution_model in ("target", "apd"), f"apd.attribution_model={a.attribution_model!r}; use 'target' or 'apd'.")
        check(a.attribution_chunk is None or a.attribution_chunk > 0, f"apd.attribution_chunk={a.attribution_chunk}: must be > 0.")
        check(a.schatten_p > 0, f"apd.schatten_p={a.schatten_p}: must be > 0.")
        for name in ("param_match_coeff", "topk_recon_coeff", "act_recon_coeff", "schatten_coeff"):
            check(getattr(a, name) >= 0, f"apd.{name}={getattr(a, name)}: must be ≥ 0.")
        check(a.init_scale > 0, f"apd.init_scale={a.init_scale}: must be > 0.")
        cs = set({**cfg.targets, **cfg.identity_targets}.values())
        check(a.C is not None or len(cs) <= 1,
              f"APD components span every site, so the targets need one common C (got {sorted(cs)}); or set apd.C.")

    @classmethod
    def resolve(cls, cfg: DecomposeConfig, C: dict[str, int]) -> DecomposeConfig:
        """Fill in `apd.C`, so a saved config names it."""
        return dataclasses.replace(cfg, apd=dataclasses.replace(cfg.apd, C=n_components(cfg.apd, C)))

    @classmethod
    def layout(cls, sites: list[Site], C: dict[str, int], cfg: DecomposeConfig) -> Layout:
        """C·m rank-one columns per site, grouped m at a time; no CI functions."""
        cols, ranks = apd_layout(sites, C, cfg.apd)
        return Layout(cols, ranks, None)

    # -- setup and the optimizer-step hooks ----------------------------------------------------------------------

    @torch.no_grad()
    def init_components(self, cm: ComponentModel) -> None:
        """Kaiming-uniform factors (fan-in d_in·m for V, m·d_out for U) times `init_scale`; unit-norm V if enabled."""
        for comps in self._owned(cm):
            _, m = groups(comps)
            for param, fan_in in ((comps.V_param, comps.d_in * m), (comps.U_param, m * comps.d_out)):
                bound = self.a.init_scale * math.sqrt(6.0 / fan_in)
                param.uniform_(-bound, bound)
        self.after_step(cm)

    def _owned(self, cm: ComponentModel) -> list[SiteComponents]:
        return [c for c in (cm.component(n) for n in cm.site_names) if not c.tied]

    @torch.no_grad()
    def after_backward(self, cm: ComponentModel) -> None:
        """With unit-norm matrices: drop each V column's gradient component along that (unit) column."""
        if not self.a.unit_norm_matrices:
            return
        for comps in self._owned(cm):
            V = comps.V_param
            if V.grad is not None:
                V.grad.sub_((V.grad * V).sum(0, keepdim=True) * V)

    @torch.no_grad()
    def after_step(self, cm: ComponentModel) -> None:
        """With unit-norm matrices: rescale every column of V (the reference's A) to unit norm over d_in."""
        if not self.a.unit_norm_matrices:
            return
        for comps in self._owned(cm):
            comps.V_param.div_(comps.V_param.norm(dim=0, keepdim=True).clamp_min(1e-12))

    # -- one step ------------------------------------------------------------------------------------------------

    def act_sites(self, cm: ComponentModel) -> list[str]:
        names = [n for n in cm.site_names if any(fnmatch.fnmatch(n, p) for p in self.a.act_recon_sites)]
        if not names:
            raise ConfigError(f"apd.act_recon_coeff > 0 but apd.act_recon_sites={self.a.act_recon_sites} match no site; "
                              f"the sites are {cm.site_names}.")
        return names

    def prepare(self, cm: ComponentModel, batch: object) -> APDContext:
        """Target output, site inputs/outputs, attribution scores `[..., C]` and the top-k mask."""
        a = self.a
        if a.attribution_type == "gradient" and a.attribution_model == "target":
            scores, target_out, inputs, outputs = gradient_attributions(cm, batch, False, a.attribution_chunk)
        else:
            outputs = {}
            with torch.no_grad():
                target_out, inputs = cm(batch, cache=True, outputs=outputs)
            if a.attribution_type == "gradient":
                scores = gradient_attributions(cm, batch, True, a.attribution_chunk)[0]
            elif a.attribution_type == "activation":
                acts_in = inputs
                if a.attribution_model == "apd":
                    with torch.no_grad():
                        _, acts_in = cm(batch, masks=full_masks(cm), cache=True)
                scores = activation_attributions(cm, acts_in)
            else:
                scores = ablation_attributions(cm, batch)
        ranked = scores[..., :-1] if a.distil_from_target else scores
        mask = self.topk(ranked)
        if a.distil_from_target:
            mask = torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)
        return APDContext(batch, target_out.detach(), inputs, outputs, scores, mask)

    def topk(self, scores: torch.Tensor) -> torch.Tensor:
        """The top-k mask of this rank's positions; batch top-k ranks the scores of the whole global batch."""
        if not (self.a.batch_topk and self.world_size > 1):
            return topk_mask(scores, self.a.topk, self.a.batch_topk)
        mask = topk_mask(distributed.all_gather_cat(scores), self.a.topk, True)
        n = scores.shape[0]
        rank = distributed.current().rank
        return mask[rank * n:(rank + 1) * n]

    def masks(self, cm: ComponentModel, mask: torch.Tensor) -> dict[str, SiteMask]:
        """The shared forward's masks for a per-component mask `[..., C]` (no delta component)."""
        return {n: SiteMask(self.site_mask(cm, n, mask)) for n in cm.site_names}

    @staticmethod
    def site_mask(cm: ComponentModel, name: str, mask: torch.Tensor) -> torch.Tensor:
        """A per-component mask `[..., C]` as site `name`'s per-column mask `[..., C·m]`."""
        comps = cm.component(name)
        return expand(mask.to(comps.V.dtype), comps.group_size)

    def terms(self, cm: ComponentModel, ctx: APDContext, which: set[str]) -> dict[str, torch.Tensor]:
        """The named loss terms (param_match, topk_recon, act_recon, schatten) on this step's context."""
        out: dict[str, torch.Tensor] = {}
        if "param_match" in which:
            out["param_match"] = cm.faithfulness()
        if which & {"topk_recon", "act_recon"}:
            acts: dict[str, torch.Tensor] | None = {} if "act_recon" in which else None
            out_topk, _ = cm(ctx.batch, masks=self.masks(cm, ctx.mask), outputs=acts)
            if "topk_recon" in which:
                out["topk_recon"] = self.divergence(out_topk, ctx.target_out)
            if acts is not None:
                out["act_recon"] = act_recon(ctx.outputs, acts, self.act_sites(cm))
        if "schatten" in which:
            out["schatten"] = schatten(cm, ctx.mask, self.a.schatten_p)
        return out

    def coefficients(self) -> dict[str, float]:
        a = self.a
        return {"param_match": a.param_match_coeff, "topk_recon": a.topk_recon_coeff, "act_recon": a.act_recon_coeff,
                "schatten": a.schatten_coeff}

    def loss(self, cm: ComponentModel, batch: Any, frac: float) -> StepOutput:
        """Σ coeff · term over the terms with a positive coefficient; their raw values; the top-k mask as importances."""
        ctx = self.prepare(cm, batch)
        coeffs = {k: c for k, c in self.coefficients().items() if c > 0}
        total = torch.zeros((), device=ctx.target_out.device)
        terms = {}
        for name, value in self.terms(cm, ctx, set(coeffs)).items():
            if not torch.isfinite(value):
                bad = [n for n in cm.site_names if not (torch.isfinite(cm.component(n).V).all() and torch.isfinite(cm.component(n).U).all())]
                raise FloatingPointError(f"APD loss term {name!r} is {value.item()} (not finite)"
                                         + (f"; non-finite components at sites {bad}" if bad else ""))
            terms[name] = value.detach()
            total = total + coeffs[name] * value
        return StepOutput(total, terms, {"topk": ctx.mask.float()})

    def evaluate(self, cm: ComponentModel, batch: Any) -> dict[str, float]:
        """Param match (as `faithfulness`), top-k and all-on reconstruction, the other terms, active and live components."""
        ctx = self.prepare(cm, batch)
        which = {"param_match", "topk_recon", "schatten"} | ({"act_recon"} if self.a.act_recon_coeff > 0 else set())
        values = {k: v.item() for k, v in self.terms(cm, ctx, which).items()}
        out_full, _ = cm(batch, masks=full_masks(cm))
        active = ctx.mask.flatten(0, -2)
        return {"faithfulness": values.pop("param_match"), **values,
                "unmasked_recon": self.divergence(out_full, ctx.target_out).item(),
                "l0/topk": active.float().sum(-1).mean().item(), "live/topk": int(active.any(0).sum())}

    # -- reading the result ---------------------------------------------------------------------------------------

    def importances(self, cm: ComponentModel, batch: Any,
                    inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per site, the columns of the components this batch's top-k selection switched on (1) or off (0); the
        selection needs its own attribution pass, so `inputs` is not used."""
        with torch.enable_grad():
            mask = self.prepare(cm, batch).mask.float()
        return {n: self.site_mask(cm, n, mask) for n in cm.site_names if inputs is None or n in inputs}

    def probe_metrics(self, dec: Any, probes: torch.Tensor) -> dict[str, float]:
        """One mechanism per feature: split, shared and dead features from the attributions on the probes."""
        scores = probe_attributions(dec.cm, probes, self.a).float().cpu()
        return {f"apd/{k}": v for k, v in mechanism_counts(scores).items()}
