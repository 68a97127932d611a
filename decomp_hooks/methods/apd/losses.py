"""APD's selection and loss terms: top-k masks, Schatten-p simplicity, hidden-activation reconstruction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from decomp_hooks.component_model import ComponentModel
from decomp_hooks.methods.apd.layout import groups

#: the Schatten penalty's guard against infinite gradients of s^{p/2} at s = 0 (the reference's 1e-16)
SCHATTEN_EPS = 1e-16

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


