"""The SAE-Lens on-disk format: architectures, file names, weight tensors, `cfg.json` and its `metadata` block.

Writing needs no sae-lens: `cfg.json` (v6 layout) and `sae_weights.safetensors` are written directly, so exporting
never pays sae-lens's import time.

Formats (the exported SAE's `architecture`):

- `transcoder` (default; stock SAE-Lens, sae-dashboard): the ±-split of a basis `(encoder E [d_in, k],
  decoder D [k, d_out], b_enc, b_dec)`: `W_enc = [E, −E]`, `b_enc = [b_enc, −b_enc]`, `W_dec = [D; −D]`, `b_dec`,
  `d_sae = 2k`. Exact because `ReLU(h) − ReLU(−h) = h`: `decode(encode(x)) = (x E + b_enc) D + b_dec`.
  Feature c is the positive part of direction c, feature k + c its negative part.
- `decomp_signed_transcoder` (alias `signed`): `W_enc = E`, `W_dec = D` with the identity activation, so feature
  activations are the signed inner activations `a V` (see `decomp_hooks.export.signed`). Optionally gated by
  causal importance (`ci_gated`): the site's CI function is stored in the weights file (`ci_fn.*`).
- `standard` (bases only, `d_in == d_out`): the ±-split on one hook point, for activation-space bases (LIB).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store

TRANSCODER = "transcoder"
SIGNED = "decomp_signed_transcoder"
STANDARD = "standard"
FORMATS = (TRANSCODER, SIGNED)
ALIASES = {"signed": SIGNED}
CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
NEURONPEDIA_FILE, INDEX_FILE = "neuronpedia.json", "export.json"
INDEX_FORMAT = "decomp-hooks/sae-lens-export"
#: the longest file name made from a site name (with suffixes and temporary names it stays under 255 bytes)
MAX_NAME, HASH_CHARS = 128, 10
RECONSTRUCTION = ("decode(encode(x)) = x V U + b: the site output with all components on, without the delta "
                  "component")
GATED_RECONSTRUCTION = ("decode(encode(x)) = ((x V) * g(x)) U + b: the site output under its causal-importance mask, "
                        "without the delta component")


class ExportError(ValueError):
    """An export that cannot be written: unknown format or site, an occupied output directory, bad shapes."""


def package_version(name: str) -> str | None:
    """An installed package's version from its metadata (no import), or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_format(format: str) -> str:
    """The architecture name of `format` (aliases resolved); an unknown name is refused with the choices."""
    name = ALIASES.get(format, format)
    if name not in (TRANSCODER, SIGNED, STANDARD):
        raise ExportError(f"format={format!r}: choose 'transcoder' (±-split, stock SAE-Lens) or {SIGNED!r} "
                          "(alias 'signed'; bases also accept 'standard').")
    return name


def dir_name(site: str, hashed: bool = False) -> str:
    """A site's file and directory name: the site name itself where that is safe (only [A-Za-z0-9._-], no leading
    '.', at most MAX_NAME characters); otherwise, or when `hashed`, a readable prefix (other characters as '_') and
    a hash of the full name, so that no two sites share a name and none is too long for the file system."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", site)
    if safe == site and not site.startswith(".") and len(site) <= MAX_NAME and not hashed:
        return site
    digest = hashlib.sha256(site.encode()).hexdigest()[:HASH_CHARS]
    return f"{safe.lstrip('.')[:MAX_NAME - HASH_CHARS - 1]}-{digest}"


def dir_names(sites: list[str]) -> dict[str, str]:
    """Each site's `dir_name`; sites whose names differ only in case get the hashed form, so that they stay apart on
    case-insensitive file systems too."""
    folded = Counter(dir_name(s).lower() for s in sites)
    return {s: dir_name(s, hashed=folded[dir_name(s).lower()] > 1) for s in sites}


def feature_tensors(encoder: torch.Tensor, decoder: torch.Tensor, b_dec: torch.Tensor | None = None,
                    b_enc: torch.Tensor | None = None, format: str = TRANSCODER) -> dict[str, torch.Tensor]:
    """The SAE-Lens weights of a basis `E [d_in, k]`, `D [k, d_out]` in `format` (±-split unless signed)."""
    fmt = resolve_format(format)
    E, D = encoder.detach().float().cpu(), decoder.detach().float().cpu()
    if E.dim() != 2 or D.dim() != 2 or E.shape[1] != D.shape[0]:
        raise ExportError(f"encoder {tuple(E.shape)} and decoder {tuple(D.shape)} must be [d_in, k] and [k, d_out].")
    (d_in, k), d_out = E.shape, D.shape[1]
    be = torch.zeros(k) if b_enc is None else b_enc.detach().float().cpu()
    bd = torch.zeros(d_out) if b_dec is None else b_dec.detach().float().cpu()
    if be.shape != (k,) or bd.shape != (d_out,):
        raise ExportError(f"b_enc {tuple(be.shape)} / b_dec {tuple(bd.shape)} must be [{k}] / [{d_out}].")
    if fmt == STANDARD and d_in != d_out:
        raise ExportError(f"format='standard' reads and writes one hook point, so d_in must equal d_out "
                          f"(got {d_in} and {d_out}); use 'transcoder'.")
    if fmt == SIGNED:
        tensors = {"W_enc": E, "b_enc": be, "W_dec": D, "b_dec": bd}
    else:
        tensors = {"W_enc": torch.cat([E, -E], 1), "b_enc": torch.cat([be, -be]), "W_dec": torch.cat([D, -D], 0),
                   "b_dec": bd}
    return {n: t.contiguous().clone() for n, t in tensors.items()}


def feature_layout(format: str, k: int) -> str:
    """How the exported features relate to the k directions, for the metadata."""
    if format == SIGNED:
        return f"feature c (0..{k - 1}) = direction c, signed (identity activation)"
    return f"±-split: feature c = ReLU(+h_c), feature {k} + c = ReLU(-h_c), for directions c = 0..{k - 1}"


def sae_metadata(model_name: str | None = None, hook_name: str | None = None, hook_name_out: str | None = None,
                 hf_hook_name: str | None = None, hf_hook_name_out: str | None = None, **extra: Any) -> dict:
    """The `metadata` block: SAE-Lens's keys (v6, `sae_lens_version` ≥ 6) plus free-form provenance keys."""
    md = {"sae_lens_version": package_version("sae-lens") or "6.0.0", "sae_lens_training_version": None,
          "model_name": model_name, "hook_name": hook_name, "hook_head_index": None, "hook_name_out": hook_name_out,
          "hf_hook_name": hf_hook_name, "hf_hook_name_out": hf_hook_name_out}
    md.update(extra)
    return md


def sae_cfg(format: str, d_in: int, d_sae: int, d_out: int, metadata: dict, reshape_activations: str = "none",
            ci: dict | None = None) -> dict:
    """`cfg.json` in the layout `SAEConfig.to_dict()` writes for the architecture."""
    cfg: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": False, "normalize_activations": "none",
                           "reshape_activations": reshape_activations, "metadata": metadata}
    if format != STANDARD:
        cfg["d_out"] = d_out
    if format == SIGNED:
        ci = ci or {}
        cfg.update(ci_gated=bool(ci.get("gated", False)), ci_type=ci.get("type", "mlp"),
                   ci_hidden=list(ci.get("hidden", [])), ci_sigmoid=ci.get("sigmoid", "leaky_hard"))
    cfg["architecture"] = format
    return cfg


@dataclass
class SAEFiles:
    """The files of one SAE-Lens directory."""

    tensors: dict[str, torch.Tensor]
    cfg: dict
    sparsity: torch.Tensor | None = None
    neuronpedia: dict | None = None

    def write(self, directory: Path) -> None:
        """Write into an existing (empty) directory."""
        store.write_tensors(directory / WEIGHTS_FILE, self.tensors)
        store.write_json(directory / CFG_FILE, self.cfg)
        if self.sparsity is not None:
            store.write_tensors(directory / SPARSITY_FILE, {"sparsity": self.sparsity.float()})
        if self.neuronpedia is not None:
            store.write_json(directory / NEURONPEDIA_FILE, self.neuronpedia)
