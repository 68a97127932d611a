"""The signed transcoder architecture (`decomp_signed_transcoder`) in sae-lens, registered by an explicit call.

`encode(x) = x V` (the components' signed inner activations; times the CI mask g(x) when the export is `ci_gated`),
`decode(acts) = acts U + b`. sae-lens knows the architecture only after `register()`:

    from decomp_hooks.export import register
    register()                                           # imports sae_lens (seconds); idempotent
    sae = sae_lens.SAE.load_from_disk("out/blocks.0.mlp.W_in")

`LoadedSAE.to_sae()` registers by itself; call `register()` yourself before `SAE.load_from_disk` on a signed export.
Importing decomp_hooks never imports sae_lens: the classes are defined on first use (`signed_classes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from decomp_hooks.export.format import SIGNED

_NAMES = ("SignedTranscoder", "SignedTranscoderConfig")


def register() -> bool:
    """Register `decomp_signed_transcoder` with sae-lens so that `SAE.load_from_disk` reads signed exports.

    Idempotent; imports sae_lens. Returns False, registering nothing, when sae-lens is not installed."""
    try:
        from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    except ImportError:
        return False
    if SIGNED not in SAE_CLASS_REGISTRY:
        register_sae_class(SIGNED, *signed_classes())
    return True


@cache
def signed_classes() -> tuple[type, type]:
    """`(SignedTranscoder, SignedTranscoderConfig)`, defined once on first use (this imports sae_lens)."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
    from sae_lens.util import filter_valid_dataclass_fields
    from torch import nn

    from decomp_hooks.causal_importance import SIGMOIDS, make_ci_fn
    from decomp_hooks.sites import SiteKind

    @dataclass
    class SignedTranscoderConfig(TranscoderConfig):
        """A `TranscoderConfig` with the causal-importance gate's settings (used only when `ci_gated`)."""

        apply_b_dec_to_input: bool = False
        ci_gated: bool = False
        ci_type: str = "mlp"
        ci_hidden: list[int] = field(default_factory=list)
        ci_sigmoid: str = "leaky_hard"

        @classmethod
        def architecture(cls) -> str:
            return SIGNED

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any]) -> SignedTranscoderConfig:
            cfg = cls(**filter_valid_dataclass_fields(config_dict, cls))
            if "metadata" in config_dict:
                cfg.metadata = SAEMetadata(**config_dict["metadata"])
            return cfg

    class SignedTranscoder(Transcoder):
        """Components as a transcoder: `encode(x) = x V` (signed; times the CI mask g(x) when `ci_gated`),
        `decode(acts) = acts U + b`. Reads `hook_z` inputs flattened over heads."""

        def get_activation_fn(self) -> nn.Module:
            return nn.Identity()

        def initialize_weights(self) -> None:
            super().initialize_weights()
            if self.cfg.ci_gated:
                fn = make_ci_fn(self.cfg.ci_type, SiteKind.LINEAR, self.cfg.d_in, self.cfg.d_sae,
                                list(self.cfg.ci_hidden))
                self.ci_fn = fn.to(device=self.device, dtype=self.dtype)

        def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
            sae_in = self.reshape_fn_in(sae_in.to(self.dtype))
            return self.run_time_activation_norm_fn_in(self.hook_sae_input(sae_in))

        def causal_importance(self, sae_in: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
            """The CI mask g (lower sigmoid of the stored CI function) from the input and inner activations."""
            z = self.ci_fn(inner if getattr(self.ci_fn, "takes_inner_acts", False) else sae_in)
            return SIGMOIDS[self.cfg.ci_sigmoid][0](z)

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            sae_in = self.process_sae_in(x)
            inner = sae_in @ self.W_enc
            acts = self.activation_fn(self.hook_sae_acts_pre(inner + self.b_enc))
            if self.cfg.ci_gated:
                acts = acts * self.causal_importance(sae_in, inner)
            return self.hook_sae_acts_post(acts)

        def fold_W_dec_norm(self) -> None:
            if self.cfg.ci_gated:
                raise ValueError("folding decoder norms would rescale the CI function's inputs of a ci_gated export.")
            super().fold_W_dec_norm()

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any]) -> SignedTranscoder:
            return cls(SignedTranscoderConfig.from_dict(config_dict))

    for cls in (SignedTranscoder, SignedTranscoderConfig):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return SignedTranscoder, SignedTranscoderConfig


def __getattr__(name: str) -> Any:
    """`SignedTranscoder` / `SignedTranscoderConfig` by name (isinstance checks, pickling), built on first use."""
    if name in _NAMES:
        return signed_classes()[_NAMES.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
