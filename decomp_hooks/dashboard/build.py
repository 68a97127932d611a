"""Component dashboards: one self-contained HTML page per site, Neuronpedia-style JSON, and an index page.

For every live component (one that fired on the data): top token contexts coloured by causal importance and by
signed activation, histograms of CI and of the signed activation where it fires, firing frequency, the tokens it
promotes and suppresses (sites that write to the residual stream), and the components it most often fires with.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.activations import Contexts, PassBatch, Reader, site_batches, stream, token_ids, windows
from decomp_hooks.adapters import adapter_for
from decomp_hooks.dashboard import render
from decomp_hooks.dashboard.logits import logit_path, top_tokens
from decomp_hooks.dashboard.statistics import ComponentStats
from decomp_hooks.data import batch_count, iter_batches, reiterable
from decomp_hooks.export import neuronpedia as npd
from decomp_hooks.export.format import dir_name
from decomp_hooks.export.write import select_sites

INDEX_FORMAT = "decomp-hooks/dashboard"


class DashboardError(ValueError):
    """Dashboard or comparison input that cannot be used: no token ids, unknown sites or components, no batches."""


@dataclass
class DashboardConfig:
    """How much the dashboards show and read (defaults shown)."""

    n_examples: int = 10
    n_tokens: int = 10
    n_coactive: int = 5
    batch_size: int = 16
    max_batches: int | None = None


def select_components(C: int, components: list[int] | None, site: str) -> list[int]:
    """The requested component indices of a site (all when None), checked against C."""
    if components is None:
        return list(range(C))
    bad = [c for c in components if not 0 <= c < C]
    if bad:
        raise DashboardError(f"components {bad} are out of range for site {site!r} (C={C}); pick indices 0..{C - 1}.")
    return sorted(set(components))


def token_batches(data: Any, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """The batches of `data`, each checked to be token ids `[batch, seq]` of one sequence length (pages show token
    contexts)."""
    seq_len = None
    for batch in iter_batches(data, batch_size, max_batches):
        ids = token_ids(batch)
        if ids is None:
            raise DashboardError("dashboards show token contexts, so the data must be token ids [batch, seq] "
                                 f"(an integer tensor); got {type(batch).__name__}.")
        if seq_len not in (None, ids.shape[1]):
            raise DashboardError(f"batches have sequence lengths {seq_len} and {ids.shape[1]}; use one context length.")
        seq_len = ids.shape[1]
        yield ids


def token_stream(dec: Any, sites: list[str], data: Any, batch_size: int, max_batches: int | None, desc: str,
                 progress: bool) -> Iterator[PassBatch]:
    """The activation pass over token-id data, with a progress bar."""
    batches = token_batches(data, batch_size, max_batches)
    yield from stream(dec, sites, batches, total=batch_count(data, batch_size, max_batches), desc=desc,
                      progress=progress)


def collect(dec: Any, sites: list[str], data: Any, cfg: DashboardConfig,
            progress: bool = True) -> tuple[dict[str, ComponentStats], int, int]:
    """One streaming pass: per site, the dashboard statistics of every component; also (sequences, sequence length)."""
    tau = dec.config.ci_alive_threshold
    stats = {n: ComponentStats(dec.cm.component(n).C, tau, cfg.n_examples) for n in sites}
    n_seqs = seq_len = 0
    for batch in token_stream(dec, sites, data, cfg.batch_size, cfg.max_batches, "dashboard activations", progress):
        for n in sites:
            stats[n].update(batch.sites[n].ci, batch.sites[n].acts, batch.first)
        n_seqs, seq_len = n_seqs + batch.tokens.shape[0], batch.tokens.shape[1]
    if n_seqs == 0:
        raise DashboardError("the data yielded no batches; pass token ids [n, seq] with at least one row.")
    return stats, n_seqs, seq_len


def component_reader(dec: Any, sites: list[str]) -> Reader:
    """A reader for `windows`: per site, causal importance and signed activations `[N, C]`."""
    def read(ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        got = site_batches(dec, sites, ids.to(dec.device))
        return {n: [b.ci.cpu(), b.acts.cpu()] for n, b in got.items()}
    return read


def context_view(contexts: Contexts, pairs: list[tuple[float, int]], i: int, tokenizer: Any) -> list[dict]:
    """The template's view of item i's example windows: per token its text, CI and signed activation."""
    examples = []
    for _, pos in pairs:
        ids, (ci, acts), q = contexts[i, pos]
        texts = npd.token_strings(tokenizer, ids) if tokenizer is not None else [f"{t} " for t in ids]
        examples.append({"q": q, "tokens": [{"text": t, "ci": g, "act": a} for t, g, a in zip(texts, ci, acts)]})
    return examples


def example_scale(examples: list[dict]) -> float:
    """The largest |signed activation| over the examples' tokens: the colour scale of the signed view."""
    return max((abs(t["act"]) for e in examples for t in e["tokens"]), default=0.0)


def component_view(c: int, stats: ComponentStats, contexts: Contexts, tokenizer: Any,
                   effects: torch.Tensor | None, coactive: tuple[torch.Tensor, torch.Tensor], cfg: DashboardConfig) -> dict:
    """Everything the template shows for one component."""
    fs = stats.features
    examples = context_view(contexts, fs.examples(c), c, tokenizer)
    scale = example_scale(examples)
    ci_centres = [(b + 0.5) / npd.HIST_BINS for b in range(npd.HIST_BINS)]
    centres, counts, width = stats.signed.bins(c)
    view = {"index": c, "frequency": float(stats.frequency()[c]), "fires": int(fs.fires[c]), "examples": examples,
            "scale": scale, "promoted": [], "suppressed": [],
            "ci_hist": render.histogram_png(ci_centres, fs.hist[c].tolist(), 1 / npd.HIST_BINS, "causal importance"),
            "act_hist": render.histogram_png(centres, counts, width, "signed activation a·V (where it fires)",
                                             signed=True),
            "coactive": [{"index": int(i), "jaccard": float(j)} for i, j in zip(*[t[c] for t in coactive]) if j > 0]}
    if effects is not None:
        up, up_v, down, down_v = top_tokens(effects[c:c + 1], cfg.n_tokens)
        view["promoted"] = list(zip(npd.token_strings(tokenizer, up[0].tolist()), up_v[0].tolist()))
        view["suppressed"] = list(zip(npd.token_strings(tokenizer, down[0].tolist()), down_v[0].tolist()))
    return view


def build_dashboards(dec: Any, data: Any, out: str | Path, sites: str | list[str] | None = None,
                     components: list[int] | None = None, tokenizer: Any = None, config: DashboardConfig | None = None,
                     model_name: str | None = None, dataset: str = "", overwrite: bool = False,
                     progress: bool = True) -> dict[str, Path]:
    """Write `<out>/<site>.html` (one page per site), `<out>/<site>.neuronpedia.json`, `index.html` and
    `dashboard.json` atomically; returns `{site: page}`. `data`: token ids (a tensor `[n, seq]` or batches of them,
    e.g. `TokenBatches`), streamed twice (statistics, then the top contexts). `components` restricts every site to
    those indices; only components that fire are shown."""
    cfg = config or DashboardConfig()
    replace = store.replaceable_dir(out, overwrite, DashboardError, inputs=(dec.run_dir,))
    names = select_sites(dec, sites)
    chosen = {n: select_components(dec.cm.component(n).C, components, n) for n in names}
    data = reiterable(data)
    tokenizer = tokenizer if tokenizer is not None else getattr(dec.model, "tokenizer", None)
    stats, n_seqs, seq_len = collect(dec, names, data, cfg, progress)
    shown = {n: [c for c in chosen[n] if stats[n].features.fires[c] > 0] for n in names}
    shown = {n: sorted(cs, key=lambda c: -float(stats[n].features.fires[c])) for n, cs in shown.items()}
    wanted = {n: [(c, p) for c in shown[n] for _, p in stats[n].features.examples(c)] for n in names}
    contexts = windows(component_reader(dec, names), token_batches(data, cfg.batch_size, cfg.max_batches), wanted,
                       progress)
    context = adapter_for(dec.model).model_context(dec.model, model_name)
    pages, summary = {}, {}
    with store.atomic_dir(out, overwrite=replace) as tmp:
        for n in names:
            path = logit_path(dec, n)
            effects = None if path is None else path[0] @ path[1]
            co = stats[n].most_coactive(cfg.n_coactive)
            views = [component_view(c, stats[n], contexts[n], tokenizer, effects, co, cfg) for c in shown[n]]
            site_info = {"name": n, "C": stats[n].C, "live": len(stats[n].live()), "shown": len(views),
                         "positions": stats[n].positions, "threshold": stats[n].threshold,
                         "l0": float(stats[n].features.fires.sum()) / max(stats[n].positions, 1),
                         "logits": effects is not None, "page": f"{dir_name(n)}.html"}
            html = render.render("site.html.j2", site=site_info, components=views, model=context["model_name"],
                                 dataset=dataset)
            store.write_text(tmp / site_info["page"], html)
            ci_windows = {k: (ids, vals[0], q) for k, (ids, vals, q) in contexts[n].items()}
            npj = npd.batch_json(stats[n].features, ci_windows, tokenizer, None if path is None else path[0],
                                 None if path is None else path[1], model_id=context["model_name"],
                                 layer=npd.layer_of(n), sae_set=f"{dec.config.method}-components",
                                 sae_id_suffix=dir_name(n), n_prompts=n_seqs,
                                 n_tokens=seq_len, dataset=dataset, features=shown[n])
            store.write_json(tmp / f"{dir_name(n)}.neuronpedia.json", npj)
            pages[n], summary[n] = Path(out) / site_info["page"], site_info
        store.write_text(tmp / "index.html", render.render("index.html.j2", sites=list(summary.values()),
                                                           model=context["model_name"], dataset=dataset))
        store.write_json(tmp / "dashboard.json", {"format": INDEX_FORMAT, "version": 1, "model": context["model_name"],
                                                  "dataset": dataset, "sites": summary,
                                                  "components": {n: shown[n] for n in names}})
    return pages
