"""The shipped configs, installed with the package and reachable by name from anywhere: `config="tms_5-2"`,
`decomp-hooks decompose lm/small_vpd`. A name is the file's path below this folder without `.yaml`; a file's bare
stem works too where it is unique (`small_vpd`)."""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_names() -> list[str]:
    """Every shipped config's name, sorted."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def shipped_config(name: str) -> Path | None:
    """The YAML file of shipped config `name` (with or without `.yaml`, or a unique stem), or None."""
    name = name.removesuffix(".yaml")
    names = config_names()
    if name in names:
        return CONFIG_DIR / f"{name}.yaml"
    stems = [n for n in names if n.rsplit("/", 1)[-1] == name]
    return CONFIG_DIR / f"{stems[0]}.yaml" if len(stems) == 1 else None
