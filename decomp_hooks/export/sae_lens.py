"""SAE-Lens directories from decompositions and bases, and SAE-Lens directories read back for comparison.

Writing needs no sae-lens: `cfg.json` (v6 layout) and `sae_weights.safetensors` are written directly, so exporting
never pays sae-lens's import time. One directory per site, named after the site, under one output directory with an
`export.json` index; everything is built in a temporary directory and renamed into place.

Formats (the exported SAE's `architecture`):

- `transcoder` (default; stock SAE-Lens, sae-dashboard): the ±-split of a basis `(encoder E [d_in, k],
  decoder D [k, d_out], b_enc, b_dec)`: `W_enc = [E, −E]`, `b_enc = [b_enc, −b_enc]`, `W_dec = [D; −D]`, `b_dec`,
  `d_sae = 2k`. Exact because `ReLU(h) − ReLU(−h) = h`: `decode(encode(x)) = (x E + b_enc) D + b_dec`.
  Feature c is the positive part of direction c, feature k + c its negative part.
- `decomp_signed_transcoder` (alias `signed`): `W_enc = E`, `W_dec = D` with the identity activation, so feature
  activations are the signed inner activations `a V`. Registered with `sae_lens.register_sae_class` (see
  `register`). Optionally gated by causal importance (`ci_gated=True`): the site's CI function is stored in the
  weights file (`ci_fn.*`) and `encode(x) = (x V) ⊙ g(x)`, so `decode(encode(x))` is the CI-masked site output.
- `standard` (bases only, `d_in == d_out`): the ±-split on one hook point, for activation-space bases (LIB).

For a decomposition site, `E = V [d_in, C]`, `D = U [C, d_out]`, `b_dec` = the site's bias (0 if none), `b_enc = 0`,
so the ungated exports compute `x V U + b`: the site output with every component on and *without* the delta
component ΔW = W − (V U)ᵀ. ΔW is not part of the export; `metadata.delta_weight_rel_norm` = ‖ΔW‖_F / ‖W‖_F says
how far the exported map is from the target weight.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.export import neuronpedia as npd

TRANSCODER = "transcoder"
SIGNED = "decomp_signed_transcoder"
STANDARD = "standard"
FORMATS = (TRANSCODER, SIGNED)
ALIASES = {"signed": SIGNED}
CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
NEURONPEDIA_FILE, INDEX_FILE = "neuronpedia.json", "export.json"
INDEX_FORMAT = "decomp-hooks/sae-lens-export"
RECONSTRUCTION = {
    TRANSCODER: "decode(encode(x)) = x V U + b: the site output with all components on, without the delta component",
    SIGNED: "decode(encode(x)) = x V U + b: the site output with all components on, without the delta component",
}
GATED_RECONSTRUCTION = ("decode(encode(x)) = ((x V) * g(x)) U + b: the site output under its causal-importance mask, "
                        "without the delta component")
_RESID_WRITERS = re.compile(r"(?:^|\.)(?:mlp\.c_proj|attn\.c_proj|mlp\.down_proj|self_attn\.o_proj)$")
_GPT2_TL = {"mlp.c_fc": ("mlp.hook_in", "mlp.hook_pre", "none"), "mlp.c_proj": ("mlp.hook_post", "hook_mlp_out", "none"),
            "attn.c_proj": ("attn.hook_z", "hook_attn_out", "hook_z")}


class ExportError(ValueError):
    """An export that cannot be written: unknown format or site, an occupied output directory, bad shapes."""


def sae_lens_version() -> str:
    """The installed sae-lens version (read from package metadata, no import); 6.0.0 when it is not installed."""
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"


def _own_version() -> str | None:
    try:
        return importlib.metadata.version("decomp-hooks")
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_format(format: str) -> str:
    name = ALIASES.get(format, format)
    if name not in (TRANSCODER, SIGNED, STANDARD):
        raise ExportError(f"format={format!r}: choose 'transcoder' (±-split, stock SAE-Lens) or {SIGNED!r} "
                          "(alias 'signed'; bases also accept 'standard').")
    return name


# -- tensors and cfg.json -----------------------------------------------------------------------------------------

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
    if format == SIGNED:
        return f"feature c (0..{k - 1}) = direction c, signed (identity activation)"
    return f"±-split: feature c = ReLU(+h_c), feature {k} + c = ReLU(-h_c), for directions c = 0..{k - 1}"


def sae_metadata(model_name: str | None = None, hook_name: str | None = None, hook_name_out: str | None = None,
                 hf_hook_name: str | None = None, hf_hook_name_out: str | None = None, **extra: Any) -> dict:
    """The `metadata` block: SAE-Lens's keys (v6, `sae_lens_version` ≥ 6) plus free-form provenance keys."""
    md = {"sae_lens_version": sae_lens_version(), "sae_lens_training_version": None, "model_name": model_name,
          "hook_name": hook_name, "hook_head_index": None, "hook_name_out": hook_name_out,
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
    md.update(export_format=fmt, feature_layout=feature_layout(fmt, k), decomp_hooks_version=_own_version())
    reshape = "hook_z" if (hook_name or "").endswith("hook_z") else "none"
    files = SAEFiles(tensors, sae_cfg(fmt, d_in, d_sae, d_out, md, reshape), sparsity)
    with store.atomic_dir(path, overwrite=store.replaceable_dir(path, overwrite, ExportError)) as tmp:
        files.write(tmp)
    return Path(path)


# -- where a site is read and written ------------------------------------------------------------------------------

def site_hooks(model: Any, site: Any) -> dict:
    """Hook names for a site: TransformerLens `hook_name`/`hook_name_out` where one hook carries exactly the site's
    input and another its output, HF module paths `hf_hook_name`/`hf_hook_name_out` for torch/HF sites."""
    from decomp_hooks.adapters.transformer_lens import Route, _is_class

    out = {"hook_name": None, "hook_name_out": None, "hf_hook_name": None, "hf_hook_name_out": None,
           "reshape_activations": "none", "hook_note": None}
    name = site.name
    if _is_class(model, "HookedTransformer"):
        if re.fullmatch(r"blocks\.\d+\.attn\.W_[QKV]", name):
            out["hook_note"] = ("per-head attention projections write hook_q/k/v [.., n_heads, d_head] from a "
                                "normalised input no hook carries: no single-hook transcoder equivalent")
            return out
        if re.fullmatch(r"blocks\.\d+\.mlp\.W_(in|gate)", name):  # HookedSAETransformer's mlp.hook_in is the MLP input
            out["hook_name"], out["hook_name_out"] = f"{name.rsplit('.', 1)[0]}.hook_in", site.route.write
            return out
    route = getattr(site, "hook_route", None)
    if _is_class(model, "HookedTransformer", "TransformerBridge"):
        if isinstance(route, Route) and route.read.fn is None:
            out["hook_name"], out["hook_name_out"] = route.read.module, route.write
            if route.read.module.endswith("hook_z"):
                out["reshape_activations"] = "hook_z"
        else:
            out["hook_note"] = route if isinstance(route, str) else "no TransformerLens hook pair carries this site"
        return out
    module = name.removesuffix(".pre_identity") if site.kind == "identity" else name
    out["hf_hook_name"], out["hf_hook_name_out"] = module, module
    out["hf_hook_io"] = {"hf_hook_name": "input", "hf_hook_name_out": "input" if site.kind == "identity" else "output"}
    if type(model).__name__ in ("GPT2LMHeadModel", "GPT2Model"):  # TL hooks of the same GPT-2 as HookedSAETransformer
        m = re.fullmatch(r"(?:transformer\.)?h\.(\d+)\.(mlp\.c_fc|mlp\.c_proj|attn\.c_proj)", name)
        if m:
            hook_in, hook_out, reshape = _GPT2_TL[m.group(2)]
            out.update(hook_name=f"blocks.{m.group(1)}.{hook_in}", hook_name_out=f"blocks.{m.group(1)}.{hook_out}",
                       reshape_activations=reshape)
        elif name == "lm_head":
            out.update(hook_name="unembed.hook_in", hook_name_out="unembed.hook_out")
    return out


def model_context(model: Any, model_name: str | None = None) -> dict:
    """`model_name`, `model_class_name`, `context_size`, `prepend_bos` of the decomposed model, where known."""
    from decomp_hooks.adapters.transformer_lens import _is_class

    ctx: dict[str, Any] = {"model_name": None, "model_class_name": type(model).__name__}
    cfg = getattr(model, "cfg", None)
    if _is_class(model, "HookedTransformer", "TransformerBridge") and cfg is not None:
        ctx.update(model_name=getattr(cfg, "model_name", None), context_size=getattr(cfg, "n_ctx", None),
                   prepend_bos=getattr(cfg, "default_prepend_bos", None))
        if _is_class(model, "HookedTransformer"):
            ctx["model_class_name"] = "HookedTransformer"
    elif hasattr(getattr(model, "config", None), "to_dict"):  # a transformers model
        hf = model.config
        ctx["model_name"] = getattr(hf, "_name_or_path", None) or getattr(hf, "model_type", None)
        ctx["context_size"] = getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)
        if hasattr(model, "generate"):
            ctx["model_class_name"] = "AutoModelForCausalLM"
    if not ctx["model_name"]:
        ctx["model_name"] = type(model).__name__
    if model_name:
        ctx["model_name"] = model_name
    return ctx


def unembedding(model: Any) -> torch.Tensor | None:
    """The unembedding `[d_model, vocab]` (TL `W_U`, HF output embeddings), or None."""
    try:
        if hasattr(model, "W_U"):
            return model.W_U.detach()
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return None if out is None else out.weight.detach().T
    except (AttributeError, RuntimeError, TypeError):
        return None


# -- decompositions ------------------------------------------------------------------------------------------------

def select_sites(dec: Any, sites: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Decomposed sites matching the fnmatch patterns (all when None); embedding sites are skipped with a warning."""
    names = dec.site_names
    if sites is None:
        chosen = list(names)
    else:
        patterns = [sites] if isinstance(sites, str) else list(sites)
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ExportError(f"site pattern {p!r} matches no decomposed site; the sites are {names}.")
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    embeddings = [n for n in chosen if dec.cm.sites[n].kind == "embedding"]
    if embeddings:
        warnings.warn(f"skipping embedding sites {embeddings}: they read token ids, not activations, so they have "
                      "no SAE-Lens equivalent.", stacklevel=3)
    chosen = [n for n in chosen if n not in embeddings]
    if not chosen:
        raise ExportError(f"nothing to export: the selected sites {embeddings} are all embeddings.")
    return chosen


def dir_name(site: str) -> str:
    """The directory name of a site's SAE (the site name, with characters outside [A-Za-z0-9._-] as '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", site)


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


@dataclass
class Statistics:
    """Per-site feature statistics over the evaluation data, and the token windows of the top examples."""

    stats: dict[str, npd.FeatureStats]
    windows: dict[str, npd.Windows] = field(default_factory=dict)
    n_prompts: int = 0
    n_tokens: int = 0
    text: bool = False


def collect_statistics(dec: Any, names: list[str], format: str, data: Any, batch_size: int = 32,
                       max_batches: int | None = None, n_examples: int = 20) -> Statistics:
    """One pass over `data` for firing counts and top examples; a second over the sequences holding the examples."""
    from decomp_hooks.data import to_device

    split = format != SIGNED
    tau = dec.config.ci_alive_threshold
    stats = {n: npd.FeatureStats(dec.cm.component(n).C, split, tau, n_examples) for n in names}
    tokens, seq_len, text, offset, seen = [], None, True, 0, 0
    for batch in npd.batches(data, batch_size, max_batches):
        batch = to_device(batch, dec.device)
        _, cache = dec.run_with_cache(batch)
        ids = npd.token_ids(batch)
        if ids is None or seq_len not in (None, ids.shape[1]):
            text = False
        for n in names:
            stats[n].update(cache[f"{n}.hook_ci"], cache[f"{n}.hook_component_acts"], offset)
        if ids is not None:
            seq_len, offset = ids.shape[1], offset + ids.numel()
            if text:
                tokens.append(ids.cpu())
        seen += 1
    if not seen:
        raise ExportError("the export data yielded no batches.")
    if not text or not n_examples:
        return Statistics(stats)
    all_tokens = torch.cat(tokens)
    result = Statistics(stats, {n: {} for n in names}, all_tokens.shape[0], seq_len, True)
    wanted: dict[str, dict[int, list[tuple[int, int]]]] = {n: {} for n in names}
    for n in names:
        for f in range(stats[n].F):
            for _, pos in stats[n].examples(f):
                wanted[n].setdefault(pos // seq_len, []).append((f, pos))
    seqs = npd.needed_sequences(stats.values(), seq_len)
    for chunk in [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]:
        _, cache = dec.run_with_cache(all_tokens[chunk].to(dec.device))
        for n in names:
            v = npd.feature_values(cache[f"{n}.hook_ci"], cache[f"{n}.hook_component_acts"], split).cpu()
            for row, seq in enumerate(chunk):
                for f, pos in wanted[n].get(seq, []):
                    _, start, stop, q = npd.window(pos, seq_len)
                    result.windows[n][f, pos] = (all_tokens[seq, start:stop].tolist(), v[row, start:stop, f].tolist(), q)
    return result


def site_files(dec: Any, name: str, fmt: str, context: dict, rid: str, ci_gated: bool = False,
               statistics: Statistics | None = None, tokenizer: Any = None, dataset: str = "",
               provenance: dict | None = None) -> tuple[SAEFiles, dict]:
    """The SAE-Lens files of one decomposed site, and its entry in the export index."""
    from decomp_hooks.component_model import key

    comps, site = dec.cm.component(name), dec.cm.sites[name]
    tensors = feature_tensors(comps.V, comps.U, comps.bias, None, fmt)
    hooks = site_hooks(dec.model, site)
    reshape = hooks.pop("reshape_activations")
    note = hooks.pop("hook_note")
    io = hooks.pop("hf_hook_io", None)
    if fmt == TRANSCODER and reshape == "hook_z":
        note = ("sae-lens's stock Transcoder does not flatten hook_z inputs, so HookedSAETransformer cannot splice this "
                f"export; encode z.flatten(-2), or export as {SIGNED!r}, which flattens heads itself")
    rel = delta_rel_norm(comps)
    ci = None
    if ci_gated:
        cfg_ci = dec.config.ci
        ci = {"gated": True, "type": cfg_ci.type, "hidden": list(cfg_ci.hidden), "sigmoid": cfg_ci.sigmoid}
        for k, v in dec.cm.ci_fns[key(name)].state_dict().items():
            tensors[f"ci_fn.{k}"] = v.detach().float().cpu().contiguous().clone()
    extra = {"model_class_name": context.get("model_class_name"), "context_size": context.get("context_size"),
             "prepend_bos": context.get("prepend_bos"), "dataset_path": dataset or None,
             "method": dec.config.method, "site": name, "site_kind": site.kind, "C": comps.C,
             "run_id": rid, "steps": dec.step, "source_config": dec.config.to_dict(),
             "export_format": fmt, "feature_layout": feature_layout(fmt, comps.C),
             "reconstruction": GATED_RECONSTRUCTION if ci_gated else RECONSTRUCTION[fmt],
             "delta_in_export": False, "delta_weight_rel_norm": rel,
             "target_fingerprint": store.fingerprint(site.weight()), "decomp_hooks_version": _own_version()}
    if io is not None:
        extra["hf_hook_io"] = io
    if note:
        extra["hook_note"] = note
    sparsity = neuronpedia = None
    if statistics is not None:
        stats = statistics.stats[name]
        sparsity = stats.log_sparsity()
        extra.update(firing_threshold=stats.threshold, sparsity_source=(
            f"causal importance > {stats.threshold} over {stats.positions} positions"))
        if statistics.text:
            writes_resid = (hooks["hook_name_out"] or "").endswith(("hook_mlp_out", "hook_attn_out")) or \
                bool(_RESID_WRITERS.search(name))
            unembed = unembedding(dec.model) if writes_resid else None
            if unembed is not None and unembed.shape[0] != tensors["W_dec"].shape[1]:
                unembed = None
            neuronpedia = npd.batch_json(
                stats, statistics.windows[name], tokenizer, tensors["W_dec"], None if unembed is None else unembed.cpu(),
                model_id=context["model_name"], layer=npd.layer_of(hooks["hook_name"] or name),
                sae_set=f"{dec.config.method}-{fmt}", sae_id_suffix=dir_name(name), n_prompts=statistics.n_prompts,
                n_tokens=statistics.n_tokens, dataset=dataset)
    extra.update(provenance or {})
    md = sae_metadata(context["model_name"], **hooks, **extra)
    d_in, d_sae = tensors["W_enc"].shape
    files = SAEFiles(tensors, sae_cfg(fmt, d_in, d_sae, comps.d_out, md, reshape, ci), sparsity, neuronpedia)
    entry = {"dir": dir_name(name), "d_in": d_in, "d_out": comps.d_out, "C": comps.C, "d_sae": d_sae,
             **hooks, "delta_weight_rel_norm": rel, "sparsity": sparsity is not None,
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
    names = select_sites(dec, sites)
    dirs = [dir_name(n) for n in names]
    if len(set(dirs)) != len(dirs):
        raise ExportError(f"site names {names} give clashing directory names {dirs}.")
    replace = store.replaceable_dir(path, overwrite, ExportError)
    context = model_context(dec.model, model_name)
    rid = run_id(dec)
    statistics = None
    if data is not None:
        statistics = collect_statistics(dec, names, fmt, data, batch_size, max_batches, n_examples)
    if tokenizer is None:
        tokenizer = getattr(dec.model, "tokenizer", None)
    built = {n: site_files(dec, n, fmt, context, rid, ci_gated, statistics, tokenizer, dataset, provenance)
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


# -- reading SAE-Lens directories back ----------------------------------------------------------------------------

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
        if self.b_enc is None or self.cfg.get("ci_gated") or self.cfg.get("normalize_activations", "none") != "none" \
                or arch not in ("standard", "transcoder", "skip_transcoder", "jumprelu", "jumprelu_transcoder",
                                "jumprelu_skip_transcoder", SIGNED):
            raise NotImplementedError(f"encode for architecture {arch!r} with this config: use .to_sae().encode().")
        x = x.to(self.W_enc.dtype)
        if self.cfg.get("reshape_activations") == "hook_z" and x.shape[-1] != self.d_in:
            x = x.flatten(-2)
        if self.cfg.get("apply_b_dec_to_input", False) and "transcoder" not in arch:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if arch == SIGNED:
            return pre
        if arch.startswith("jumprelu"):
            return pre * (pre > self.tensors["threshold"])
        return torch.relu(pre)

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


# -- the signed architecture in sae-lens ---------------------------------------------------------------------------

_CLASSES: tuple[type, type] | None = None


def signed_classes() -> tuple[type, type]:
    """`(SignedTranscoder, SignedTranscoderConfig)`, defined on first use (this imports sae_lens)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _define_classes()
        globals().update(SignedTranscoder=_CLASSES[0], SignedTranscoderConfig=_CLASSES[1])
    return _CLASSES


def _define_classes() -> tuple[type, type]:
    from dataclasses import dataclass as sae_dataclass
    from dataclasses import field as sae_field

    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
    from sae_lens.util import filter_valid_dataclass_fields
    from torch import nn

    from decomp_hooks.causal_importance import SIGMOIDS, make_ci_fn

    @sae_dataclass
    class SignedTranscoderConfig(TranscoderConfig):
        """A `TranscoderConfig` with the causal-importance gate's settings (used only when `ci_gated`)."""

        apply_b_dec_to_input: bool = False
        ci_gated: bool = False
        ci_type: str = "mlp"
        ci_hidden: list[int] = sae_field(default_factory=list)
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
                fn = make_ci_fn(self.cfg.ci_type, "linear", self.cfg.d_in, self.cfg.d_sae, list(self.cfg.ci_hidden))
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
    if name in ("SignedTranscoder", "SignedTranscoderConfig"):
        return dict(zip(("SignedTranscoder", "SignedTranscoderConfig"), signed_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> bool:
    """Register `decomp_signed_transcoder` with sae-lens (idempotent; imports sae_lens). False without sae-lens."""
    try:
        from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    except ImportError:
        return False
    if SIGNED not in SAE_CLASS_REGISTRY:
        register_sae_class(SIGNED, *signed_classes())
    return True
