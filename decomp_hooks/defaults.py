"""What a call leaves out, filled in for the model at hand: the recipe (a shipped config per kind of model), the
targets (every weight matrix of the blocks) and the text (built-in, for a model that carries a tokenizer).

`dh.decompose(model)` on a language model decomposes every attention and MLP matrix with VPD and KL on the logits,
on the standard library's docstrings; on any other model, every linear layer with SPD and MSE. docs/usage.md#defaults.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from decomp_hooks.config import ConfigError, DecomposeConfig, load_config
from decomp_hooks.lm.capacity import matrix_type
from decomp_hooks.lm.data import DataConfig

#: the shipped config (decomp_hooks/configs/) a call without `config` uses, per kind of model
RECIPES = {"language_model": "default_lm", "other": "default_mse"}


def model_kind(model: Any) -> str:
    """'language_model' for a model with logits (an unembedding), else 'other'."""
    from decomp_hooks.adapters import adapter_for

    return "language_model" if adapter_for(model).is_language_model(model) else "other"


def default_config(model: Any) -> DecomposeConfig:
    """The config a call without `config` uses for `model` (print it with `.to_yaml()`)."""
    return load_config(RECIPES[model_kind(model)])


def default_targets(model: Any) -> dict[str, None]:
    """Every weight matrix of the model's blocks, C from the table (None): for a language model the attention and
    MLP matrices (the C table's types; every matrix but the embeddings where none is one), else every linear layer."""
    from decomp_hooks.adapters import adapter_for

    adapter = adapter_for(model)
    names = adapter.matrices(model)
    if adapter.is_language_model(model):
        names = [n for n in names if matrix_type(n) is not None] or names
    if not names:
        raise ConfigError(f"the {type(model).__name__} has no weight matrix to decompose (nn.Linear, HF Conv1D or a "
                          "TransformerLens weight); pass targets={'<module glob>': C}.")
    return dict.fromkeys(names)


def warn_if_builtin(data: DataConfig) -> None:
    """Warn that the built-in corpus is a stand-in when `data` names it."""
    if data.source == "stdlib_docstrings" and not data.files:
        warnings.warn("decomposing on the built-in corpus (the standard library's docstrings, ~1.6 MB); for research "
                      "runs pass your own text (data=..., or `data:` / --data).", stacklevel=3)


def default_data(model: Any, cfg: DecomposeConfig, progress: bool) -> tuple[Any, Any]:
    """(training rows, held-out rows) from the config's `data:` section tokenised with the model's tokenizer; a
    warning when that is the built-in corpus."""
    from decomp_hooks.adapters import adapter_for
    from decomp_hooks.lm.data import token_data

    adapter = adapter_for(model)
    tokenizer = adapter.tokenizer(model)
    if cfg.data is None or (cfg.data.source is None and not cfg.data.files) or tokenizer is None:
        why = "the model carries no tokenizer" if tokenizer is None else "the config has no `data:` section"
        raise ConfigError(f"data=None but {why}: pass data (a sampler f(batch_size), a tensor of rows or an iterable "
                          "of batches) or a model with a tokenizer.")
    warn_if_builtin(cfg.data)
    context = adapter.model_context(model).get("context_size")
    data_cfg = cfg.data if context is None or cfg.data.context_length <= context else \
        dataclasses.replace(cfg.data, context_length=context)
    tokens = token_data(data_cfg, tokenizer, cfg.train.batch_size, progress)
    return tokens.train, tokens.eval
