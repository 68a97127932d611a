"""`decomp-hooks toy`: train and list the ground-truth toy targets."""
from __future__ import annotations

from pathlib import Path

import click


@click.group("toy")
def toy_group() -> None:
    """Ground-truth toy targets of the SPD paper (TMS, residual MLP)."""


@toy_group.command("list")
def list_command() -> None:
    """List the toy presets with their training recipes."""
    from decomp_hooks.toy import TOYS

    for name, (config, recipe) in TOYS.items():
        click.echo(f"{name:14s} {config}  {recipe}")


@toy_group.command("train")
@click.argument("name")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Directory to write the trained target to.")
@click.option("--steps", type=int, default=None, help="Override the recipe's step count.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--device", default="cpu", show_default=True, help="Torch device.")
def train_command(name: str, out: Path, steps: int | None, seed: int, device: str) -> None:
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
