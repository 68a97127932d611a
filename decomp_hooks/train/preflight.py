"""Checks before the first step: the data fits the model (token ids in the vocabulary, one plain forward runs)."""
from __future__ import annotations

from typing import Any

import torch

from decomp_hooks.data import DataError
from decomp_hooks.model_call import call_model


def vocab_size(model: torch.nn.Module) -> int | None:
    """The vocabulary size of an HF, TransformerLens or plain embedding model, if it has one."""
    for cfg_name, key in (("config", "vocab_size"), ("cfg", "d_vocab")):
        size = getattr(getattr(model, cfg_name, None), key, None)
        if isinstance(size, int):
            return size
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, torch.Tensor):
        return f"{batch.dtype} tensor of shape {list(batch.shape)} on {batch.device}"
    return type(batch).__name__


def check_token_ids(batch: Any, vocab: int | None) -> None:
    """Refuse integer token ids outside a vocabulary of `vocab` entries (a batch's tensor or its `input_ids`)."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and vocab is not None and ids.numel():
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise DataError(f"token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has "
                            f"{vocab} entries (ids 0..{vocab - 1}); tokenize with the model's own tokenizer.")


@torch.no_grad()
def preflight(model: torch.nn.Module, batch: Any) -> None:
    """Before any training: token ids within the vocabulary, and one plain forward that the batch passes."""
    check_token_ids(batch, vocab_size(model))
    try:
        call_model(model, batch)
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        raise DataError(f"the model cannot run on the data: a batch is a {describe(batch)} and the model raised "
                        f"{type(err).__name__}: {err}") from None
