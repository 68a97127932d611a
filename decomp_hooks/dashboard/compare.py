"""Components against the features of an SAE-Lens SAE or transcoder on the same hook: matches and what is left over.

Both sides are put in the same terms. A component c is seen as two features, exactly as in the ±-split transcoder
export: its positive part (direction +d_c, activation ReLU(g_c a_c)) and its negative part (−d_c, ReLU(−g_c a_c)),
with a_c = (x V)_c its signed activation and g_c its causal importance. d_c is the component's output direction
U_c when the SAE's decoder writes the site's output (an SAE on the output hook, or a transcoder into it), its input
direction V_c when it writes the site's input (an SAE on the input hook). The SAE's input is computed from the site
input x in the same forward (x itself, or the site output x Wᵀ + b), so both sides see exactly the same tokens.

- decoder-direction cosine `[2C, F]` between the component directions and the SAE's `W_dec` rows;
- activation correlation `[2C, F]` (Pearson, streamed as sums) between the two sides' activations;
- a one-to-one assignment (Hungarian, on max(cosine, correlation)) between live component parts and live features;
  a pair is matched when cosine ≥ `min_cosine` or correlation ≥ `min_corr`;
- unexplained: live SAE features whose best cosine and best correlation over all live component parts are both below
  the thresholds, and live components neither of whose parts reaches them with any live feature.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.activations import Moments, site_batches, windows
from decomp_hooks.adapters import adapter_for
from decomp_hooks.dashboard import render
from decomp_hooks.dashboard.build import (
    DashboardError,
    config_or_default,
    context_view,
    example_scale,
    open_harvest,
    token_batches,
    token_stream,
)
from decomp_hooks.dashboard.statistics import ComponentStats
from decomp_hooks.data import reiterable
from decomp_hooks.export import neuronpedia as npd
from decomp_hooks.export.inputs import check_count
from decomp_hooks.export.read import LoadedSAE, load_sae
from decomp_hooks.harvest import Harvest


@dataclass
class CompareConfig:
    """Thresholds and sizes of a comparison (defaults shown)."""

    min_cosine: float = 0.5
    min_corr: float = 0.5
    top_k: int = 3
    n_examples: int = 5
    n_unexplained: int = 20
    batch_size: int = 16
    max_batches: int | None = None

    def __post_init__(self) -> None:
        """Refuse thresholds outside [-1, 1] (NaN included) and sizes that are not positive integers, naming them."""
        for name in ("min_cosine", "min_corr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise DashboardError(f"CompareConfig.{name}={value!r}: must be a number in [-1, 1].")
        for name in ("top_k", "n_examples", "batch_size"):
            check_count(f"CompareConfig.{name}", getattr(self, name), DashboardError)
        check_count("CompareConfig.n_unexplained", self.n_unexplained, DashboardError, minimum=0)
        check_count("CompareConfig.max_batches", self.max_batches, DashboardError, optional=True)


def comparison_space(dec: Any, site: str, sae: LoadedSAE) -> tuple[str, str]:
    """(what the SAE's encoder reads, where its decoder writes): each 'input' or 'output' of the site, from the SAE's
    hook names where they name the site's hooks, else from the widths (a square site then counts as its output)."""
    comps = dec.cm.component(site)
    hooks = adapter_for(dec.model).hook_names(dec.model, dec.cm.sites[site])
    width = {"input": comps.d_in, "output": comps.d_out}

    def side(hook: str | None, d: int) -> str | None:
        if hook is not None and hook == hooks.hook_name_out:
            return "output"
        if hook is not None and hook == hooks.hook_name:
            return "input"
        return "output" if d == comps.d_out else "input" if d == comps.d_in else None

    reads = side(sae.hook_name, sae.d_in)
    writes = side(sae.hook_name_out or sae.hook_name, sae.d_out)
    if reads is None or writes is None or sae.d_in != width[reads] or sae.d_out != width[writes]:
        raise DashboardError(f"the SAE at {str(sae.path)!r} reads {sae.hook_name!r} (d_in={sae.d_in}) and writes "
                             f"d_out={sae.d_out}; site {site!r} reads d_in={comps.d_in} ({hooks.hook_name}) and "
                             f"writes d_out={comps.d_out} ({hooks.hook_name_out}). Compare an SAE trained on the "
                             "site's input or output hook, or a transcoder between them.")
    return reads, writes


def component_directions(dec: Any, site: str, space: str) -> torch.Tensor:
    """Unit directions of the ± component parts `[2C, d]`: output directions U_c or input directions V_c."""
    comps = dec.cm.component(site)
    d = comps.U.detach() if space == "output" else comps.V.detach().T
    d = torch.nn.functional.normalize(d.float().cpu(), dim=-1)
    return torch.cat([d, -d])


def split_acts(ci: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """The ± parts' activations `[N, 2C]`: ReLU(g a) and ReLU(−g a)."""
    gated = ci * acts
    return torch.cat([gated.clamp_min(0), (-gated).clamp_min(0)], dim=-1)


def sae_encode(sae: LoadedSAE, x: torch.Tensor) -> torch.Tensor:
    """Feature activations (on `x`'s device); architectures LoadedSAE cannot encode itself go through sae-lens.
    The SAE stays where it was loaded (the cpu), so `x` goes there."""
    device, x = x.device, x.to(sae.W_enc.device)
    return _encode(sae, x).to(device)


def _encode(sae: LoadedSAE, x: torch.Tensor) -> torch.Tensor:
    try:
        return sae.encode(x)
    except NotImplementedError:
        if not hasattr(sae, "_sae"):
            sae._sae = sae.to_sae()
        with torch.no_grad():
            return sae._sae.encode(x)


@dataclass
class Comparison:
    """Cosine and correlation `[2C, F]`, liveness and frequencies of both sides, and the derived matches."""

    site: str
    sae_path: str
    reads: str
    space: str
    C: int
    cosine: torch.Tensor
    corr: torch.Tensor
    comp_freq: torch.Tensor
    feat_freq: torch.Tensor
    config: CompareConfig
    pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def live_components(self) -> list[int]:
        return torch.nonzero(self.comp_freq > 0).flatten().tolist()

    @property
    def live_features(self) -> list[int]:
        return torch.nonzero(self.feat_freq > 0).flatten().tolist()

    def part_mask(self) -> torch.Tensor:
        """Which ± parts belong to live components `[2C]`."""
        live = self.comp_freq > 0
        return torch.cat([live, live])

    def _masked(self, t: torch.Tensor) -> torch.Tensor:
        keep = self.part_mask()[:, None] & (self.feat_freq > 0)[None, :]
        return torch.where(keep, t, float("-inf"))

    def best_for_features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per SAE feature: best cosine `[F]`, best correlation `[F]`, the part with the best cosine `[F]`."""
        cos, corr = self._masked(self.cosine), self._masked(self.corr)
        best_cos, part = cos.max(0)
        return best_cos, corr.max(0).values, part

    def best_for_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per component (either part): best cosine and best correlation with a live feature, `[C]` each."""
        cos, corr = self._masked(self.cosine).max(1).values, self._masked(self.corr).max(1).values
        return torch.maximum(cos[:self.C], cos[self.C:]), torch.maximum(corr[:self.C], corr[self.C:])

    def matched(self, cos: torch.Tensor | float, corr: torch.Tensor | float) -> Any:
        return (cos >= self.config.min_cosine) | (corr >= self.config.min_corr)

    def top_features(self, c: int) -> list[dict]:
        """Component c's best `top_k` live features over both parts, by cosine."""
        cos = self._masked(self.cosine)[[c, self.C + c]]
        flat = cos.flatten()
        k = min(self.config.top_k, int(torch.isfinite(flat).sum()))
        out = []
        for v, i in zip(*flat.topk(k)):
            side, f = divmod(int(i), cos.shape[1])
            part = c + side * self.C
            out.append({"feature": f, "sign": "+" if side == 0 else "-", "cosine": float(v),
                        "corr": float(self.corr[part, f]), "freq": float(self.feat_freq[f])})
        return out

    def assign(self) -> list[tuple[int, int]]:
        """One-to-one matches (component part, feature) by max(cosine, correlation) that pass the thresholds."""
        from scipy.optimize import linear_sum_assignment

        parts = torch.nonzero(self.part_mask()).flatten()
        feats = torch.tensor(self.live_features, dtype=torch.long)
        if len(parts) == 0 or len(feats) == 0:
            return []
        cos, corr = self.cosine[parts][:, feats], self.corr[parts][:, feats]
        rows, cols = linear_sum_assignment(-torch.maximum(cos, corr).numpy())
        pairs = [(int(parts[r]), int(feats[c])) for r, c in zip(rows, cols) if self.matched(cos[r, c], corr[r, c])]
        self.pairs = sorted(pairs)
        return self.pairs

    def summary(self) -> dict:
        """Headline figures: sizes, live counts, matched pairs, mean best cosine/correlation, unexplained counts."""
        live_c, live_f = self.live_components, self.live_features
        f_cos, f_corr, _ = self.best_for_features()
        c_cos, c_corr = self.best_for_components()
        lf, lc = torch.tensor(live_f, dtype=torch.long), torch.tensor(live_c, dtype=torch.long)
        def mean(t: torch.Tensor, idx: torch.Tensor) -> float:
            return float(t[idx].mean()) if len(idx) else float("nan")

        return {"site": self.site, "sae": self.sae_path, "sae_reads": self.reads, "space": self.space,
                "components": self.C,
                "features": int(self.feat_freq.numel()), "live_components": len(live_c), "live_features": len(live_f),
                "matched_pairs": len(self.pairs),
                "mean_best_cosine_per_component": mean(c_cos, lc), "mean_best_corr_per_component": mean(c_corr, lc),
                "mean_best_cosine_per_feature": mean(f_cos, lf), "mean_best_corr_per_feature": mean(f_corr, lf),
                "unexplained_features": len(self.unexplained_features()),
                "unexplained_components": len(self.unexplained_components()),
                "min_cosine": self.config.min_cosine, "min_corr": self.config.min_corr}

    def unexplained_features(self) -> list[int]:
        """Live SAE features no live component part matches, least explained first."""
        cos, corr, _ = self.best_for_features()
        out = [f for f in self.live_features if not self.matched(float(cos[f]), float(corr[f]))]
        return sorted(out, key=lambda f: float(torch.maximum(cos[f], corr[f])))

    def unexplained_components(self) -> list[int]:
        """Live components that match no live SAE feature, least explained first."""
        cos, corr = self.best_for_components()
        out = [c for c in self.live_components if not self.matched(float(cos[c]), float(corr[c]))]
        return sorted(out, key=lambda c: float(torch.maximum(cos[c], corr[c])))

    def component_table(self) -> str:
        """CSV: per live component, its frequency and best features (feature, sign, cosine, correlation)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        k = self.config.top_k
        w.writerow(["component", "frequency"] + [f"{h}_{i + 1}" for i in range(k) for h in ("feature", "sign", "cosine", "corr")])
        for c in self.live_components:
            row: list[Any] = [c, f"{float(self.comp_freq[c]):.6g}"]
            for m in self.top_features(c):
                row += [m["feature"], m["sign"], f"{m['cosine']:.4f}", f"{m['corr']:.4f}"]
            w.writerow(row)
        return buf.getvalue()

    def feature_table(self) -> str:
        """CSV: per live SAE feature, its frequency, best component part, best cosine and correlation, explained."""
        cos, corr, part = self.best_for_features()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["feature", "frequency", "best_component", "sign", "best_cosine", "best_corr", "explained"])
        for f in self.live_features:
            p = int(part[f])
            w.writerow([f, f"{float(self.feat_freq[f]):.6g}", p % self.C, "+" if p < self.C else "-",
                        f"{float(cos[f]):.4f}", f"{float(corr[f]):.4f}", bool(self.matched(float(cos[f]), float(corr[f])))])
        return buf.getvalue()


def sae_inputs(dec: Any, site: str, x: torch.Tensor, reads: str) -> torch.Tensor:
    """What the SAE reads at this position: the site input x, or the site's target output x Wᵀ + b."""
    if reads == "input":
        return x
    comps = dec.cm.component(site)
    out = x @ comps.target_weight.float()
    return out if comps.bias is None else out + comps.bias.float()


def compare_with_sae(dec: Any, site: str, sae: str | Path | LoadedSAE, data: Any, out: str | Path | None = None,
                     config: CompareConfig | None = None, tokenizer: Any = None, overwrite: bool = False,
                     progress: bool = True, harvest: Harvest | str | Path | None = None) -> Comparison:
    """Match the components of `site` to the SAE's features over the token ids `data` (streamed); with `out`, write
    `summary.json`, `components.csv`, `features.csv` and the side-by-side page `compare.html` there (atomically).
    `harvest` (a finished harvest of `dec`, or its directory): the components' firing frequencies, liveness and top
    contexts come from it (its N tokens) instead of from `data`, which still gives the activation correlations and
    the SAE's side."""
    cfg = config_or_default(config, CompareConfig)
    if site not in dec.cm.sites:
        raise DashboardError(f"site {site!r} is not decomposed; the sites are {dec.site_names}.")
    replace = store.replaceable_dir(out, overwrite, DashboardError, inputs=(dec.run_dir,)) if out is not None else False
    sae = sae if isinstance(sae, LoadedSAE) else load_sae(sae)
    reads, space = comparison_space(dec, site, sae)
    data = reiterable(data)
    C, F = dec.cm.component(site).C, sae.d_sae
    harvested = open_harvest(dec, harvest) if harvest is not None else None
    stats = ComponentStats(C, dec.config.ci_alive_threshold, cfg.n_examples)
    feats = npd.FeatureStats(F, split=False, threshold=0.0, n_examples=cfg.n_examples)
    moments = Moments(2 * C, F)
    seen = 0
    with torch.no_grad():
        for batch in token_stream(dec, [site], data, cfg.batch_size, cfg.max_batches, "compare activations", progress):
            b = batch.sites[site]
            y = sae_encode(sae, sae_inputs(dec, site, b.inputs, reads)).float().cpu()
            if harvested is None:
                stats.update(b.ci, b.acts, batch.first)
            feats.update(y, y, batch.first)
            moments.update(split_acts(b.ci.cpu(), b.acts.cpu()), y)
            seen += 1
    if seen == 0:
        raise DashboardError("the data yielded no batches; pass token ids [n, seq] with at least one row.")
    if harvested is not None:
        stats = harvested.component_stats(site, cfg.n_examples)
    dirs = torch.nn.functional.normalize(sae.W_dec.float(), dim=-1)
    result = Comparison(site, str(sae.path), reads, space, C, component_directions(dec, site, space) @ dirs.T,
                        moments.corr(), stats.frequency(), feats.frequency(), cfg)
    result.assign()
    if out is not None:
        write_comparison(result, dec, sae, data, stats, feats, out, replace, tokenizer, progress, harvested)
    return result


def write_comparison(result: Comparison, dec: Any, sae: LoadedSAE, data: Any, stats: ComponentStats,
                     feats: npd.FeatureStats, out: str | Path, replace: bool, tokenizer: Any, progress: bool,
                     harvested: Harvest | None = None) -> None:
    """The tables, the summary and the side-by-side page of a comparison (the components' contexts from the
    harvest, where there is one)."""
    cfg, site = result.config, result.site
    tokenizer = tokenizer if tokenizer is not None else getattr(dec.model, "tokenizer", None)
    shown = sorted(result.live_components, key=lambda c: -float(stats.features.fires[c]))
    tops = {c: result.top_features(c) for c in shown}
    unexplained = result.unexplained_features()[:cfg.n_unexplained]
    feature_ids = sorted({m["feature"] for ms in tops.values() for m in ms} | set(unexplained))
    wanted = {"components": [(c, p) for c in shown for _, p in stats.features.examples(c)] if harvested is None else [],
              "sae": [(f, p) for f in feature_ids for _, p in feats.examples(f)]}

    def read(ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        b = site_batches(dec, [site], ids.to(dec.device))[site]
        y = sae_encode(sae, sae_inputs(dec, site, b.inputs, result.reads)).float().cpu()
        return {"components": [b.ci.cpu(), b.acts.cpu()], "sae": [y, y]}

    contexts = windows(read, token_batches(dec, data, cfg.batch_size, cfg.max_batches), wanted, progress)
    if harvested is not None:
        contexts["components"] = harvested.contexts(site, shown)
    features = {f: {"index": f, "freq": float(result.feat_freq[f]),
                    "examples": _feature_examples(contexts["sae"], feats.examples(f), f, tokenizer)}
                for f in feature_ids}
    cards = [{"index": c, "freq": float(result.comp_freq[c]), "matches": tops[c],
              "examples": context_view(contexts["components"], stats.features.examples(c), c, tokenizer)}
             for c in shown]
    for card in cards:
        card["scale"] = example_scale(card["examples"])
    summary = result.summary()
    html = render.render("compare.html.j2", summary=summary, cards=cards, features=features, unexplained=unexplained,
                         unexplained_components=result.unexplained_components(), pairs=result.pairs, C=result.C)
    with store.atomic_dir(out, overwrite=replace) as tmp:
        store.write_json(tmp / "summary.json", summary)
        store.write_text(tmp / "components.csv", result.component_table())
        store.write_text(tmp / "features.csv", result.feature_table())
        store.write_text(tmp / "compare.html", html)


def _feature_examples(contexts: Any, pairs: list[tuple[float, int]], f: int, tokenizer: Any) -> list[dict]:
    examples = context_view({k: (ids, [v[0], v[0]], q) for k, (ids, v, q) in contexts.items()}, pairs, f, tokenizer)
    for e in examples:
        scale = max((t["act"] for t in e["tokens"]), default=0.0) or 1.0
        for t in e["tokens"]:
            t["ci"] = t["act"] / scale  # feature activation relative to its peak in the window, for the heat colour
    return examples
