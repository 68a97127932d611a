"""Persistent adversarial sources: per site a tensor r ∈ [0, 1]^{positions × (C + 1)} (the last entry masks the
delta component) with its Adam ascent state, kept from step to step and tied to batch slots, not to data."""
from __future__ import annotations

import torch

from decomp_hooks.methods.vpd.config import VPDConfig


class PersistentSources:
    """The adversary's sources and Adam moments per site, created at the first batch's shape; `t` counts the
    completed update rounds (shared by all sites and slots)."""

    def __init__(self, cfg: VPDConfig):
        self.cfg = cfg
        self.r: dict[str, torch.Tensor] = {}
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t = 0

    def ensure(self, shapes: dict[str, tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
        """The sources for these shapes `(*positions, C + 1)`, drawn U(0, 1) the first time; a batch of another
        shape is an error, since sources belong to batch slots."""
        for name, shape in shapes.items():
            if name not in self.r:
                self.r[name] = torch.rand(shape, device=device)
                self.m[name], self.v[name] = torch.zeros_like(self.r[name]), torch.zeros_like(self.r[name])
            elif tuple(self.r[name].shape) != tuple(shape):
                raise ValueError(f"VPD's persistent sources of site {name!r} have shape {tuple(self.r[name].shape)} "
                                 f"but this batch needs {tuple(shape)}; every training batch must have the same shape "
                                 "(drop or pad a short last batch).")
            if self.r[name].device != device:
                for state in (self.r, self.m, self.v):
                    state[name] = state[name].to(device)
        return self.r

    @torch.no_grad()
    def ascend(self, grads: dict[str, torch.Tensor], lr: float, t: int, rows: slice = slice(None)) -> None:
        """The `t`-th bias-corrected Adam step up the loss gradient on the batch slots `rows` (one micro-batch's, or
        all), then clamp the sources to [0, 1]. Adam works elementwise, so updating the slots of each micro-batch
        with the same `t` is the update of the whole batch."""
        b1, b2 = self.cfg.betas
        for name, g in grads.items():
            m, v, r = self.m[name][rows], self.v[name][rows], self.r[name][rows]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            r.add_(lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + self.cfg.eps)).clamp_(0, 1)

    def lr(self, frac: float) -> float:
        """The source learning rate at training progress `frac`: linear warm-up from 0, then constant."""
        warm = self.cfg.lr_warmup_frac
        return self.cfg.lr * min(frac / warm, 1.0) if warm > 0 else self.cfg.lr

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"t": torch.tensor(self.t)}
        for key, state in (("r", self.r), ("m", self.m), ("v", self.v)):
            out.update({f"{key}.{name}": t for name, t in state.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.t = int(state["t"]) if "t" in state else 0
        for key, target in (("r", self.r), ("m", self.m), ("v", self.v)):
            target.clear()
            target.update({k[len(key) + 1:]: v.clone() for k, v in state.items() if k.startswith(key + ".")})
