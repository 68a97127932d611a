"""Writing SAE-Lens directories: one for a basis (`export_basis`), or one per site of a decomposition.

A decomposition export is one directory per site, named after the site, under one output directory with an
`export.json` index; everything is built in a temporary directory and renamed into place. For a site,
`E = V [d_in, C]`, `D = U [C, d_out]`, `b_dec` = the site's bias (0 if none), `b_enc = 0`, so the ungated exports
compute `x V U + b`: the site output with every component on and *without* the delta component
ΔW = W − (V U)ᵀ. ΔW is not part of the export; `metadata.delta_weight_rel_norm` = ‖ΔW‖_F / ‖W‖_F says how far the
exported map is from the target weight. Where a site is read and written comes from the model's adapter.
"""
from __future__ import annotations

import fnmatch
import hashlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.adapters import adapter_for
from decomp_hooks.component_model import key
from decomp_hooks.export import neuronpedia as npd
from decomp_hooks.export.format import (
    GATED_RECONSTRUCTION,
    INDEX_FILE,
    INDEX_FORMAT,
    RECONSTRUCTION,
    SIGNED,
    STANDARD,
    TRANSCODER,
    ExportError,
    SAEFiles,
    dir_names,
    feature_layout,
    feature_tensors,
    package_version,
    resolve_format,
    sae_cfg,
    sae_metadata,
)
from decomp_hooks.export.inputs import check_count
from decomp_hooks.export.statistics import Statistics, collect_statistics


def export_basis(path: str | Path, encoder: torch.Tensor, decoder: torch.Tensor, b_dec: torch.Tensor | None = None,
                 b_enc: torch.Tensor | None = None, *, format: str = TRANSCODER, hook_name: str | None = None,
                 hook_name_out: str | None = None, hf_hook_name: str | None = None,
                 hf_hook_name_out: str | None = None, model_name: str | None = None, metadata: dict | None = None,
                 sparsity: torch.Tensor | None = None, overwrite: bool = False) -> Path:
    """Write one SAE-Lens directory for a basis: `encoder [d_in, k]` (e.g. a LIB basis), `decoder [k, d_out]` (e.g.
    its pseudo-inverse), biases, hook names and free-form `metadata`; `sparsity` is log10 firing frequency per
    exported feature. `decode(encode(x)) = (x E + b_enc) D + b_dec` exactly in every format."""
    fmt = resolve_format(format)
    if fmt == STANDARD and hook_name_out not in (None, hook_name):
        raise ExportError("format='standard' has one hook point; leave hook_name_out unset or equal to hook_name.")
    if fmt != STANDARD and hook_name_out is None:
        hook_name_out = hook_name  # a transcoder that writes back where it reads, stated explicitly
    tensors = feature_tensors(encoder, decoder, b_dec, b_enc, fmt)
    d_in, d_sae = tensors["W_enc"].shape
    d_out, k = tensors["W_dec"].shape[1], encoder.shape[1]
    if sparsity is not None and tuple(sparsity.shape) != (d_sae,):
        raise ExportError(f"sparsity has shape {tuple(sparsity.shape)}; expected [{d_sae}] (one value per feature).")
    md = sae_metadata(model_name, hook_name, hook_name_out if fmt != STANDARD else None, hf_hook_name,
                      hf_hook_name_out, **(metadata or {}))
    md.update(export_format=fmt, feature_layout=feature_layout(fmt, k),
              decomp_hooks_version=package_version("decomp-hooks"))
    reshape = "hook_z" if (hook_name or "").endswith("hook_z") else "none"
    files = SAEFiles(tensors, sae_cfg(fmt, d_in, d_sae, d_out, md, reshape), sparsity)
    with store.atomic_dir(path, overwrite=store.replaceable_dir(path, overwrite, ExportError)) as tmp:
        files.write(tmp)
    return Path(path)


def select_sites(dec: Any, sites: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Decomposed sites matching the fnmatch patterns (all when None); sites that read token ids are skipped with a
    warning."""
    names = dec.site_names
    if sites is None:
        chosen = list(names)
    else:
        patterns = [sites] if isinstance(sites, str) else list(sites) if isinstance(sites, Iterable) else None
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ExportError(f"sites={sites!r}: pass fnmatch patterns (a string or a non-empty list of strings), or "
                              f"None for every site; the sites are {names}.")
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ExportError(f"site pattern {p!r} matches no decomposed site; the sites are {names}.")
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    embeddings = [n for n in chosen if dec.cm.sites[n].kind.reads_tokens]
    if embeddings:
        warnings.warn(f"skipping embedding sites {embeddings}: they read token ids, not activations, so they have "
                      "no SAE-Lens equivalent.", stacklevel=3)
    chosen = [n for n in chosen if n not in embeddings]
    if not chosen:
        raise ExportError(f"nothing to export: the selected sites {embeddings} are all embeddings.")
    return chosen


def run_id(dec: Any) -> str:
    """The run id from the provenance, else a content id: a hash of every site's V and U."""
    if dec.provenance.get("run_id"):
        return str(dec.provenance["run_id"])
    h = hashlib.sha256()
    for name in dec.site_names:
        comps = dec.cm.component(name)
        h.update(name.encode())
        for t in (comps.V, comps.U):
            h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return "dh-" + h.hexdigest()[:16]


def delta_rel_norm(comps: Any) -> float | None:
    """‖ΔW‖_F / ‖W‖_F with ΔW = W − (V U)ᵀ: the part of the target weight the export leaves out."""
    with torch.no_grad():
        w = comps.target_weight.float()
        wn = w.norm().item()
        return None if wn == 0 else (w - comps.V.float() @ comps.U.float()).norm().item() / wn


def ci_tensors(dec: Any, name: str) -> dict[str, torch.Tensor]:
    """The site's CI function as `ci_fn.*` weights, for a `ci_gated` signed export."""
    return {f"ci_fn.{k}": v.detach().float().cpu().contiguous().clone()
            for k, v in dec.cm.ci_fns[key(name)].state_dict().items()}


def site_files(dec: Any, name: str, directory: str, fmt: str, context: dict, rid: str, ci_gated: bool = False,
               statistics: Statistics | None = None, tokenizer: Any = None, dataset: str = "",
               provenance: dict | None = None) -> tuple[SAEFiles, dict]:
    """The SAE-Lens files of one decomposed site, and its entry in the export index (`directory`: its name there)."""
    comps, site = dec.cm.component(name), dec.cm.sites[name]
    adapter = adapter_for(dec.model)
    tensors = feature_tensors(comps.V, comps.U, comps.bias, None, fmt)
    hooks = adapter.hook_names(dec.model, site)
    note = hooks.note
    if fmt == TRANSCODER and hooks.reshape_activations == "hook_z":
        note = ("sae-lens's stock Transcoder does not flatten hook_z inputs, so HookedSAETransformer cannot splice this "
                f"export; encode z.flatten(-2), or export as {SIGNED!r}, which flattens heads itself")
    rel = delta_rel_norm(comps)
    ci = None
    if ci_gated:
        cfg_ci = dec.config.ci
        ci = {"gated": True, "type": cfg_ci.type, "hidden": list(cfg_ci.hidden), "sigmoid": cfg_ci.sigmoid}
        tensors.update(ci_tensors(dec, name))
    extra = {"model_class_name": context.get("model_class_name"), "context_size": context.get("context_size"),
             "prepend_bos": context.get("prepend_bos"), "dataset_path": dataset or None,
             "method": dec.config.method, "site": name, "site_kind": site.kind.value, "C": comps.C,
             "run_id": rid, "steps": dec.step, "source_config": dec.config.to_dict(),
             "export_format": fmt, "feature_layout": feature_layout(fmt, comps.C),
             "reconstruction": GATED_RECONSTRUCTION if ci_gated else RECONSTRUCTION,
             "delta_in_export": False, "delta_weight_rel_norm": rel,
             "target_fingerprint": store.fingerprint(site.weight()),
             "decomp_hooks_version": package_version("decomp-hooks")}
    if hooks.hf_hook_io is not None:
        extra["hf_hook_io"] = hooks.hf_hook_io
    if note:
        extra["hook_note"] = note
    sparsity = neuronpedia = None
    if statistics is not None:
        stats = statistics.stats[name]
        sparsity = stats.log_sparsity()
        extra.update(firing_threshold=stats.threshold, sparsity_source=(
            f"causal importance > {stats.threshold} over {stats.positions} positions"))
        if statistics.text:
            unembed = adapter.unembedding(dec.model) if adapter.writes_residual(dec.model, site) else None
            if unembed is not None and unembed.shape[0] != tensors["W_dec"].shape[1]:
                unembed = None
            neuronpedia = npd.batch_json(
                stats, statistics.windows[name], tokenizer, tensors["W_dec"], None if unembed is None else unembed.cpu(),
                model_id=context["model_name"], layer=npd.layer_of(hooks.hook_name or name),
                sae_set=f"{dec.config.method}-{fmt}", sae_id_suffix=directory, n_prompts=statistics.n_prompts,
                n_tokens=statistics.n_tokens, dataset=dataset)
    extra.update(provenance or {})
    md = sae_metadata(context["model_name"], **hooks.names(), **extra)
    d_in, d_sae = tensors["W_enc"].shape
    cfg = sae_cfg(fmt, d_in, d_sae, comps.d_out, md, hooks.reshape_activations, ci)
    files = SAEFiles(tensors, cfg, sparsity, neuronpedia)
    entry = {"dir": directory, "d_in": d_in, "d_out": comps.d_out, "C": comps.C, "d_sae": d_sae,
             **hooks.names(), "delta_weight_rel_norm": rel, "sparsity": sparsity is not None,
             "neuronpedia": neuronpedia is not None}
    return files, entry


def export_decomposition(dec: Any, path: str | Path, format: str = TRANSCODER,
                         sites: str | list[str] | tuple[str, ...] | None = None, data: Any = None,
                         overwrite: bool = False, *, ci_gated: bool = False, model_name: str | None = None,
                         tokenizer: Any = None, dataset: str = "", batch_size: int = 32,
                         max_batches: int | None = None, n_examples: int = 20,
                         provenance: dict | None = None) -> dict[str, Path]:
    """Write one SAE-Lens directory per selected site under `path` (see `Decomposition.export`)."""
    fmt = resolve_format(format)
    if fmt == STANDARD:
        raise ExportError("format='standard' is for activation-space bases (export_basis); decomposition sites export "
                          f"as 'transcoder' or {SIGNED!r}.")
    if ci_gated and fmt != SIGNED:
        raise ExportError(f"ci_gated=True needs format={SIGNED!r}: stock transcoders have no place for a CI function.")
    if ci_gated and len(dec.cm.ci_fns) == 0:
        raise ExportError(f"ci_gated=True needs causal-importance functions, and this {dec.config.method} decomposition "
                          "has none; export it ungated.")
    check_count("batch_size", batch_size, ExportError)
    check_count("max_batches", max_batches, ExportError, optional=True)
    check_count("n_examples", n_examples, ExportError, minimum=0)
    names = select_sites(dec, sites)
    if ci_gated and not all(key(n) in dec.cm.ci_fns for n in names):
        raise ExportError(f"ci_gated=True needs a causal-importance function per site, and this decomposition has one "
                          f"global function (ci.type={dec.config.ci.type!r}) that reads every site; export it ungated.")
    dirs = dir_names(names)
    replace = store.replaceable_dir(path, overwrite, ExportError, inputs=(dec.run_dir,))
    context = adapter_for(dec.model).model_context(dec.model, model_name)
    rid = run_id(dec)
    statistics = None
    if data is not None:
        statistics = collect_statistics(dec, names, fmt, data, batch_size, max_batches, n_examples)
    if tokenizer is None:
        tokenizer = getattr(dec.model, "tokenizer", None)
    built = {n: site_files(dec, n, dirs[n], fmt, context, rid, ci_gated, statistics, tokenizer, dataset, provenance)
             for n in names}
    index = {"format": INDEX_FORMAT, "version": 1, "sae_format": fmt, "ci_gated": ci_gated, "run_id": rid,
             "method": dec.config.method, "steps": dec.step, "model_name": context["model_name"],
             "sites": {n: entry for n, (_, entry) in built.items()}}
    with store.atomic_dir(path, overwrite=replace) as tmp:
        for n, (files, entry) in built.items():
            (tmp / entry["dir"]).mkdir()
            files.write(tmp / entry["dir"])
        store.write_json(tmp / INDEX_FILE, index)
    return {n: Path(path) / entry["dir"] for n, (_, entry) in built.items()}
