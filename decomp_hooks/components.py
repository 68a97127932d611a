"""Rank-one components of one site, the delta component, and the one masked forward every consumer shares.

`out = ((a V) ⊙ m) U + m_δ · a ΔWᵀ + b` with ΔW = W_target − (V U)ᵀ (docs/concepts.md); unrouted positions
keep the target output. Training, evaluation, interventions and exports all call `SiteComponents.forward`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from decomp_hooks.sites import Site, SiteKind


@dataclass
class SiteMask:
    """How one site runs in a forward: component mask `[..., C]`, delta mask `[...]` (None = no delta), routing `[...]`."""

    component: torch.Tensor
    delta: torch.Tensor | None = None
    route: torch.Tensor | None = None


def intervention_mask(C: int, keep: list[int] | None = None, ablate: list[int] | None = None,
                      scale: dict[int, float] | None = None, device: torch.device | None = None) -> torch.Tensor:
    """A component mask `[C]`: only `keep` on (if given), `ablate` off, `scale` multiplying chosen components."""
    mask = torch.ones(C, device=device)
    if keep is not None:
        mask = torch.zeros(C, device=device)
        mask[list(keep)] = 1.0
    if ablate:
        mask[list(ablate)] = 0.0
    if scale:
        mask[list(scale)] *= torch.tensor(list(scale.values()), dtype=mask.dtype, device=device)
    return mask


class SiteComponents(nn.Module):
    """C rank-one components `V [d_in, C]`, `U [C, d_out]` of one site, with its frozen target weight and bias.

    `group_size` g > 1 (APD): consecutive runs of g columns form one rank-g component, C // g of them.
    """

    def __init__(self, site: Site, C: int, init: str = "kaiming", tied_to: "SiteComponents | None" = None,
                 group_size: int = 1):
        super().__init__()
        if C % group_size:
            raise ValueError(f"site {site.name!r}: C={C} is not a multiple of group_size={group_size}.")
        self.kind, self.C, self.d_in, self.d_out = SiteKind(site.kind), C, site.d_in, site.d_out
        self.group_size = group_size
        weight = site.weight().float()
        self.register_buffer("target_weight", weight.T.contiguous().clone())  # [d_in, d_out], as the forward uses it
        bias = site.bias()
        self.register_buffer("bias", None if bias is None else bias.float().clone())
        self._tied = [tied_to] if tied_to is not None else []  # a list keeps the source out of this module's params
        if tied_to is None:
            self.V_param = nn.Parameter(torch.empty(self.d_in, C))
            self.U_param = nn.Parameter(torch.empty(C, self.d_out))
            self.reset_parameters(init)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    @property
    def V(self) -> torch.Tensor:
        return self._tied[0].U_param.T if self._tied else self.V_param

    @property
    def U(self) -> torch.Tensor:
        return self._tied[0].V_param.T if self._tied else self.U_param

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        """Kaiming normal (SPD main), or the paper's unit-norm factors scaled by their overlap with W."""
        nn.init.normal_(self.V_param, std=1 / math.sqrt(self.d_in))
        nn.init.normal_(self.U_param, std=1 / math.sqrt(self.C))
        if init == "paper":
            self.V_param.div_(self.V_param.norm(dim=0, keepdim=True))
            self.U_param.div_(self.U_param.norm(dim=1, keepdim=True))
            overlap = torch.einsum("ic,co,io->c", self.V_param, self.U_param, self.target_weight)
            self.V_param.mul_(overlap)

    def weight(self) -> torch.Tensor:
        """The decomposed weight `(V U)ᵀ` in canonical orientation `[d_out, d_in]`."""
        return (self.V @ self.U).T

    def delta_weight(self) -> torch.Tensor:
        """ΔW in forward orientation `[d_in, d_out]`; gradients flow into U and V."""
        return self.target_weight - self.V @ self.U

    def inner_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Component activations `a V` (`[..., C]`); for embeddings the rows of V at the token ids."""
        return self.V[x] if self.kind.reads_tokens else x @ self.V

    def _apply_delta(self, x: torch.Tensor, delta_w: torch.Tensor) -> torch.Tensor:
        return delta_w[x] if self.kind.reads_tokens else x @ delta_w

    def _delta_from_target(self, acts: torch.Tensor, mask: SiteMask, target_out: torch.Tensor) -> torch.Tensor:
        """`((x V) ⊙ (m − m_δ)) U + m_δ (target − b) + b` as one matmul and one fused multiply-add: the bias term
        `(1 − m_δ) b` rides along as an extra column of the matmul."""
        m_delta = mask.delta.unsqueeze(-1)
        coeff = acts * (mask.component - m_delta)
        if self.bias is None:
            out = coeff @ self.U
        else:
            bias_coeff = (1 - m_delta).to(coeff.dtype).expand(*coeff.shape[:-1], 1)
            out = torch.cat([coeff, bias_coeff], -1) @ torch.cat([self.U, self.bias.unsqueeze(0)])
        return torch.addcmul(out, m_delta.to(out.dtype), target_out.to(out.dtype))  # bf16 under autocast, like the matmul

    def forward(self, x: torch.Tensor, mask: SiteMask, target_out: torch.Tensor | None = None,
                delta_w: torch.Tensor | None = None, inner: torch.Tensor | None = None) -> torch.Tensor:
        """The masked site output.

        `inner` is `x V` when the caller already holds it for this very input (the target pass's, reused). With the
        target output `x Wᵀ + b` at hand, the delta term needs no ΔW: m_δ·x ΔW = m_δ·(target − b − (x V) U) folds into
        the component matmul, `((x V) ⊙ (m − m_δ)) U + m_δ (target − b)`. Without it, ΔW is `delta_w` or computed.
        """
        if not self.kind.reads_tokens and x.dtype != self.V.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.V.dtype)
        acts = self.inner_acts(x) if inner is None else inner
        if mask.delta is not None and target_out is not None and (target_out.requires_grad or not x.requires_grad):
            out = self._delta_from_target(acts, mask, target_out)
        else:
            out = (acts * mask.component) @ self.U
            if mask.delta is not None:
                dw = self.delta_weight() if delta_w is None else delta_w
                out = out + mask.delta.unsqueeze(-1) * self._apply_delta(x, dw)
            if self.bias is not None:
                out = out + self.bias
        if mask.route is not None:
            if target_out is None:
                raise ValueError("a routed site mask needs the target output to fall back on")
            out = torch.where(mask.route.unsqueeze(-1), out, target_out.to(out.dtype))
        return out
