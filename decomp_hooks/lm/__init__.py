"""Language-model runs from configuration: the model in its toolkit (`lm.model`), the text as token rows
(`lm.data`), and what the run measures and reports; here, the path rule and error both config sections share."""
from __future__ import annotations

from pathlib import Path

PATH_PREFIXES = ("/", "./", "../", "~")


def looks_like_path(source: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether a source string names a local path rather than a hub id: it starts like one (`/ ./ ../ ~`), is an
    existing directory, has more than one `/`, or ends in one of `suffixes`; a path is never looked up on a hub."""
    return (source.startswith(PATH_PREFIXES) or source.count("/") > 1 or Path(source).suffix in suffixes
            or Path(source).expanduser().is_dir())


def config_error(message: str) -> ValueError:
    """A `decomp_hooks.config.ConfigError`, imported on use because the config module builds on this package."""
    from decomp_hooks.config import ConfigError

    return ConfigError(message)
