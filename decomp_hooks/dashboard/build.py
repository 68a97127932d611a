"""Component dashboards: one self-contained HTML page per site, Neuronpedia-style JSON, and an index page.

For every live component (one that fired on the data): top token contexts coloured by causal importance and by
signed activation, histograms of CI and of the signed activation where it fires, firing frequency, the tokens it
promotes and suppresses (sites that write to the residual stream), and the components it most often fires with.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.activations import Contexts, PassBatch, Reader, site_batches, stream, token_ids, windows
from decomp_hooks.adapters import adapter_for
from decomp_hooks.dashboard import render
from decomp_hooks.dashboard.clusters import write_cluster_page
from decomp_hooks.dashboard.logits import logit_path, top_tokens
from decomp_hooks.dashboard.statistics import ComponentStats
from decomp_hooks.clustering import read_clusters
from decomp_hooks.data import batch_count, reiterable
from decomp_hooks.export import neuronpedia as npd
from decomp_hooks.export.format import dir_names
from decomp_hooks.export.inputs import check_count, checked_batches
from decomp_hooks.export.write import select_sites
from decomp_hooks.harvest import Harvest, HarvestError, load_harvest
from decomp_hooks.train.preflight import describe

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

    def __post_init__(self) -> None:
        """Refuse sizes that are not positive integers, naming them."""
        for name in ("n_examples", "n_tokens", "batch_size"):
            check_count(f"DashboardConfig.{name}", getattr(self, name), DashboardError)
        check_count("DashboardConfig.n_coactive", self.n_coactive, DashboardError, minimum=0)
        check_count("DashboardConfig.max_batches", self.max_batches, DashboardError, optional=True)


def config_or_default(config: Any, cls: type, error: type[Exception] = DashboardError) -> Any:
    """`config`, or the defaults `cls()` when None; anything but a `cls` is refused (`error`) naming its type."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise error(f"config is a {type(config).__name__}; pass a {cls.__name__}, e.g. {cls.__name__}"
                    "(batch_size=8), or None for the defaults.")
    return config


def select_components(C: int, components: Any, site: str) -> list[int]:
    """The requested component indices of a site (all when None), checked to be integers in 0..C-1."""
    if components is None:
        return list(range(C))
    try:
        indices = [operator.index(c) for c in components]
    except TypeError:
        raise DashboardError(f"components={components!r}: give a list of integer component indices, e.g. [0, 3, 5]."
                             ) from None
    bad = [c for c in indices if not 0 <= c < C]
    if bad:
        raise DashboardError(f"components {bad} are out of range for site {site!r} (C={C}); pick indices 0..{C - 1}.")
    return sorted(set(indices))


def token_batches(dec: Any, data: Any, batch_size: int, max_batches: int | None = None,
                  error: type[Exception] = DashboardError) -> Iterator[torch.Tensor]:
    """The batches of `data`, each checked to be token ids `[batch, seq]` of one sequence length, within the
    target's vocabulary (pages and harvests keep token contexts); `error` is what a refusal raises."""
    seq_len = None
    for batch in checked_batches(dec, data, batch_size, max_batches, error):
        ids = token_ids(batch)
        if ids is None:
            raise error("token contexts are kept, so the data must be token ids [batch, seq] "
                        f"(an integer tensor); got a {describe(batch)}.")
        if seq_len not in (None, ids.shape[1]):
            raise error(f"batches have sequence lengths {seq_len} and {ids.shape[1]}; use one context length.")
        seq_len = ids.shape[1]
        yield ids


def token_stream(dec: Any, sites: list[str], data: Any, batch_size: int, max_batches: int | None, desc: str,
                 progress: bool) -> Iterator[PassBatch]:
    """The activation pass over token-id data, with a progress bar."""
    batches = token_batches(dec, data, batch_size, max_batches)
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


@dataclass
class Source:
    """Where a dashboard's figures come from: per site the statistics, the number and length of the sequences, the
    reader of the shown components' contexts, and (from a harvest) each component's top PMI tokens per side."""

    stats: dict[str, ComponentStats]
    n_seqs: int
    seq_len: int
    contexts: Callable[[dict[str, list[int]]], dict[str, Contexts]]
    pmi: Callable[[str, int], dict[str, list[tuple[int, float]]]] | None = None


def data_source(dec: Any, sites: list[str], data: Any, cfg: DashboardConfig, progress: bool) -> Source:
    """Statistics from one pass over `data`; the contexts from a second pass over the sequences that hold them."""
    data = reiterable(data)
    stats, n_seqs, seq_len = collect(dec, sites, data, cfg, progress)

    def contexts(shown: dict[str, list[int]]) -> dict[str, Contexts]:
        wanted = {n: [(c, p) for c in shown[n] for _, p in stats[n].features.examples(c)] for n in sites}
        batches = token_batches(dec, data, cfg.batch_size, cfg.max_batches)
        return windows(component_reader(dec, sites), batches, wanted, progress)

    return Source(stats, n_seqs, seq_len, contexts)


def open_harvest(dec: Any, harvest: Harvest | str | Path) -> Harvest:
    """A finished harvest of `dec` (a `Harvest` or its directory), refused as a DashboardError when it is not one."""
    try:
        h = harvest if isinstance(harvest, Harvest) else load_harvest(harvest)
        h.check(dec)
    except (HarvestError, store.StoreError) as err:
        raise DashboardError(str(err)) from None
    return h


def harvest_source(dec: Any, sites: list[str], harvest: Harvest | str | Path, cfg: DashboardConfig) -> Source:
    """The statistics, contexts and PMI tokens of a finished harvest of `dec` (a `Harvest` or its directory)."""
    h = open_harvest(dec, harvest)
    stats = {n: h.component_stats(n, cfg.n_examples) for n in sites}
    return Source(stats, h.meta["sequences"], h.meta["seq_len"],
                  lambda shown: {n: h.contexts(n, shown[n]) for n in sites},
                  lambda n, c: {side: h.pmi(n, c, side)[:cfg.n_tokens] for side in ("input", "output")})


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
                   effects: torch.Tensor | None, coactive: tuple[torch.Tensor, torch.Tensor], cfg: DashboardConfig,
                   pmi: dict[str, list[tuple[int, float]]] | None = None) -> dict:
    """Everything the template shows for one component (`pmi`: its top tokens per side, from a harvest)."""
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
            "coactive": [{"index": int(i), "jaccard": float(j)} for i, j in zip(*[t[c] for t in coactive]) if j > 0],
            "pmi": None if pmi is None else {side: list(zip(npd.token_strings(tokenizer, [t for t, _ in rows]),
                                                            [v for _, v in rows])) for side, rows in pmi.items()}}
    if effects is not None:
        up, up_v, down, down_v = top_tokens(effects[c:c + 1], cfg.n_tokens)
        view["promoted"] = list(zip(npd.token_strings(tokenizer, up[0].tolist()), up_v[0].tolist()))
        view["suppressed"] = list(zip(npd.token_strings(tokenizer, down[0].tolist()), down_v[0].tolist()))
    return view


def build_dashboards(dec: Any, data: Any, out: str | Path, sites: str | list[str] | None = None,
                     components: list[int] | None = None, tokenizer: Any = None, config: DashboardConfig | None = None,
                     model_name: str | None = None, dataset: str = "", overwrite: bool = False,
                     progress: bool = True, harvest: Harvest | str | Path | None = None,
                     clusters: Any = None) -> dict[str, Path]:
    """Write `<out>/<site>.html` (one page per site), `<out>/<site>.neuronpedia.json`, `index.html` and
    `dashboard.json` atomically; returns `{site: page}`. `data`: token ids (a tensor `[n, seq]` or batches of them,
    e.g. `TokenBatches`), streamed twice (statistics, then the top contexts). `harvest`: a finished harvest of `dec`
    (`decomp_hooks.harvest`, or its directory) whose statistics, top contexts and PMI tokens are shown instead, with
    no pass over data (pass data=None). `components` restricts every site to those indices; only components that
    fire are shown. `clusters` (`dh.cluster`'s result, or its clusters.json) adds `clusters.html`, linked from the
    index, whose members link to their components' cards."""
    cfg = config_or_default(config, DashboardConfig)
    replace = store.replaceable_dir(out, overwrite, DashboardError, inputs=(dec.run_dir,))
    clusters = read_clusters(clusters) if isinstance(clusters, (str, Path)) else clusters  # refused before the pass
    names = select_sites(dec, sites)
    chosen = {n: select_components(dec.cm.component(n).C, components, n) for n in names}
    tokenizer = tokenizer if tokenizer is not None else getattr(dec.model, "tokenizer", None)
    source = (data_source(dec, names, data, cfg, progress) if harvest is None
              else harvest_source(dec, names, harvest, cfg))
    stats, n_seqs, seq_len = source.stats, source.n_seqs, source.seq_len
    shown = {n: [c for c in chosen[n] if stats[n].features.fires[c] > 0] for n in names}
    shown = {n: sorted(cs, key=lambda c: -float(stats[n].features.fires[c])) for n, cs in shown.items()}
    contexts = source.contexts(shown)
    context = adapter_for(dec.model).model_context(dec.model, model_name)
    files = dir_names(names)
    pages, summary = {}, {}
    with store.atomic_dir(out, overwrite=replace) as tmp:
        for n in names:
            path = logit_path(dec, n)
            effects = None if path is None else path[0] @ path[1]
            co = stats[n].most_coactive(cfg.n_coactive)
            views = [component_view(c, stats[n], contexts[n], tokenizer, effects, co, cfg,
                                    None if source.pmi is None else source.pmi(n, c)) for c in shown[n]]
            site_info = {"name": n, "C": stats[n].C, "live": len(stats[n].live()), "shown": len(views),
                         "positions": stats[n].positions, "threshold": stats[n].threshold,
                         "l0": float(stats[n].features.fires.sum()) / max(stats[n].positions, 1),
                         "logits": effects is not None, "page": f"{files[n]}.html"}
            html = render.render("site.html.j2", site=site_info, components=views, model=context["model_name"],
                                 dataset=dataset)
            store.write_text(tmp / site_info["page"], html)
            ci_windows = {k: (ids, vals[0], q) for k, (ids, vals, q) in contexts[n].items()}
            npj = npd.batch_json(stats[n].features, ci_windows, tokenizer, None if path is None else path[0],
                                 None if path is None else path[1], model_id=context["model_name"],
                                 layer=npd.layer_of(n), sae_set=f"{dec.config.method}-components",
                                 sae_id_suffix=files[n], n_prompts=n_seqs,
                                 n_tokens=seq_len, dataset=dataset, features=shown[n])
            store.write_json(tmp / f"{files[n]}.neuronpedia.json", npj)
            pages[n], summary[n] = Path(out) / site_info["page"], site_info
        if clusters is not None:
            write_cluster_page(clusters, tmp / "clusters.html", pages={n: summary[n]["page"] for n in names})
        store.write_text(tmp / "index.html", render.render("index.html.j2", sites=list(summary.values()),
                                                           model=context["model_name"], dataset=dataset,
                                                           clusters=clusters is not None))
        store.write_json(tmp / "dashboard.json", {"format": INDEX_FORMAT, "version": 1, "model": context["model_name"],
                                                  "dataset": dataset, "sites": summary,
                                                  "components": {n: shown[n] for n in names}})
    return pages
