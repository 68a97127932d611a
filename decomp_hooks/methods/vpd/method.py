"""VPD as a Method: SPD's engine and loss terms, plus `persistent_pgd_recon`, the reconstruction under adversarial
masks `g + (1 − g)·r` whose sources r persist across steps (docs/methods/vpd.md).

Each step: `warmup_updates` Adam ascent updates of the sources on the reconstruction loss, then the loss at the
current sources enters the total (its gradient reaches the components and CI functions through g); the same
backward gives its gradient with respect to the sources (divided by the term's weight in the total), applied after
the optimizer step.
"""
from __future__ import annotations

import torch

from decomp_hooks.config import DecomposeConfig, check
from decomp_hooks.methods.spd.context import StepContext
from decomp_hooks.methods.spd.method import SPD
from decomp_hooks.methods.spd.terms.base import Term
from decomp_hooks.methods.spd.terms.pgd import pgd_masks
from decomp_hooks.methods.vpd.sources import PersistentSources


def _persistent_pgd_recon(vpd: "VPD", ctx: StepContext, lc, frac: float) -> torch.Tensor:
    return vpd.adversarial_recon(ctx, frac)


class VPD(SPD):
    """SPD trained against a persistent adversary (`vpd:`), every site masked by it at once."""

    name = "vpd"
    section = "vpd"
    terms = {**SPD.terms, "persistent_pgd_recon": Term(_persistent_pgd_recon)}

    def __init__(self, cfg: DecomposeConfig, world_size: int = 1):
        super().__init__(cfg, world_size)
        self.adversary = PersistentSources(cfg.vpd)
        self.micro_batches = self.batch_shards // world_size
        self.micro = 0  # which micro-batch of this step comes next
        self.pending: list[tuple[dict[str, torch.Tensor], float, slice]] = []  # (source leaves, lr, rows)

    @classmethod
    def validate(cls, cfg: DecomposeConfig) -> None:
        super().validate(cfg)
        v = cfg.vpd
        check(v.lr >= 0, f"vpd.lr={v.lr}: must be ≥ 0.")
        check(0 <= v.lr_warmup_frac <= 1, f"vpd.lr_warmup_frac={v.lr_warmup_frac}: must be in [0, 1].")
        check(len(v.betas) == 2 and all(0 <= b < 1 for b in v.betas), f"vpd.betas={v.betas}: two values in [0, 1).")
        check(v.eps > 0, f"vpd.eps={v.eps}: must be > 0.")
        check(v.warmup_updates >= 0, f"vpd.warmup_updates={v.warmup_updates}: must be ≥ 0.")
        for i, lc in enumerate(cfg.losses):
            check(lc.type != "persistent_pgd_recon" or lc.coeff > 0,
                  f"losses[{i}].coeff=0 for persistent_pgd_recon: an adversary that nothing trains against; remove "
                  "the term (or give it a coefficient > 0).")

    def adversarial_recon(self, ctx: StepContext, frac: float) -> torch.Tensor:
        """The persistent adversary's reconstruction loss on this micro-batch (after its warm-up updates). The
        sources cover the process's whole batch; each micro-batch reads and updates its own rows of them."""
        group = {n: None for n in ctx.ci}
        rows_per = next(iter(ctx.ci.values())).lower.shape[0]
        shapes = {n: (rows_per * self.micro_batches, *c.lower.shape[1:-1], c.lower.shape[-1] + 1)
                  for n, c in ctx.ci.items()}
        rows = slice(self.micro * rows_per, (self.micro + 1) * rows_per)
        self.micro += 1
        sources = self.adversary.ensure(shapes, next(iter(ctx.ci.values())).lower.device)
        lr, t0 = self.adversary.lr(frac), self.adversary.t
        detached = StepContext(ctx.cm, ctx.batch, ctx.target_out, ctx.inputs, ctx.ci,
                               {n: dw.detach() for n, dw in ctx.delta_ws.items()},
                               {n: r.detach() for n, r in ctx.reuse.items()})
        for k in range(self.cfg.vpd.warmup_updates):
            mine = {n: s[rows] for n, s in sources.items()}
            self.adversary.ascend(self._source_grads(detached, mine, group, detach_ci=True), lr, t0 + k + 1, rows)
        leaves = {n: s[rows].detach().requires_grad_(True) for n, s in sources.items()}
        loss = self.recon(ctx, pgd_masks(self, ctx, leaves, group, False))
        self.pending.append((leaves, lr, rows))  # the main backward fills their .grad, read in after_step
        return loss

    def _source_grads(self, ctx: StepContext, sources: dict[str, torch.Tensor], group: dict,
                      detach_ci: bool) -> dict[str, torch.Tensor]:
        """∂(reconstruction loss)/∂r at the current sources."""
        leaves = {n: s.detach().requires_grad_(True) for n, s in sources.items()}
        loss = self.recon(ctx, pgd_masks(self, ctx, leaves, group, detach_ci))
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    def after_step(self, cm) -> None:
        """The adversary's last update of the step, on every micro-batch's rows, with the gradients taken before
        the main backward."""
        if self.pending:
            t = self.adversary.t + self.cfg.vpd.warmup_updates + 1
            for leaves, lr, rows in self.pending:
                self.adversary.ascend({n: self._loss_grad(r) for n, r in leaves.items()}, lr, t, rows)
            self.adversary.t = t
        self.pending, self.micro = [], 0

    @property
    def weight_in_total(self) -> float:
        """d(backward's objective)/d(adversarial loss): the term's coefficient over the micro-batches that the
        trainer's backward divides each micro-batch's total by."""
        coeff = next(lc.coeff for lc in self.cfg.losses if lc.type == "persistent_pgd_recon")
        return coeff / self.micro_batches

    def _loss_grad(self, leaf: torch.Tensor) -> torch.Tensor:
        """∂(adversarial loss)/∂r of one micro-batch's sources: the gradient the main backward left on the leaf,
        divided by the term's weight in that backward."""
        return torch.zeros_like(leaf) if leaf.grad is None else leaf.grad / self.weight_in_total

    def step_log(self, frac: float) -> dict[str, float]:
        return {**super().step_log(frac), "adversary_lr": self.adversary.lr(frac)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.adversary.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adversary.load_state_dict(state)
