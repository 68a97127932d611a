"""Options shared by the commands, so that each means the same everywhere."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import click

class NumberRange(click.FloatRange):
    """A FloatRange that also refuses NaN (which compares false with both bounds, so FloatRange lets it through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        out = super().convert(value, param, ctx)
        if math.isnan(out):
            self.fail(f"{value!r} is not a number; give one in {self._describe_range()}.", param, ctx)
        return out


DEVICE_HELP = "Torch device (default: cuda if available, else cpu)."


def resolve_device_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """--device as a torch.device through `decomp_hooks.run.resolve_device`; a bad value is a usage error naming it."""
    from decomp_hooks.config import ConfigError
    from decomp_hooks.run import resolve_device

    try:
        return resolve_device(value)
    except ConfigError as err:  # e.g. cuda on a machine without CUDA
        raise click.BadParameter(str(err)) from None
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a torch device; use cpu, cuda or cuda:<index>.") from None


def device_option(command: Callable) -> Callable:
    """The --device option of every command: one rule, resolved before the command runs."""
    return click.option("--device", default=None, metavar="DEVICE", help=DEVICE_HELP,
                        callback=resolve_device_option)(command)


def check_out(out: Path, force: bool, *inputs: Path) -> bool:
    """Whether OUT is replaced (see `store.replaceable_dir`: never a folder decomp-hooks did not write, or one that
    holds an input); a ClickException naming the fix otherwise."""
    from decomp_hooks import store

    return store.replaceable_dir(out, force, click.ClickException, inputs=inputs)
