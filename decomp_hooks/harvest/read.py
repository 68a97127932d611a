"""A harvest directory read back and checked: `harvest.json` plus four safetensors files, every tensor's shape checked
against what the settings in `harvest.json` make (a missing, truncated, edited or foreign file is a StoreError naming
it), and the statistics per component and per site for dashboards, clustering and autointerp."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.activations import Contexts
from decomp_hooks.dashboard.statistics import ComponentStats
from decomp_hooks.harvest.accumulate import PAD, Accumulators

META = "harvest.json"
FORMAT = "decomp-hooks/harvest"
VERSION = 1


class HarvestError(ValueError):
    """A harvest that cannot run or be used as asked: bad settings or data, or a harvest of another decomposition."""


def decomposition_digest(dec: Any) -> str:
    """SHA-256 of the decomposition's own parameters (components and CI functions): a harvest belongs to one."""
    digest = hashlib.sha256()
    for name, p in sorted(dec.cm.named_parameters()):
        if not name.startswith("target."):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def accumulators(meta: dict) -> Accumulators:
    """Empty accumulators for the settings `meta` records (on the default device; under `torch.device("meta")` only
    their shapes, nothing allocated)."""
    cfg = meta["config"]
    return Accumulators(len(meta["components"]), meta["vocab"], meta["threshold"], cfg["top_k"], cfg["window"],
                            meta["token_counts"], cfg["summary_size"])


def read_meta(path: Path) -> dict:
    """`harvest.json` of a harvest directory (finished or not), refused unless it is one of ours in this version."""
    file = path / META
    meta = store.read_json(file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise store.StoreError(f"{str(file)!r} is not a decomp-hooks harvest (format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}).")
    if meta.get("version") != VERSION:
        raise store.StoreError(f"{str(file)!r} has harvest format version {meta.get('version')}; this release reads "
                               f"{VERSION}. Harvest again with this release.")
    return meta


def read_files(path: Path, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of every file, each checked to hold exactly the tensors and shapes the settings make."""
    try:
        with torch.device("meta"):
            expected = accumulators(meta).files(meta["config"]["pmi_top"])
        if sum(s["C"] for s in meta["sites"]) != len(meta["components"]):
            raise ValueError("the sites' C do not add up to the components")
    except (KeyError, TypeError, ValueError) as err:
        raise store.StoreError(f"{str(path / META)!r} lacks or garbles the harvest settings ({err!r}); the file was "
                               "edited or is not from decomp-hooks.") from None
    files = {}
    for name, tensors in expected.items():
        file = path / f"{name}.safetensors"
        shapes = store.tensor_shapes(file)
        want = {k: list(v.shape) for k, v in tensors.items()}
        if shapes != want:
            bad = sorted(k for k in set(shapes) | set(want) if shapes.get(k) != want.get(k))
            raise store.StoreError(f"{str(file)!r}: tensors {bad} have shapes {[shapes.get(k) for k in bad]}, expected "
                                   f"{[want.get(k) for k in bad]} from {META}; the files do not belong together.")
        files[name] = store.read_tensors(file)
        bad = sorted(k for k, v in tensors.items() if files[name][k].dtype != v.dtype)
        if bad:
            got, want_types = [str(files[name][k].dtype) for k in bad], [str(tensors[k].dtype) for k in bad]
            raise store.StoreError(f"{str(file)!r}: tensors {bad} have dtypes {got}, expected {want_types}; it is not "
                                   "a decomp-hooks harvest.")
    return files


def load_harvest(path: str | Path) -> Harvest:
    """A finished harvest directory (`decomp_hooks.harvest.harvest` / `decomp-hooks harvest`) read back and checked."""
    path = Path(path)
    meta = read_meta(path)
    if not meta.get("complete"):
        raise store.StoreError(f"{str(path)!r} holds an unfinished harvest ({meta.get('tokens')} of "
                               f"{meta.get('n_tokens')} tokens): continue it with resume=True (--resume).")
    return Harvest(path, meta, read_files(path, meta))


class Harvest:
    """Statistics of every component of every site over the harvested tokens; components are numbered 0..N-1 in
    `components` order (`[site, index]`), and `index(site, c)` maps back.

    `count [N]` (firings), `density [N]`, `coact [N, N]` (co-firings), `examples` (`rank`, `position`, `tokens`, `ci`,
    `acts` of the top contexts), `pmi(site, c, side)`; `meta` holds the settings and the pass's figures."""

    def __init__(self, path: Path, meta: dict, files: dict[str, dict[str, torch.Tensor]]):
        self.path, self.meta, self.files = path, meta, files
        self.offsets = {s["name"]: s["offset"] for s in meta["sites"]}
        self.sizes = {s["name"]: s["C"] for s in meta["sites"]}

    @property
    def components(self) -> list[tuple[str, int]]:
        return [(s, int(c)) for s, c in self.meta["components"]]

    @property
    def tokens(self) -> int:
        return self.meta["tokens"]

    @property
    def threshold(self) -> float:
        return self.meta["threshold"]

    @property
    def count(self) -> torch.Tensor:
        return self.files["cofiring"]["count"]

    @property
    def coact(self) -> torch.Tensor:
        return self.files["cofiring"]["coact"]

    @property
    def density(self) -> torch.Tensor:
        """Firing frequency per component `[N]`."""
        return self.count / max(self.tokens, 1)

    @property
    def examples(self) -> dict[str, torch.Tensor]:
        return self.files["examples"]

    def span(self, site: str) -> slice:
        """The site's components in the global order."""
        if site not in self.offsets:
            raise HarvestError(f"site {site!r} is not in the harvest at {str(self.path)!r}; its sites are "
                               f"{list(self.offsets)}.")
        return slice(self.offsets[site], self.offsets[site] + self.sizes[site])

    def index(self, site: str, c: int) -> int:
        """Global index of component c of `site`."""
        span = self.span(site)
        if not 0 <= c < span.stop - span.start:
            raise HarvestError(f"component {c} is out of range for site {site!r} (C={span.stop - span.start}).")
        return span.start + c

    def top_examples(self, site: str, c: int) -> list[dict[str, Any]]:
        """The component's top contexts, best first: token ids, CI and activation per token (beyond-sequence padding
        dropped), `q` (the example's index in them), `rank` (|g·a| there) and its flattened `position`."""
        i, ex, w = self.index(site, c), self.examples, self.meta["config"]["window"]
        out = []
        for j in torch.nonzero(ex["position"][i] >= 0).flatten().tolist():
            inside = ex["tokens"][i, j] != PAD
            out.append({"tokens": ex["tokens"][i, j][inside].tolist(), "ci": ex["ci"][i, j][inside].tolist(),
                        "acts": ex["acts"][i, j][inside].tolist(), "q": w - int((~inside[:w]).sum()),
                        "rank": float(ex["rank"][i, j]), "position": int(ex["position"][i, j])})
        return out

    def pmi(self, site: str, c: int, side: str = "input") -> list[tuple[int, float]]:
        """(token id, PMI in nats) of the component's top tokens on `side` ('input': the token where it fires;
        'output': the next token of the text), highest first."""
        if side not in ("input", "output"):
            raise HarvestError(f"side={side!r}: use 'input' or 'output'.")
        i, t = self.index(site, c), self.files["tokens"]
        tokens, values = t[f"{side}.top_tokens"][i], t[f"{side}.top_pmi"][i]
        return [(int(k), float(v)) for k, v in zip(tokens, values) if k != PAD]

    def check(self, dec: Any) -> None:
        """Refuse a decomposition other than the one harvested (other sites, sizes or weights), naming the fix."""
        sizes = {n: dec.cm.component(n).C for n in dec.site_names}
        if sizes != self.sizes or decomposition_digest(dec) != self.meta["decomposition"]:
            raise HarvestError(f"the harvest at {str(self.path)!r} is of another decomposition (sites and C "
                               f"{self.sizes}, weights {self.meta['decomposition']}); harvest this one first "
                               "(decomp-hooks harvest RUN_DIR ...).")

    def component_stats(self, site: str, n_examples: int) -> ComponentStats:
        """The site's statistics as the dashboards hold them, with its top `n_examples` examples."""
        span, h = self.span(site), self.files["histograms"]
        stats = ComponentStats(span.stop - span.start, self.threshold, n_examples)
        f = stats.features
        f.positions, f.fires, f.hist = self.tokens, self.count[span], h["ci"][span]
        f.top_values = self.examples["rank"][span, :n_examples]
        f.top_index = self.examples["position"][span, :n_examples]
        stats.signed.counts, stats.signed.range = h["signed_counts"][span], h["signed_range"][span]
        stats.coactive = self.coact[span, span]
        return stats

    def contexts(self, site: str, components: list[int]) -> Contexts:
        """The example windows of the site's `components` as the dashboards read them: `(c, position) -> (ids,
        [ci, acts], q)`."""
        return {(c, e["position"]): (e["tokens"], [e["ci"], e["acts"]], e["q"])
                for c in components for e in self.top_examples(site, c)}
