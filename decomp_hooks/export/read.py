"""SAE-Lens directories read back as plain tensors and config, for comparisons; `to_sae()` for the real object.

    from decomp_hooks.export import load_sae, load_export
    sae = load_sae("out/blocks.0.mlp.W_in")       # W_enc, W_dec, b_enc, b_dec, cfg, hook names, sparsity
    saes = load_export("out/")                     # every site of an export, by site name

Reading needs no sae-lens; `LoadedSAE.to_sae()` imports it and registers the signed architecture first.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.export.format import (
    CFG_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    SIGNED,
    SPARSITY_FILE,
    STANDARD,
    TRANSCODER,
    WEIGHTS_FILE,
    ExportError,
)
from decomp_hooks.export.signed import register

Activation = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _relu(pre: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.relu(pre)


def _jumprelu(pre: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return pre * (pre > tensors["threshold"])


def _identity(pre: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return pre


#: The architectures `LoadedSAE.encode` computes itself: pre-activations (and the stored tensors) -> activations.
ACTIVATIONS: dict[str, Activation] = {
    STANDARD: _relu, TRANSCODER: _relu, "skip_transcoder": _relu,
    "jumprelu": _jumprelu, "jumprelu_transcoder": _jumprelu, "jumprelu_skip_transcoder": _jumprelu,
    SIGNED: _identity,
}


@dataclass
class LoadedSAE:
    """An SAE-Lens directory as plain tensors and config, for comparisons (no sae-lens needed).

    `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`, `b_enc [d_sae]` (None for gated SAEs), `b_dec`, `cfg` (cfg.json),
    the hook names, `sparsity` (log10 firing frequency) when the directory has one, and every stored tensor in
    `tensors`. `components()` recovers V, U, bias from a decomp-hooks export; `to_sae()` loads the real SAE-Lens
    object."""

    path: Path
    cfg: dict
    tensors: dict[str, torch.Tensor]
    sparsity: torch.Tensor | None = None

    @property
    def W_enc(self) -> torch.Tensor:
        return self.tensors["W_enc"]

    @property
    def W_dec(self) -> torch.Tensor:
        return self.tensors["W_dec"]

    @property
    def b_enc(self) -> torch.Tensor | None:
        return self.tensors.get("b_enc")

    @property
    def b_dec(self) -> torch.Tensor:
        return self.tensors["b_dec"]

    @property
    def architecture(self) -> str:
        return self.cfg.get("architecture", "standard")

    @property
    def metadata(self) -> dict:
        md = self.cfg.get("metadata")
        return md if isinstance(md, dict) else self.cfg  # pre-6 configs are flat

    def _hook(self, key: str) -> str | None:
        return self.metadata.get(key) or (self.cfg.get("hook_point") if key == "hook_name" else None)

    @property
    def hook_name(self) -> str | None:
        return self._hook("hook_name")

    @property
    def hook_name_out(self) -> str | None:
        return self._hook("hook_name_out")

    @property
    def hf_hook_name(self) -> str | None:
        return self._hook("hf_hook_name")

    @property
    def hf_hook_name_out(self) -> str | None:
        return self._hook("hf_hook_name_out")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(V [d_in, C], U [C, d_out], bias [d_out])` of a decomp-hooks export (±-split or signed)."""
        if self.architecture == SIGNED:
            return self.W_enc, self.W_dec, self.b_dec
        C = self.metadata.get("C")
        if self.architecture not in (TRANSCODER, STANDARD) or C is None or self.d_sae != 2 * C:
            raise ExportError(f"{str(self.path)!r} is not a ±-split decomp-hooks export (architecture "
                              f"{self.architecture!r}, metadata C={C}); its W_enc/W_dec are the features themselves.")
        return self.W_enc[:, :C], self.W_dec[:C], self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations for ReLU, JumpReLU and ungated signed architectures (others: use `to_sae()`)."""
        arch = self.architecture
        activation = ACTIVATIONS.get(arch)
        if activation is None or self.b_enc is None or self.cfg.get("ci_gated") \
                or self.cfg.get("normalize_activations", "none") != "none":
            raise NotImplementedError(f"encode for architecture {arch!r} with this config: use .to_sae().encode().")
        x = x.to(self.W_enc.dtype)
        if self.cfg.get("reshape_activations") == "hook_z" and x.shape[-1] != self.d_in:
            x = x.flatten(-2)
        if self.cfg.get("apply_b_dec_to_input", False) and "transcoder" not in arch:
            x = x - self.b_dec
        return activation(x @ self.W_enc + self.b_enc, self.tensors)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """`acts W_dec + b_dec` (skip transcoders also add `x W_skipᵀ`, which needs x: use `to_sae()`)."""
        return acts @ self.W_dec + self.b_dec

    def to_sae(self, device: str = "cpu") -> Any:
        """The SAE-Lens object, through `sae_lens.SAE.load_from_disk` (registers the signed architecture first)."""
        register()
        from sae_lens import SAE

        return SAE.load_from_disk(str(self.path), device=device)


def load_sae(path: str | Path) -> LoadedSAE:
    """Read one SAE-Lens directory (`cfg.json` + `sae_weights.safetensors` [+ `sparsity.safetensors`])."""
    path = Path(path)
    if not (path / CFG_FILE).is_file():
        hint = " It is an export root; use load_export() or a site subdirectory." if (path / INDEX_FILE).is_file() else ""
        raise store.StoreError(f"{str(path)!r} is not an SAE-Lens directory: no {CFG_FILE}.{hint}")
    cfg = store.read_json(path / CFG_FILE)
    tensors = store.read_tensors(path / WEIGHTS_FILE)
    missing = [k for k in ("W_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise store.StoreError(f"{str(path / WEIGHTS_FILE)!r} lacks {missing}; it is not an SAE-Lens weights file.")
    sparsity = None
    if (path / SPARSITY_FILE).is_file():
        sparsity = store.read_tensors(path / SPARSITY_FILE).get("sparsity")
    return LoadedSAE(path, cfg, tensors, sparsity)


def load_export(path: str | Path) -> dict[str, LoadedSAE]:
    """Every SAE of an export directory written by `export_decomposition`, by site name."""
    path = Path(path)
    index = store.read_json(path / INDEX_FILE)
    if index.get("format") != INDEX_FORMAT:
        raise store.StoreError(f"{str(path)!r} is not a decomp-hooks SAE-Lens export (format {index.get('format')!r}).")
    return {site: load_sae(path / entry["dir"]) for site, entry in index["sites"].items()}
