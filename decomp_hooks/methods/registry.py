"""Methods by name: the built-in ones as lazy "module:Class" paths (importing this costs nothing), plus any a user
registers with `register`."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from decomp_hooks.methods.base import Method

#: the shipped methods; adding one is a folder under decomp_hooks/methods/ and a line here
BUILTIN = {
    "spd": "decomp_hooks.methods.spd.method:SPD",
    "apd": "decomp_hooks.methods.apd.method:APD",
    "vpd": "decomp_hooks.methods.vpd.method:VPD",
}

_registered: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Make `cls` available as `method: <cls.name>` (usable as a class decorator); replaces a method of that name."""
    _registered[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted({*BUILTIN, *_registered})


def get_method(name: str) -> type[Method]:
    """The Method class registered under `name`; a ConfigError naming the known methods otherwise."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN:
        from decomp_hooks.config import ConfigError

        raise ConfigError(f"method={name!r} is not supported; use one of {method_names()} "
                          "(or register your own with decomp_hooks.methods.register).")
    module, cls = BUILTIN[name].split(":")
    return register(getattr(importlib.import_module(module), cls))
