"""Attribution-based Parameter Decomposition (APD; methods.md Part 2) as a method on the shared engine.

A component c spans every decomposed site. At site l it is the rank-m_l matrix made of the m_l consecutive rank-one
columns `c·m_l … c·m_l + m_l − 1` of that site's `SiteComponents` (its `group_size`), so `V` has C·m_l columns and
`P_{c,l} = V[:, c] U[c, :]` summed over the group. Per input, the components with the largest attributions are on
(batch or per-sample top-k); a `[..., C]` mask becomes the shared masked forward's `[..., C·m]` mask by
`repeat_interleave(m)`, without the delta component (APD matches parameters with a loss instead). Losses (§2.4, with
the reference code's normalisations): parameter matching, top-k reconstruction, hidden-activation reconstruction
(ResidMLP) and the Schatten-p simplicity penalty weighted by how often each component is on.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from decomp_hooks import distributed
from decomp_hooks.component_model import CausalImportance, ComponentModel, output_tensor
from decomp_hooks.components import SiteComponents, SiteMask, intervention_mask
from decomp_hooks.config import APDConfig, ConfigError, DecomposeConfig
from decomp_hooks.metrics import kl_logits, mse
from decomp_hooks.sites import Site
from decomp_hooks.spd import faithfulness

Forward = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

#: the Schatten penalty's guard against infinite gradients of s^{p/2} at s = 0 (the reference's 1e-16)
SCHATTEN_EPS = 1e-16


# -- layout: C components of rank m per site as C·m rank-one columns ---------------------------------------------


def site_rank(site: Site, apd: APDConfig) -> int:
    """m for one site: `apd.rank`, or full rank min(d_in, d_out) when it is None."""
    return apd.rank if apd.rank is not None else min(site.d_in, site.d_out)


def n_components(apd: APDConfig, C: dict[str, int]) -> int:
    """APD's C: `apd.C`, else the one C every target names."""
    if apd.C is not None:
        return apd.C
    values = set(C.values())
    if len(values) != 1:
        raise ConfigError(f"APD components span every site, so the targets need one common C (got {sorted(values)}); or set apd.C.")
    return values.pop()


def apd_layout(sites: list[Site], C: dict[str, int], apd: APDConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Rank-one columns per site (C·m) and the rank m per site, for `ComponentModel(..., group_size=ranks)`."""
    n = n_components(apd, C)
    ranks = {s.name: site_rank(s, apd) for s in sites}
    return {s.name: n * ranks[s.name] for s in sites}, ranks


def groups(comps: SiteComponents) -> tuple[int, int]:
    """(number of components, rank m) of one site."""
    return comps.C // comps.group_size, comps.group_size


def expand(mask: torch.Tensor, m: int) -> torch.Tensor:
    """A per-component mask `[..., C]` as the per-column mask `[..., C·m]` of the shared forward."""
    return mask.repeat_interleave(m, dim=-1) if m > 1 else mask


def component_outputs(comps: SiteComponents, x: torch.Tensor) -> torch.Tensor:
    """Each component's contribution to the site output, `x P_c` (bias excluded): `[..., C, d_out]`."""
    C, m = groups(comps)
    inner = comps.inner_acts(x if comps.kind == "embedding" else x.to(comps.V.dtype))
    return torch.einsum("...ck,cko->...co", inner.unflatten(-1, (C, m)), comps.U.reshape(C, m, comps.d_out))


# -- attributions ------------------------------------------------------------------------------------------------


def _run_target(cm: ComponentModel, batch: Any) -> torch.Tensor:
    return output_tensor(cm.target(**batch) if isinstance(batch, dict) else cm.target(batch))


def gradient_attributions(cm: ComponentModel, batch: Any, apd_model: bool = False, chunk: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`score_c(x) = Σ_o (Σ_l ⟨∂f_o/∂post_l, pre_l P_{c,l}⟩)²` (methods.md §2.2, the code's form: no sqrt, no 1/d_L).

    The gradients of all d_out outputs come from batched vector-Jacobian products: one `autograd.grad` call with
    `is_grads_batched=True` over the output directions (`chunk` of them per call, all by default). They are taken at
    the target's parameters, or at the APD model's (all components on) with `apd_model`. Returns the scores
    `[..., C]`, the model output, and the site inputs and outputs of that forward (all detached).
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def site_fn(name: str):
        comps = cm.component(name)

        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            inputs[name] = x.detach()
            if apd_model:
                out = comps(x, SiteMask(torch.ones((), device=out.device, dtype=comps.V.dtype)), target_out=out).to(out.dtype)
            outputs[name] = out.detach()
            probes[name] = torch.zeros_like(out, requires_grad=True)  # ∂f/∂probe = ∂f/∂post, through every later site
            return out + probes[name]
        return fn

    handles = [site.hook(site_fn(name)) for name, site in cm.sites.items()]
    try:
        with torch.enable_grad():
            out = _run_target(cm, batch)
    finally:
        for h in handles:
            h.remove()
    names = list(probes)
    with torch.no_grad():
        contrib = {n: component_outputs(cm.component(n), inputs[n]).float() for n in names}
    d = out.shape[-1]
    step = chunk or d
    eye = torch.eye(d, device=out.device, dtype=out.dtype)
    scores = None
    for start in range(0, d, step):
        k = min(step, d - start)
        directions = eye[start:start + k].reshape(k, *(1,) * (out.dim() - 1), d).expand(k, *out.shape)
        grads = torch.autograd.grad(out, [probes[n] for n in names], grad_outputs=directions, is_grads_batched=True,
                                    retain_graph=start + k < d, allow_unused=True)
        with torch.no_grad():
            attr = sum(torch.einsum("k...o,...co->k...c", g.float(), contrib[n]) for g, n in zip(grads, names) if g is not None)
            if not isinstance(attr, torch.Tensor):
                raise ValueError("the model output does not depend on any decomposed site; gradient attributions are all 0.")
            part = attr.pow(2).sum(0)
            scores = part if scores is None else scores + part
    return scores, out.detach(), inputs, outputs


def activation_attributions(cm: ComponentModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """`score_c(x) = Σ_l ‖pre_l P_{c,l}‖²`: the squared norm of each component's output, summed over sites."""
    with torch.no_grad():
        return sum(component_outputs(cm.component(n), x).float().pow(2).sum(-1) for n, x in inputs.items())


def _repeat_batch(batch: Any, k: int) -> Any:
    if isinstance(batch, dict):
        return {key: _repeat_batch(v, k) for key, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.repeat(k, *(1,) * (batch.dim() - 1))
    return batch


def full_masks(cm: ComponentModel) -> dict[str, SiteMask]:
    """Every component on at every site, no delta: the APD model `Σ_c P_c`."""
    return {n: SiteMask(torch.ones((), device=cm.component(n).V.device)) for n in cm.site_names}


def ablation_attributions(cm: ComponentModel, batch: Any, max_positions: int = 1 << 16) -> torch.Tensor:
    """`score_c(x) = mean_o (f_o(x | Σ P) − f_o(x | Σ_{c'≠c} P_{c'}))²`: the output change when c alone is off.

    The C ablated forwards run as few batched forwards over the batch repeated, up to `max_positions` at a time.
    """
    with torch.no_grad():
        out_full, _ = cm(batch, masks=full_masks(cm))
        B, extra = out_full.shape[0], out_full.dim() - 2
        C = groups(cm.component(cm.site_names[0]))[0]
        k = max(1, min(C, max_positions // max(out_full[..., 0].numel(), 1)))
        parts = []
        for start in range(0, C, k):
            idx = torch.arange(start, min(C, start + k), device=out_full.device)
            kk = len(idx)
            off = torch.ones(kk, C, device=out_full.device)
            off[torch.arange(kk, device=off.device), idx] = 0.0
            masks = {}
            for n in cm.site_names:
                m = expand(off, cm.component(n).group_size).repeat_interleave(B, dim=0)
                masks[n] = SiteMask(m.view(kk * B, *(1,) * extra, m.shape[-1]))
            out, _ = cm(_repeat_batch(batch, kk), masks=masks)
            diff = (out.float() - out_full.float().repeat(kk, *(1,) * (out_full.dim() - 1))).pow(2).mean(-1)
            parts.append(diff.unflatten(0, (kk, B)).movedim(0, -1))
        return torch.cat(parts, dim=-1)


# -- top-k and the loss terms ------------------------------------------------------------------------------------


def topk_mask(scores: torch.Tensor, topk: float, batch_topk: bool = True) -> torch.Tensor:
    """Boolean `[..., C]`: batch top-k keeps the floor(topk·N) largest of all N·C scores (N positions), per-sample
    top-k the int(topk) largest of each position's C."""
    if batch_topk:
        flat = scores.flatten()
        k = min(int(topk * scores[..., 0].numel()), flat.numel())
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if k > 0:
            mask[flat.topk(k).indices] = True
        return mask.view_as(scores)
    k = min(int(topk), scores.shape[-1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return mask


def n_params(cm: ComponentModel) -> int:
    """Σ_l d_in·d_out over the decomposed sites (the reference's normalisation of param match and Schatten)."""
    return sum(c.d_in * c.d_out for c in (cm.component(n) for n in cm.site_names))


def schatten(cm: ComponentModel, mask: torch.Tensor, p: float) -> torch.Tensor:
    """`(1/(N_params·N)) Σ_n Σ_l Σ_c mask_{n,c} Σ_m (‖V_{:,cm}‖²‖U_{cm,:}‖² + 1e-16)^{p/2}` over N positions."""
    counts = mask.flatten(0, -2).float().sum(0)  # [C]: how often each component is on
    total = torch.zeros((), device=mask.device)
    for n in cm.site_names:
        comps = cm.component(n)
        C, m = groups(comps)
        s = (comps.V.float().pow(2).sum(0) * comps.U.float().pow(2).sum(1) + SCHATTEN_EPS).pow(p / 2)
        total = total + (counts * s.view(C, m).sum(-1)).sum()
    return total / (n_params(cm) * max(mask[..., 0].numel(), 1))


def act_recon(target_acts: dict[str, torch.Tensor], acts: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """`mean_n Σ_l ‖ReLU(h_l^target) − ReLU(h_l)‖² / Σ_l d_l` over the chosen sites' outputs."""
    sq = sum((F.relu(acts[n].float()) - F.relu(target_acts[n].float())).pow(2).sum(-1) for n in names)
    return (sq / sum(target_acts[n].shape[-1] for n in names)).mean()


@dataclass
class APDContext:
    """One step's shared quantities. `ci` holds the top-k mask under the name "topk", for the trainer's L0 log."""

    fwd: Forward
    batch: object
    target_out: torch.Tensor
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    scores: torch.Tensor
    mask: torch.Tensor
    ci: dict[str, CausalImportance]


class APD:
    """The APD objective on a ComponentModel built by `ComponentModel.from_config` (no CI functions, grouped columns)."""

    n_components = staticmethod(n_components)

    def __init__(self, cfg: DecomposeConfig, world_size: int = 1):
        self.cfg, self.a = cfg, cfg.apd
        self.world_size = world_size
        self.divergence = kl_logits if cfg.output_loss == "kl" else mse

    # -- setup and the optimizer-step hooks ----------------------------------------------------------------------

    @torch.no_grad()
    def init_components(self, cm: ComponentModel) -> None:
        """Kaiming-uniform factors (fan-in d_in·m for V, m·d_out for U) times `init_scale`; unit-norm V if enabled."""
        for n in cm.site_names:
            comps = cm.component(n)
            if comps.tied:
                continue
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

    def current_p(self, frac: float) -> float | None:
        return None

    # -- one step ------------------------------------------------------------------------------------------------

    def act_sites(self, cm: ComponentModel) -> list[str]:
        names = [n for n in cm.site_names if any(fnmatch.fnmatch(n, p) for p in self.a.act_recon_sites)]
        if not names:
            raise ConfigError(f"apd.act_recon_coeff > 0 but apd.act_recon_sites={self.a.act_recon_sites} match no site; "
                              f"the sites are {cm.site_names}.")
        return names

    def prepare(self, cm: ComponentModel, fwd: Forward, batch: object) -> APDContext:
        """Target output, site inputs/outputs, attribution scores `[..., C]` and the top-k mask."""
        a = self.a
        if a.attribution_type == "gradient" and a.attribution_model == "target":
            scores, target_out, inputs, outputs = gradient_attributions(cm, batch, False, a.attribution_chunk)
        else:
            outputs = {}
            with torch.no_grad():
                target_out, inputs = fwd(batch, cache=True, outputs=outputs)
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
        m = mask.float()
        return APDContext(fwd, batch, target_out.detach(), inputs, outputs, scores, mask, {"topk": CausalImportance(m, m)})

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
        out = {}
        for n in cm.site_names:
            comps = cm.component(n)
            out[n] = SiteMask(expand(mask.to(comps.V.dtype), comps.group_size))
        return out

    def terms(self, cm: ComponentModel, ctx: APDContext, which: set[str]) -> dict[str, torch.Tensor]:
        """The named loss terms (param_match, topk_recon, act_recon, schatten) on this step's context."""
        out: dict[str, torch.Tensor] = {}
        if "param_match" in which:
            out["param_match"] = faithfulness(cm, {n: cm.component(n).delta_weight() for n in cm.site_names})
        if which & {"topk_recon", "act_recon"}:
            acts: dict[str, torch.Tensor] | None = {} if "act_recon" in which else None
            out_topk, _ = ctx.fwd(ctx.batch, masks=self.masks(cm, ctx.mask), outputs=acts)
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

    def loss(self, cm: ComponentModel, fwd: Forward, batch: object, frac: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], APDContext]:
        """Σ coeff · term over the terms with a positive coefficient; their raw values; the step context."""
        ctx = self.prepare(cm, fwd, batch)
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
        return total, terms, ctx

    def evaluate(self, cm: ComponentModel, fwd: Forward, batch: object) -> dict[str, float]:
        """Param match (as `faithfulness`), top-k and all-on reconstruction, the other terms, active and live components."""
        ctx = self.prepare(cm, fwd, batch)
        which = {"param_match", "topk_recon", "schatten"} | ({"act_recon"} if self.a.act_recon_coeff > 0 else set())
        values = {k: v.item() for k, v in self.terms(cm, ctx, which).items()}
        out_full, _ = fwd(batch, masks=full_masks(cm))
        active = ctx.mask.flatten(0, -2)
        return {"faithfulness": values.pop("param_match"), **values,
                "unmasked_recon": self.divergence(out_full, ctx.target_out).item(),
                "l0/topk": active.float().sum(-1).mean().item(), "live/topk": int(active.any(0).sum())}


def component_weights(comps: SiteComponents) -> torch.Tensor:
    """The C component matrices of one site, `P_{c}` in canonical orientation: `[C, d_out, d_in]`."""
    C, m = groups(comps)
    return torch.einsum("ick,cko->coi", comps.V.reshape(comps.d_in, C, m), comps.U.reshape(C, m, comps.d_out))


def component_masks(cm: ComponentModel, keep: list[int] | None = None, ablate: list[int] | None = None,
                    device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per-site column masks `[C·m_l]` switching whole APD components (which span every site): only `keep` on (if
    given), `ablate` off. For `Decomposition.site_masks(masks=..., delta=False)` / `.run`."""
    mask = intervention_mask(groups(cm.component(cm.site_names[0]))[0], keep, ablate, device=device)
    return {n: expand(mask, cm.component(n).group_size) for n in cm.site_names}


def probe_attributions(cm: ComponentModel, probes: torch.Tensor, cfg: APDConfig) -> torch.Tensor:
    """The configured attribution scores `[n_probes, C]` of each component on a batch of probe inputs."""
    if cfg.attribution_type == "gradient":
        return gradient_attributions(cm, probes, cfg.attribution_model == "apd", cfg.attribution_chunk)[0]
    if cfg.attribution_type == "ablation":
        return ablation_attributions(cm, probes)
    with torch.no_grad():
        masks = full_masks(cm) if cfg.attribution_model == "apd" else {}
        _, inputs = cm(probes, masks=masks, cache=True)
    return activation_attributions(cm, inputs)


def mechanism_counts(scores: torch.Tensor, rel: float = 0.1) -> dict[str, int]:
    """From one-hot probe attributions `[n_features, C]`: `split_features`, features with more than one component
    attributed ≥ `rel` × that feature's largest; `shared_components`, features whose top component is also another
    feature's (n_features − distinct top components); `dead_features`, features with no attribution at all."""
    top = scores.max(-1)
    live = top.values > 0
    split = ((scores >= rel * top.values[:, None]) & live[:, None]).sum(-1) > 1
    distinct = len(set(top.indices[live].tolist()))
    return {"split_features": int(split.sum()), "shared_components": int(live.sum()) - distinct,
            "dead_features": int((~live).sum())}
