"""Exports to the field's shared tooling: SAE-Lens directories and Neuronpedia-style feature JSON; reading them back.

    dec.export("out/", format="transcoder")                # one SAE-Lens directory per site
    from decomp_hooks.export import load_sae, export_basis
    sae = load_sae("out/blocks.0.mlp.W_in")                  # W_enc, W_dec, b_enc, b_dec, cfg, hook names

Registration of the signed architecture with sae-lens: importing sae_lens takes seconds, so this package never
imports it. Importing `decomp_hooks.export` instead installs a one-shot import hook (`sys.meta_path`) that registers
`decomp_signed_transcoder` the moment anything imports `sae_lens` (immediately, if it is already imported). The
hook costs nothing when sae-lens is absent or never imported, and `register()` does the same explicitly
(`LoadedSAE.to_sae()` calls it).
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Any

from decomp_hooks.export.sae_lens import (
    FORMATS,
    SIGNED,
    STANDARD,
    TRANSCODER,
    ExportError,
    LoadedSAE,
    export_basis,
    export_decomposition,
    feature_tensors,
    load_export,
    load_sae,
    register,
    site_hooks,
)

__all__ = ["FORMATS", "SIGNED", "STANDARD", "TRANSCODER", "ExportError", "LoadedSAE", "export_basis",
           "export_decomposition", "feature_tensors", "install_import_hook", "load_export", "load_sae", "register",
           "site_hooks"]


def _register_quietly() -> None:
    try:
        register()
    except Exception as err:  # a failed registration must never break the user's `import sae_lens`
        warnings.warn(f"decomp-hooks could not register {SIGNED!r} with sae-lens: {err}", stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps sae_lens's own loader: runs it, then registers the signed architecture."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader  # the package sees its own loader (importlib.resources etc.)
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _uninstall()
        _register_quietly()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _SaeLensFinder(importlib.abc.MetaPathFinder):
    """Answers only for `sae_lens`: finds it with the other finders and wraps its loader."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "sae_lens":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


_FINDER = _SaeLensFinder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install_import_hook() -> None:
    """Register now if sae_lens is imported, else as soon as it is (idempotent)."""
    if "sae_lens" in sys.modules:
        _register_quietly()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


install_import_hook()
