"""The one training loop for toy targets: AdamW on MSE to labels, with an optional lr schedule and a progress bar."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomp_hooks.progress import progress_bar


def fit_target(model: nn.Module, sampler: Callable[[int], Tensor], labels: Callable[[Tensor], Tensor], steps: int,
               batch_size: int, lr: float, weight_decay: float, desc: str, progress: bool = True,
               lr_at: Callable[[int], float] | None = None) -> nn.Module:
    """Minimise MSE(model(x), labels(x)) over sampled batches; returns the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    bar = progress_bar(range(steps), desc=desc, disable=not progress)
    for step in bar:
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        x = sampler(batch_size)
        loss = F.mse_loss(model(x), labels(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3e}", refresh=False)
    return model.eval()
