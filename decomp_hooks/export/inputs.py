"""Checks on what exports, dashboards and comparisons stream through the model, the data and the sizes it is read
with: each bad value is refused with an error naming it and the fix, before the model runs, instead of failing deep
inside a forward."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from decomp_hooks.data import DataError, iter_batches, to_device
from decomp_hooks.train.preflight import check_token_ids, describe, preflight, vocab_size

Refusal = Callable[[str], Exception]  # an error class, or any callable that builds the exception from a message


def check_count(name: str, value: Any, error: Refusal, minimum: int = 1, optional: bool = False) -> None:
    """Refuse a size or count (batch size, batch limit, examples) that is not an integer ≥ `minimum` (or None, where
    `optional`), naming it."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{name}={value!r}: must be an integer ≥ {minimum}{' or None' if optional else ''}.")


def check_inputs(batch: Any, vocab: int | None, error: Refusal) -> None:
    """Refuse a batch (or the whole data tensor) with no rows or with NaN/Inf values, and, for a model with a
    vocabulary of `vocab` tokens, one that is not integer token ids or holds ids outside the vocabulary."""
    for t in (batch.values() if isinstance(batch, dict) else [batch]):
        if not isinstance(t, torch.Tensor):
            continue
        if t.dim() == 0 or t.shape[0] == 0:
            raise error(f"the data is a {describe(t)} with no rows; pass at least one row [n, ...].")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise error(f"the data ({describe(t)}) holds {bad} NaN or Inf values; clean it first.")
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if vocab is None or not isinstance(ids, torch.Tensor):
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise error(f"the data is a {describe(ids)}, but the model reads token ids (a vocabulary of {vocab}); pass "
                    "integer token ids (torch.int64), e.g. from the model's tokenizer.")
    try:
        check_token_ids(ids, vocab)
    except DataError as err:
        raise error(str(err)) from None


def check_runs(dec: Any, batch: Any, error: Refusal) -> None:
    """One plain forward of the target on a batch (training's preflight), so that data of the wrong shape or dtype
    is refused naming both rather than deep inside the activation pass."""
    try:
        preflight(dec.cm.target, to_device(batch, dec.device))
    except DataError as err:
        raise error(str(err)) from None


def checked_batches(dec: Any, data: Any, batch_size: int, max_batches: int | None, error: Refusal) -> Iterator[Any]:
    """The batches of `data` (`iter_batches`), each through `check_inputs` against the target's vocabulary, the first
    also through `check_runs`."""
    vocab = vocab_size(dec.cm.target)
    if isinstance(data, torch.Tensor) and data.dim() == 0:
        check_inputs(data, vocab, error)  # refused here: iter_batches cannot split a 0-d tensor into rows
    for i, batch in enumerate(iter_batches(data, batch_size, max_batches)):
        check_inputs(batch, vocab, error)
        if i == 0:
            check_runs(dec, batch, error)
        yield batch
