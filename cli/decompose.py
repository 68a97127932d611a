"""`decomp-hooks decompose CONFIG.yaml`: run a decomposition from a config and print its summary."""
from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from decomp_hooks.cli.options import device_option

if TYPE_CHECKING:
    from decomp_hooks.config import DecomposeConfig
    from decomp_hooks.decomposition import Decomposition


def run_toy(cfg: DecomposeConfig, out: Path, steps: int | None, device: str | None, seed: int, resume: bool,
            progress: bool) -> Decomposition:
    """Train (or reload from `out/target`) the config's toy target, save it beside the run, and decompose it.

    Under torchrun rank 0 trains and saves the target while the other ranks wait, then load it."""
    import decomp_hooks as dh
    from decomp_hooks import distributed
    from decomp_hooks.run import resolve_device
    from decomp_hooks.toy import load_toy, make_toy, save_toy, toy_sampler
    from decomp_hooks.toy.evaluate import toy_metrics

    ctx, dev = distributed.setup(resolve_device(device))
    saved = out / "target"
    if ctx.is_main:
        trained: dict = {}
        if (saved / "toy.json").is_file():
            model = load_toy(saved)
        elif cfg.target.path is not None:
            model = load_toy(cfg.target.path)
        else:
            click.echo(f"training target {cfg.target.toy} (seed {cfg.target.seed}) ...")
            model, _ = make_toy(cfg.target.toy, seed=cfg.target.seed, steps=cfg.target.steps, progress=progress)
            trained = {"preset": cfg.target.toy, "seed": cfg.target.seed, "steps": cfg.target.steps}
        if not saved.exists():
            save_toy(model, saved, **trained)
    distributed.barrier()
    if not ctx.is_main:
        model = load_toy(saved)
    return dh.decompose(model, toy_sampler(model, dev), config=cfg, steps=steps, device=dev, seed=seed, out_dir=out,
                        resume=resume, progress=progress, evaluate=toy_metrics)


def finish_toy(dec: Decomposition, out: Path) -> str:
    """Plot the toy run into `out`; its final metrics and the ground-truth verdict to print."""
    from decomp_hooks.toy.evaluate import toy_plots
    from decomp_hooks.toy.summary import toy_summary

    return toy_summary(dec, out, toy_plots(dec, out))


def runner(cfg: DecomposeConfig) -> tuple[Callable[..., Decomposition], Callable[[Decomposition, Path], str]]:
    """(run, finish) for the config: a language model (`model:`) or a toy target (`target:`)."""
    from decomp_hooks.lm.run import finish_lm, run_lm

    if cfg.model is not None and cfg.model.source is not None:
        return run_lm, finish_lm
    if cfg.target is not None and (cfg.target.toy is not None or cfg.target.path is not None):
        return run_toy, finish_toy
    raise click.BadParameter("the config names no model: add a `model:` section (or pass --model: a local directory, "
                             "a hub id, small_lm or smollm2) or a toy `target:` (toy: <name> or path: <saved toy dir>).",
                             param_hint="CONFIG")


def with_sources(cfg: DecomposeConfig, model: str | None, data: str | None) -> DecomposeConfig:
    """The config with --model / --data replacing its model and data sources."""
    import dataclasses

    from decomp_hooks.lm.data import DataConfig
    from decomp_hooks.lm.model import ModelConfig

    if model is not None:
        cfg.model = dataclasses.replace(cfg.model or ModelConfig(), source=model)
    if data is not None:
        cfg.data = dataclasses.replace(cfg.data or DataConfig(), source=data)
    return cfg


@click.command("decompose")
@click.argument("config", metavar="[CONFIG]", required=False)
@click.option("--model", "model", default=None,
              help="Model to decompose (replaces model.source): a local directory, a hub id, small_lm or smollm2.")
@click.option("--data", "data", default=None,
              help="Text to decompose it on (replaces data.source): local files/folder, a dataset name, stdlib_docstrings.")
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Override train.steps.")
@device_option
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Override the config's seed.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/<config name>-s<seed>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Continue the run in this directory from its latest checkpoint (bit for bit).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes (one per GPU; gloo on CPU): relaunches this command under "
                   "`python -m torch.distributed.run --standalone --nproc_per_node N`.")
def decompose_command(config: str | None, model: str | None, data: str | None, steps: int | None, device: Any,
                      seed: int | None, out: Path | None, resume_dir: Path | None, no_progress: bool,
                      nproc: int) -> None:
    """Decompose the model named in CONFIG (a YAML file, or a shipped config's name) and write a run directory.

    CONFIG names a language model (`model:` and `data:` sections, or --model / --data) or a toy target (`target:`).
    Without CONFIG, --model is decomposed with the default language-model recipe (default_lm: VPD on every
    attention and MLP matrix, C from the table) on --data, or on built-in text without it.
    The run directory holds config.yaml, metrics.jsonl, checkpoints/, decomposition/ (safetensors + JSON) and PNG
    plots; language-model runs add eval.json (held-out KL, CE, L0 and alive components per site), toy runs their
    target (target/). A table of the final evaluation is printed.

    \b
    Examples:
      decomp-hooks decompose --model ./my-model --data ./texts/    # default recipe, every block matrix
      decomp-hooks decompose lm/small_spd --steps 50
      decomp-hooks decompose lm/small_spd --model ./my-model --data ./texts/
      decomp-hooks decompose tms_5-2 --steps 2000 --out runs/tms
      decomp-hooks decompose tms_5-2 --resume runs/tms    # after a crash or pre-emption
      decomp-hooks decompose resid_mlp1 --nproc 4        # = torchrun --nproc_per_node 4 -m decomp_hooks.cli decompose ...
    """
    import decomp_hooks as dh
    from decomp_hooks import distributed
    from decomp_hooks.config import ConfigError

    if click.get_current_context().get_parameter_source("device") is ParameterSource.DEFAULT:
        device = None  # the config's model.device where it sets one, else the same rule
    from decomp_hooks.defaults import RECIPES
    from decomp_hooks.train.loop import Interrupted

    if config is None and model is None:
        raise click.UsageError("pass CONFIG (a YAML file or a shipped config's name, e.g. tms_5-2 or lm/small_vpd) or "
                               "--model (a model directory: decomposed with the default recipe).")
    try:
        cfg = with_sources(dh.load_config(config or RECIPES["language_model"]), model, data)
    except ConfigError as err:
        raise click.BadParameter(str(err), param_hint="CONFIG") from None
    run, finish = runner(cfg)
    if config is None:  # the default recipe: its context length gives way to a shorter model's
        run = functools.partial(run, fit_context=True)
    seed = cfg.seed if seed is None else seed
    name = Path(config).stem if config is not None else Path(model.rstrip("/")).name
    out = resume_dir or out or Path("runs") / f"{name}-s{seed}"
    if nproc > 1 and not distributed.launched():
        sys.exit(launch(nproc, config, out, steps, device, seed, resume_dir is not None, no_progress, model, data))
    main_rank = distributed.is_main_process()
    created = not out.exists()
    try:
        dec = run(cfg, out, steps, device, seed, resume_dir is not None, not no_progress)
    except (ValueError, FloatingPointError) as err:  # ConfigError, StoreError, SiteError, DataError, unknown toy
        if main_rank and created and not (out / "checkpoints").exists():
            shutil.rmtree(out, ignore_errors=True)  # refused before any checkpoint: leave nothing behind
        raise click.ClickException(str(err)) from None
    except Interrupted as err:  # SIGTERM/SIGINT: a checkpoint was written; say how to continue, no traceback
        if main_rank:
            again = f"decomp-hooks decompose {config + ' ' if config else ''}--resume {out}"
            click.echo(f"{err}\nto continue: {again}", err=True)
        sys.exit(128 + (err.signum or signal.SIGTERM))
    if main_rank:
        click.echo(finish(dec, out))
    distributed.shutdown()


def launch(nproc: int, config: str | None, out: Path, steps: int | None, device: Any, seed: int, resume: bool,
           no_progress: bool, model: str | None = None, data: str | None = None) -> int:
    """Run this command again as `nproc` torchrun ranks on this machine; returns torchrun's exit status."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "decomp_hooks.cli", "decompose", *([config] if config else []), "--seed", str(seed)]
    args += ["--resume", str(out)] if resume else ["--out", str(out)]
    args += (["--steps", str(steps)] if steps is not None else []) + (["--device", str(device)] if device else [])
    args += ["--no-progress"] if no_progress else []
    args += (["--model", model] if model else []) + (["--data", data] if data else [])
    return subprocess.run(args).returncode
