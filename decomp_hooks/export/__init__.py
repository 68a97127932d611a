"""Exports to the field's shared tooling: SAE-Lens directories and Neuronpedia-style feature JSON; reading them back.

    dec.export("out/", format="transcoder")                # one SAE-Lens directory per site
    from decomp_hooks.export import load_sae, export_basis
    sae = load_sae("out/blocks.0.mlp.W_in")                  # W_enc, W_dec, b_enc, b_dec, cfg, hook names

Modules: `format` (the on-disk format), `write` (writing bases and decompositions), `statistics` (sparsity and top
examples from the activation pass), `neuronpedia` (feature statistics and JSON), `read` (loading back), `signed`
(the signed architecture in sae-lens). Nothing here imports sae_lens until asked: `register()` makes sae-lens's
`SAE.load_from_disk` read signed exports, and `LoadedSAE.to_sae()` calls it.
"""
from __future__ import annotations

from decomp_hooks.export.format import FORMATS, SIGNED, STANDARD, TRANSCODER, ExportError, feature_tensors
from decomp_hooks.export.read import LoadedSAE, load_export, load_sae
from decomp_hooks.export.signed import register
from decomp_hooks.export.write import export_basis, export_decomposition

__all__ = ["FORMATS", "SIGNED", "STANDARD", "TRANSCODER", "ExportError", "LoadedSAE", "export_basis",
           "export_decomposition", "feature_tensors", "load_export", "load_sae", "register"]
