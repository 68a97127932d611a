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

        try:
            return SAE.load_from_disk(str(self.path), device=device)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise store.StoreError(f"sae-lens cannot load {str(self.path)!r} as a {self.architecture!r} SAE "
                                   f"({type(err).__name__}: {err}); check its cfg.json against its weights.") from None


def check_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a weights file without `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]` and `b_dec [d_out]` of agreeing
    shapes (and `b_enc [d_sae]` where present), naming what it holds."""
    missing = [k for k in ("W_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise store.StoreError(f"{str(path)!r} lacks {missing}; it is not an SAE-Lens weights file.")
    W_enc, W_dec, b_dec, b_enc = (tensors.get(k) for k in ("W_enc", "W_dec", "b_dec", "b_enc"))
    if W_enc.dim() != 2 or W_dec.dim() != 2 or W_dec.shape[0] != W_enc.shape[1] or \
            tuple(b_dec.shape) != (W_dec.shape[1],) or (b_enc is not None and tuple(b_enc.shape) != (W_enc.shape[1],)):
        shapes = {k: list(t.shape) for k, t in tensors.items() if k in ("W_enc", "W_dec", "b_dec", "b_enc")}
        raise store.StoreError(f"{str(path)!r} holds {shapes}; an SAE-Lens weights file has W_enc [d_in, d_sae], "
                               "W_dec [d_sae, d_out], b_dec [d_out] and b_enc [d_sae]. It is corrupt or was edited.")


def load_sae(path: str | Path) -> LoadedSAE:
    """Read one SAE-Lens directory (`cfg.json` + `sae_weights.safetensors` [+ `sparsity.safetensors`])."""
    path = Path(path)
    if not (path / CFG_FILE).is_file():
        hint = " It is an export root; use load_export() or a site subdirectory." if (path / INDEX_FILE).is_file() else ""
        reason = f"no {CFG_FILE}" if path.exists() else "it does not exist"
        raise store.StoreError(f"{str(path)!r} is not an SAE-Lens directory: {reason}.{hint}")
    cfg = store.read_json(path / CFG_FILE)
    if not isinstance(cfg, dict):
        raise store.StoreError(f"{str(path / CFG_FILE)!r} holds a JSON {type(cfg).__name__}, not an SAE-Lens config "
                               "(a JSON object with d_in, d_sae, architecture, ...).")
    tensors = store.read_tensors(path / WEIGHTS_FILE)
    check_weights(path / WEIGHTS_FILE, tensors)
    sparsity = None
    if (path / SPARSITY_FILE).is_file():
        sparsity = store.read_tensors(path / SPARSITY_FILE).get("sparsity")
    return LoadedSAE(path, cfg, tensors, sparsity)


def export_dirs(path: Path) -> dict[str, Path]:
    """Each site's directory from the export index at `path`, all checked before any is read: the index must be a
    decomp-hooks export's and every `dir` a plain name inside `path`, so an edited index cannot send reads elsewhere."""
    index_file = path / INDEX_FILE
    if not index_file.is_file() and (path / CFG_FILE).is_file():
        raise store.StoreError(f"{str(path)!r} is one SAE-Lens directory, not an export root (no {INDEX_FILE}); read "
                               "it with load_sae().")
    index = store.read_json(index_file)
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt != INDEX_FORMAT or not isinstance(index.get("sites"), dict):
        raise store.StoreError(f"{str(index_file)!r} is not a decomp-hooks SAE-Lens export index (format {fmt!r}, "
                               f"expected {INDEX_FORMAT!r} with a 'sites' table); for one SAE-Lens directory use "
                               "load_sae().")
    root, dirs = path.resolve(), {}
    for site, entry in index["sites"].items():
        name = entry.get("dir") if isinstance(entry, dict) else None
        plain = isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
        if not plain or (path / name).resolve().parent != root:
            raise store.StoreError(f"{str(index_file)!r}: site {site!r} has dir {name!r}, which is not a directory "
                                   f"inside {str(path)!r}; an export names each site's directory by a plain name "
                                   "beside export.json. The index was edited or is not from decomp-hooks: export "
                                   "again.")
        dirs[site] = path / name
    return dirs


def load_export(path: str | Path) -> dict[str, LoadedSAE]:
    """Every SAE of an export directory written by `export_decomposition`, by site name."""
    return {site: load_sae(d) for site, d in export_dirs(Path(path)).items()}
