"""The result of a decomposition: components and CI functions attached to the target model; save and load."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import editing, store
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteComponents, SiteMask, intervention_mask
from decomp_hooks.config import DecomposeConfig, from_dict, validate
from decomp_hooks.methods import Method, get_method
from decomp_hooks.sites import SiteError, SiteKind

FORMAT = "decomp-hooks/decomposition"
VERSION = 1
PACKAGES = ("torch", "transformers", "nnsight", "transformer-lens", "sae-lens", "decomp-hooks")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Decomposition:
    """Components per site (`components[name].V`, `.U`, `.weight()`), CI functions, config, metrics, provenance,
    and the method that trained them (`method`), which says how important each component is for an input."""

    def __init__(self, cm: ComponentModel, config: DecomposeConfig, metrics: list[dict] | None = None,
                 provenance: dict | None = None, step: int = 0, method: Method | None = None,
                 run_dir: Path | None = None):
        self.cm, self.config, self.metrics = cm, config, metrics or []
        self.provenance, self.step = provenance or {}, step
        self.method = method or get_method(config.method)(config)
        self.run_dir = run_dir  # the run directory it was trained into or loaded from, if any

    @property
    def model(self) -> torch.nn.Module:
        return self.cm.target

    @property
    def site_names(self) -> list[str]:
        return self.cm.site_names

    @property
    def components(self) -> dict[str, SiteComponents]:
        return {n: self.cm.component(n) for n in self.cm.site_names}

    @property
    def device(self) -> torch.device:
        return next(iter(self.cm.components.buffers())).device

    @torch.no_grad()
    def causal_importance(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per site, how much each component is needed at each position, `{site: [..., C]}`, as the method reports
        it: causal importance in [0, 1] for SPD; for APD, 1 on the components the input's top-k selection chose."""
        return self.method.importances(self.cm, batch)

    @torch.no_grad()
    def component_acts(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per site, the components' signed inner activations `a V`: `{site: [..., C]}`."""
        _, inputs = self.cm(batch, cache=True)
        return {n: self.cm.component(n).inner_acts(x) for n, x in inputs.items()}

    @torch.no_grad()
    def run(self, batch: Any, masks: dict[str, SiteMask] | None = None) -> torch.Tensor:
        """The model output with the given site masks (sites without one run as the target)."""
        out, _ = self.cm(batch, masks=masks)
        return out

    def site_masks(self, masks: dict[str, torch.Tensor] | None = None, keep: dict[str, list[int]] | None = None,
                   ablate: dict[str, list[int]] | None = None, scale: dict[str, dict[int, float]] | None = None,
                   delta: bool = True) -> dict[str, SiteMask]:
        """A SiteMask for every site: `masks[site]` as given, or `keep` (only these on) / `ablate` (these off), times
        `scale` ({component: factor}); unnamed sites get all components on. The delta component is on if `delta`."""
        given = {"masks": masks or {}, "keep": keep or {}, "ablate": ablate or {}, "scale": scale or {}}
        owner: dict[str, str] = {}
        for arg, entries in given.items():
            for name, value in entries.items():
                if name not in self.cm.sites:
                    raise SiteError(f"{arg}[{name!r}]: not a decomposed site; the sites are {self.site_names}.")
                if arg != "scale" and name in owner:
                    raise SiteError(f"site {name!r} is in both {owner[name]} and {arg}; give each site one of them.")
                owner.setdefault(name, arg)
                C = self.cm.component(name).C
                if arg != "masks" and any(not 0 <= int(i) < C for i in value):
                    raise SiteError(f"{arg}[{name!r}]: component indices {list(value)} are out of range; it has C={C}.")
        out = {}
        for name in self.site_names:
            C = self.cm.component(name).C
            if name in given["masks"]:
                m = given["masks"][name].to(self.device, torch.float32)
                m = m * intervention_mask(C, scale=given["scale"].get(name), device=self.device)
            else:
                m = intervention_mask(C, given["keep"].get(name), given["ablate"].get(name), given["scale"].get(name), self.device)
            out[name] = SiteMask(m, torch.ones((), device=self.device) if delta else None)
        return out

    @torch.no_grad()
    def run_with_cache(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Output plus, per site, `<site>.hook_component_acts` (signed `a V`) and `<site>.hook_ci` (`[..., C]`), in one pass."""
        out, inputs = self.cm(batch, cache=True)
        ci = self.cm.causal_importances(inputs)
        cache = {}
        for name, x in inputs.items():
            cache[f"{name}.hook_component_acts"] = self.cm.component(name).inner_acts(x)
            cache[f"{name}.hook_ci"] = ci[name].lower
        return out, cache

    def fwd_hooks(self, masks: dict[str, torch.Tensor] | None = None, keep: dict[str, list[int]] | None = None,
                  ablate: dict[str, list[int]] | None = None, scale: dict[str, dict[int, float]] | None = None,
                  delta: bool = True) -> list[tuple[str, Any]]:
        """TransformerLens `(hook_name, fn)` pairs for `model.run_with_hooks`: every site through its components."""
        from decomp_hooks.adapters.transformer_lens import fwd_hooks

        return fwd_hooks(self, self.site_masks(masks, keep, ablate, scale, delta))

    def intervene(self, model: Any, masks: dict[str, torch.Tensor] | None = None, keep: dict[str, list[int]] | None = None,
                  ablate: dict[str, list[int]] | None = None, scale: dict[str, dict[int, float]] | None = None,
                  delta: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Inside `with model.trace(...)` (nnsight): edit components and read `{site: {"ci", "acts"}}` per token.

        Only sites named in `masks` / `keep` / `ablate` / `scale` are edited; the others are only read."""
        named = set(masks or {}) | set(keep or {}) | set(ablate or {}) | set(scale or {})
        edits = {n: m for n, m in self.site_masks(masks, keep, ablate, scale, delta).items() if n in named}
        from decomp_hooks.adapters.nnsight import intervene

        return intervene(self, model, edits)

    def edit(self, site: str, component: int, write: torch.Tensor | float | None = None,
             read: torch.Tensor | float | None = None) -> editing.ComponentEdit:
        """Rewrite or scale component `component`'s write vector u_c (`write`) and/or read vector v_c (`read`): each a
        new vector (`[d_out]` / `[d_in]`) or a number scaling the current one. The edit gives the edited model as a
        torch copy (`.model()`), TransformerLens hooks (`.fwd_hooks()`) or an nnsight edit (`.intervene(model)`)."""
        return editing.edit(self, site, component, write=write, read=read)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write `decomposition.safetensors` + `decomposition.json` into directory `path`, atomically."""
        path = Path(path)
        tensors = {k: v for k, v in self.cm.named_parameters() if not k.startswith("target.")}
        sites = [{"name": n, "module": s.module, "kind": SiteKind(s.kind).value, "d_in": s.d_in, "d_out": s.d_out,
                  "C": self.cm.component(n).C} for n, s in self.cm.sites.items()]
        meta = {"format": FORMAT, "version": VERSION, "step": self.step, "sites": sites,
                "fingerprints": self.cm.fingerprints(), "config": self.config.to_dict(),
                "provenance": self.provenance, "final_metrics": self.final_metrics()}
        with store.atomic_dir(path, overwrite=overwrite) as tmp:
            store.write_tensors(tmp / "decomposition.safetensors", tensors)
            store.write_json(tmp / "decomposition.json", meta)
        return path

    def export(self, path: str | Path, format: str = "transcoder", sites: str | list[str] | None = None, data: Any = None,
               overwrite: bool = False, **options: Any) -> dict[str, Path]:
        """Write one SAE-Lens directory per site under `path` (`<path>/<site>/cfg.json`, `sae_weights.safetensors`)
        plus an `export.json` index, atomically; returns `{site: directory}`.

        `format`: "transcoder" (default; the exact ±-split W_enc = [V, −V], W_dec = [U; −U], b_dec = bias, which
        stock SAE-Lens and sae-dashboard load) or "decomp_signed_transcoder" (alias "signed"; signed activations
        `a V`, registered with sae-lens; `ci_gated=True` stores the CI function and gates them). Both decode to
        `x V U + b`: all components on, without the delta component (its size is `metadata.delta_weight_rel_norm`).
        `sites`: fnmatch pattern(s) over the site names (default: every non-embedding site). `data` (a tensor,
        dict batch or iterable of batches) adds `sparsity.safetensors` (log10 firing frequency from causal
        importance) and, for token-id batches, `neuronpedia.json` with activation examples. `overwrite` replaces a
        non-empty `path`. Options: `ci_gated`, `model_name`, `tokenizer`, `dataset`, `batch_size`, `max_batches`,
        `n_examples`, `provenance` (extra metadata); see `decomp_hooks.export.export_decomposition`.
        """
        from decomp_hooks.export import export_decomposition

        return export_decomposition(self, path, format=format, sites=sites, data=data, overwrite=overwrite, **options)

    def attribution_graph(self, prompt: Any, target: Any = None, threshold: float = 0.1, **options: Any) -> Any:
        """The attribution graph of the components on `prompt` (text, token ids or one input vector): nodes are the
        components with CI above `threshold` per position, the inputs and the `target` outputs (default: the top
        prediction); edges direct-path attributions, pruned to what carries the influence on the targets. Options
        and the JSON / HTML it writes: `decomp_hooks.graph.attribution_graph` and docs/graphs.md."""
        from decomp_hooks.graph import attribution_graph

        return attribution_graph(self, prompt, target=target, threshold=threshold, **options)

    def __repr__(self) -> str:
        C = sum(self.cm.component(n).C for n in self.site_names)
        where = f", run_dir={str(self.run_dir)!r}" if self.run_dir is not None else ""
        return (f"Decomposition(method={self.config.method!r}, sites={len(self.site_names)}, C={C}, "
                f"step={self.step}{where})")

    def summary(self) -> str:
        """What was found, from the last evaluation: the headline reconstruction figures, then C, live components
        and CI-L0 per site."""
        final = {k.removeprefix("eval/"): v for k, v in self.final_metrics().items()}
        head = [f"{self!r}"]
        shown = [k for k in SUMMARY_KEYS if isinstance(final.get(k), (int, float))]
        if shown:
            head.append("  " + "   ".join(f"{k} {_fmt(final[k])}" for k in shown))
        width = max(len(n) for n in [*self.site_names, "site"])
        rows = [f"  {'site':<{width}}  {'C':>6} {'live':>6} {'CI-L0':>8}"]
        for n in self.site_names:
            rows.append(f"  {n:<{width}}  {self.cm.component(n).C:>6} {_fmt(final.get(f'live/{n}')):>6} "
                        f"{_fmt(final.get(f'l0/{n}')):>8}")
        return "\n".join(head + rows)

    def final_metrics(self) -> dict:
        """The last evaluation record (metrics logged with an `eval/` prefix)."""
        evals = [r for r in self.metrics if any(k.startswith("eval/") for k in r)]
        return evals[-1] if evals else {}


#: the figures `Decomposition.summary` leads with, where the last evaluation has them
SUMMARY_KEYS = ("faithfulness", "stochastic_recon", "ci_recon", "pgd_probe", "kl_ci_masked", "kl_stoch_masked",
                "kl_adversarial", "ce_unrecovered_ci_masked", "ce_unrecovered_stoch_masked", "l0/total", "live/total")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def read_meta(path: str | Path) -> dict:
    meta = store.read_json(Path(path) / "decomposition.json")
    if meta.get("format") != FORMAT:
        raise store.StoreError(f"{str(path)!r} is not a decomp-hooks decomposition (format {meta.get('format')!r}).")
    if meta.get("version") != VERSION:
        raise store.StoreError(f"{str(path)!r} has format version {meta.get('version')}; this release reads {VERSION}.")
    return meta


def load(path: str | Path, model: Any = None, strict: bool = True, device: str | torch.device | None = None) -> Decomposition:
    """Re-attach a saved decomposition to `model` (or the toy target saved beside it); refuse different weights."""
    from decomp_hooks.adapters import resolve

    path = Path(path)
    meta = read_meta(path)
    config = from_dict(DecomposeConfig, meta["config"])
    validate(config)
    check_saved_sites(path, meta["sites"])
    if model is None:
        model = _saved_target(path)
    targets, identity = {}, {}
    for s in meta["sites"]:
        inserted = SiteKind(s["kind"]).inserted
        (identity if inserted else targets)[s.get("module") or _module_of(s["name"], inserted)] = s["C"]
    module, sites, cs = resolve(model, targets, identity)
    cm = ComponentModel.from_config(module, sites, cs, config)
    if strict:
        store.check_fingerprints(cm.fingerprints(), meta["fingerprints"], "this decomposition was trained on",
                                 "load the original model, or pass strict=False.")
    tensors = store.read_tensors(path / "decomposition.safetensors")
    params = {k: v for k, v in cm.named_parameters() if not k.startswith("target.")}
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise store.StoreError(f"{str(path)!r} lacks tensors {missing[:5]}; the file is not from this decomposition.")
    store.require_finite({k: tensors[k] for k in params}, path / "decomposition.safetensors")
    with torch.no_grad():
        for k, p in params.items():
            if tensors[k].shape != p.shape:
                raise store.StoreError(f"{str(path)!r}: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}.")
            p.copy_(tensors[k])
    if device is not None:
        cm.to(device)
    run_dir = path.parent if (path.parent / "metrics.jsonl").is_file() else None
    return Decomposition(cm, config, metrics=store.read_records(run_dir / "metrics.jsonl") if run_dir else [],
                         provenance=meta.get("provenance"), step=meta.get("step", 0), run_dir=run_dir)



def check_saved_sites(path: Path, sites: list[dict]) -> None:
    """Each saved site's C is a positive integer and matches the shapes in the tensor file's header, checked before
    anything is allocated (a foreign or edited JSON cannot make loading allocate what the file does not hold)."""
    shapes = store.tensor_shapes(path / "decomposition.safetensors")
    for s in sites:
        C = s.get("C")
        if not isinstance(C, int) or isinstance(C, bool) or C <= 0:
            raise store.StoreError(f"{str(path)!r}: site {s.get('name')!r} has C={C!r} in decomposition.json; C must "
                                   "be a positive integer. The file was edited or is not from decomp-hooks.")
        held = shapes.get(f"components.{s.get('name')}.V_param")
        if held is not None and held[-1] != C:
            raise store.StoreError(f"{str(path)!r}: site {s['name']!r} has C={C} in decomposition.json but {held[-1]} "
                                   "components in decomposition.safetensors; the two files do not belong together.")


def _module_of(name: str, inserted: bool) -> str:
    """The module of a site saved before sites recorded it (an inserted identity was named `<module>.pre_identity`)."""
    return name.rsplit(".", 1)[0] if inserted else name


def _saved_target(path: Path) -> torch.nn.Module:
    """A toy target saved next to the decomposition (`target/` in the run directory or inside `path`)."""
    from decomp_hooks.toy import load_toy

    for candidate in (path / "target", path.parent / "target"):
        if (candidate / "toy.json").is_file():
            return load_toy(candidate)
    raise ValueError(f"no model given and no saved toy target next to {str(path)!r}; pass model=<the target model>.")
