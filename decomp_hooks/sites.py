"""Sites: the contract between adapters and methods.

A site is one weight matrix seen as `W [d_out, d_in]`, plus the ability to read its input during a forward pass and
replace its output by a function of that input. Methods see only this; adapters build sites from a toolkit's model.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Protocol, TypeVar

import torch
from torch.utils.hooks import RemovableHandle

#: fn(site_input, target_output) -> replacement output, or None to keep the target output.
SiteHook = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


T = TypeVar("T")


class SiteError(ValueError):
    """A target pattern or module that cannot become a site; the message names it and the candidates."""


class SiteKind(str, Enum):
    """What a site's matrix is. A `str` enum, so saved files keep the plain names ("linear", ...)."""

    LINEAR = "linear"  # a weight matrix whose input is an activation
    EMBEDDING = "embedding"  # a lookup table whose input is token ids
    IDENTITY = "identity"  # an identity matrix I_d inserted before a module (the +ID toys), not in the model

    @property
    def reads_tokens(self) -> bool:
        """The site's input is token ids (so there are no activations to scale, normalise or export)."""
        return self is SiteKind.EMBEDDING

    @property
    def inserted(self) -> bool:
        """The site is not one of the model's own matrices but an identity inserted before `module`."""
        return self is SiteKind.IDENTITY


class Site(Protocol):
    """What every method needs from a site, whatever toolkit it lives in."""

    name: str  # unique among the sites; for an inserted identity `<module>.pre_identity`
    module: str  # the model's module (or TransformerLens parameter path) the site reads and writes
    kind: SiteKind
    d_in: int
    d_out: int

    def weight(self) -> torch.Tensor:
        """The target weight in canonical orientation `[d_out, d_in]` (for embeddings: `[vocab, d]` as `W.T`)."""

    def bias(self) -> torch.Tensor | None:
        """The frozen target bias `[d_out]`, or None."""

    def hook(self, fn: SiteHook) -> RemovableHandle:
        """Call `fn` on every forward through the site; a returned tensor replaces the site's output."""


def match_targets(names: Iterable[str], patterns: dict[str, T], what: str = "module") -> dict[str, T]:
    """Resolve fnmatch globs to concrete names with their value (C, a coefficient); a glob matching nothing or a name
    matched twice is an error."""
    names = list(names)
    resolved: dict[str, T] = {}
    owner: dict[str, str] = {}
    for pattern, c in patterns.items():
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise SiteError(
                f"pattern {pattern!r} matches no {what}. Candidates: {_preview(names)}. "
                "Patterns are fnmatch globs such as 'layers.*.mlp_in'."
            )
        for name in hits:
            if name in owner:
                raise SiteError(f"{what} {name!r} is matched by both {owner[name]!r} and {pattern!r}; make the patterns disjoint.")
            owner[name] = pattern
            resolved[name] = c
    return resolved


def _preview(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "") if names else "(none)"
