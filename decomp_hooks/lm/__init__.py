"""Language-model runs from configuration: the model in its toolkit (`lm.model`), the text as token rows
(`lm.data`), and what the run measures and reports; here, the path rule and error both config sections share."""
from __future__ import annotations

from pathlib import Path
from typing import Any

PATH_PREFIXES = ("/", "./", "../", "~")


def looks_like_path(source: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether a source string names a local path rather than a hub id: it starts like one (`/ ./ ../ ~`), is an
    existing directory, has more than one `/`, ends in `/` or in one of `suffixes`; a path is never looked up on a
    hub."""
    return (source.startswith(PATH_PREFIXES) or source.count("/") > 1 or source.endswith("/")
            or Path(source).suffix in suffixes or Path(source).expanduser().is_dir())


def config_error(message: str) -> ValueError:
    """A `decomp_hooks.config.ConfigError`, imported on use because the config module builds on this package."""
    from decomp_hooks.config import ConfigError

    return ConfigError(message)


def load_tokenizer(path: str, what: str, **kwargs: Any) -> Any:
    """The tokenizer saved in `path` (`what` names the config key in errors); one transformers cannot load, or the
    empty one it builds from a directory with no tokenizer files, is an error naming the path."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise config_error(f"{what} {path!r} has no loadable tokenizer ({err}); save one into it with "
                           "tokenizer.save_pretrained(dir).") from None
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise config_error(f"{what} {path!r} has no tokenizer files (the tokenizer built from it holds only its "
                           f"{len(tokenizer)} special token(s)); save one into it with tokenizer.save_pretrained(dir).")
    return tokenizer
