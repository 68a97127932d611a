"""Attribution scores `[..., C]`: how much each APD component matters for an input (gradient, activation or
ablation attributions), and the probe attributions the toys score."""
from __future__ import annotations

from typing import Any

import torch

from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteMask
from decomp_hooks.methods.apd.config import APDConfig
from decomp_hooks.methods.apd.layout import component_outputs, expand, full_masks, groups
from decomp_hooks.model_call import run_model


def gradient_attributions(cm: ComponentModel, batch: Any, apd_model: bool = False, chunk: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`score_c(x) = Σ_o (Σ_l ⟨∂f_o/∂post_l, pre_l P_{c,l}⟩)²` (docs/methods/apd.md#attributions; the reference code's form: no sqrt, no 1/d_L).

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
            out = run_model(cm.target, batch)
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

