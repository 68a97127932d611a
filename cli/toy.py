"""`decomp-hooks toy`: train and list the ground-truth toy targets and the small language model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.options import device_option


@click.group("toy")
def toy_group() -> None:
    """Ground-truth toy targets of the SPD paper (TMS, residual MLP) and a small Llama-style LM."""


@toy_group.command("list")
def list_command() -> None:
    """List the toy presets with their training recipes."""
    from decomp_hooks.toy import TOYS

    for name, (config, recipe) in TOYS.items():
        click.echo(f"{name:14s} {config}  {recipe}")


@toy_group.command("train")
@click.argument("name")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Directory to write the trained target to.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the recipe's step count.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Training seed.")
@device_option
def train_command(name: str, out: Path, steps: int | None, seed: int, device: Any) -> None:
    """Train toy NAME with its reference recipe and save it (model.safetensors + toy.json).

    Example: decomp-hooks toy train tms_5-2 --out runs/tms_5-2-target
    """
    from decomp_hooks.toy import make_toy, save_toy

    try:
        model, _ = make_toy(name, seed=seed, device=device, steps=steps)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="NAME") from None
    save_toy(model, out, preset=name, seed=seed)
    click.echo(f"saved {name} (seed {seed}) to {out}")


@toy_group.command("lm")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Directory to write the model, tokenizer and training.json to (written atomically).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Training seed.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the recipe's step count.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
def lm_command(out: Path, seed: int, steps: int | None, force: bool) -> None:
    """Train the small Llama-style LM on the standard library's docstrings and save it as a Hugging Face model.

    The directory is what --model takes in `decompose`, `export`, `dashboard` and `compare` (see their examples); in
    Python it loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained once decomp_hooks.toy.lm is imported.

    \b
    Examples:
      decomp-hooks toy lm --out models/small-lm
      decomp-hooks decompose lm/small_spd --model models/small-lm --steps 50 --out runs/small-lm
    """
    from decomp_hooks import store
    from decomp_hooks.toy.lm import SmallLMConfig, SmallLMTraining, save_small_lm, train_small_lm

    overwrite = store.replaceable_dir(out, force, click.ClickException)
    training = SmallLMTraining(seed=seed) if steps is None else SmallLMTraining(seed=seed, steps=steps)
    model, tokenizer, report = train_small_lm(SmallLMConfig(), training)
    save_small_lm(model, tokenizer, out, report, overwrite=overwrite)
    click.echo(f"saved the small LM (seed {seed}) to {out}: held-out CE {report['heldout_ce']:.3f} nats/token, "
               f"unigram entropy {report['unigram_entropy']:.3f}")
