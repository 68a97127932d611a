"""Calling the user's model on a batch, and finding the tensor a loss compares in what it returns.

Every part of the package that runs the target model (training, evaluation, exports, dashboards, LIB) goes through
these two functions, so a batch may be a tensor or a dict of keyword arguments and an output may be a tensor, an
object with `.logits` (transformers) or a tuple.
"""
from __future__ import annotations

from typing import Any

import torch


def call_model(model: Any, batch: Any) -> Any:
    """`model(**batch)` for a dict batch (transformers' keyword inputs), `model(batch)` otherwise."""
    return model(**batch) if isinstance(batch, dict) else model(batch)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a loss compares: the model output itself, its `.logits`, or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in a {type(out).__name__}; return a tensor or an object with .logits")


def run_model(model: Any, batch: Any) -> torch.Tensor:
    """The model's output tensor on `batch`: `output_tensor(call_model(model, batch))`."""
    return output_tensor(call_model(model, batch))
