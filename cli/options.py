"""Options shared by the commands, so that each means the same everywhere."""
from __future__ import annotations

from typing import Any, Callable

import click

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
