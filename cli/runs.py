"""The run a command reads: RUN_DIR's decomposition on its model (--model, the model its config names, or its saved
toy target), shared by export, dashboard, compare, harvest, cluster and graph."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.export import decomposition_dir, load_model


def load_run(run_dir: Path, model_dir: Path | None, device: Any) -> tuple[Any, Any]:
    """The decomposition in RUN_DIR re-attached, on `device`, to the --model directory, else to the model its config's
    `model:` section names (a language-model run, e.g. the small_lm asset), else to its saved toy target; and the
    model's tokenizer."""
    import decomp_hooks as dh
    from decomp_hooks.sites import SiteError

    path = decomposition_dir(run_dir)
    model = tokenizer = None
    if model_dir is not None:
        model, tokenizer = load_model(model_dir)
    else:
        model, tokenizer = configured_model(path, device)
    try:
        return dh.load(path, model=model, device=device), tokenizer
    except dh.FingerprintError as err:
        raise click.BadParameter(f"{err} (pass --model <the directory of the model this run decomposed>)",
                                 param_hint="--model") from None
    except SiteError as err:
        hint = "" if model is None else " (--model must be the model the run decomposed, with the same module names)"
        raise click.ClickException(f"{err}{hint}") from None
    except ValueError as err:
        hint = " For a language-model run pass --model <local HF model directory>." if model is None else ""
        raise click.ClickException(f"{err}{hint}") from None


def configured_model(path: Path, device: Any) -> tuple[Any, Any]:
    """(model, tokenizer) named by the `model:` section of the decomposition's config, or (None, None) without one."""
    from decomp_hooks.config import ConfigError, from_dict
    from decomp_hooks.decomposition import read_meta
    from decomp_hooks.lm.model import ModelConfig
    from decomp_hooks.lm.model import load_model as load_configured

    section = read_meta(path)["config"].get("model") or {}
    if not section.get("source"):
        return None, None
    try:
        loaded = load_configured(from_dict(ModelConfig, section), device, progress=False)
    except ConfigError as err:
        raise click.ClickException(f"{err} (the run's config names this model; pass --model DIR for a copy)") from None
    return loaded.model, loaded.tokenizer
