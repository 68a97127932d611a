"""Per-feature statistics over evaluation data, and Neuronpedia-style feature JSON for component activation examples.

A feature "fires" at a position when its component's causal importance exceeds the decomposition's
`ci_alive_threshold` τ (the threshold CI-L0 uses). Feature values are causal importances `g_c ∈ [0, 1]`:

- signed export (`decomp_signed_transcoder`): feature c has value `g_c`;
- ±-split `transcoder` export: feature c has value `g_c` where the signed activation `a_c = (x V)_c > 0` and 0 elsewhere,
  feature C + c has `g_c` where `a_c < 0` (so the split features fire exactly where their ReLU part is non-zero and
  the component matters).

`sparsity.safetensors` holds `log10(frequency + 1e-10)` of these firings (SAE-Lens convention). The JSON written per
site follows the batch schema sae-dashboard's `NeuronpediaConverter` writes (`model_id`, `layer`, `sae_set`,
`sae_id_suffix`, `features[{feature_index, activations[{tokens, values, bin_min, bin_max, bin_contains,
qualifying_token_index}], pos_str, pos_values, neg_str, neg_values, frac_nonzero, freq_hist_data_*, logits_hist_data_*,
neuron_alignment_*, correlated_*, decoder_weights_dist, n_prompts_total, n_tokens_in_prompt, dataset}]`), filled
minimally: top-activation examples (one bin, `bin_min = -1`), the activation histogram, firing fraction and, for sites
that write to the residual stream of a model with an unembedding, the decoder direction's top/bottom logits. Neuron
alignment and correlation tables are empty lists.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

HIST_BINS = 20
LOG_EPS = 1e-10
N_LOGITS = 10


def feature_values(ci: torch.Tensor, acts: torch.Tensor, split: bool) -> torch.Tensor:
    """Per-feature values `[..., F]` from causal importances and signed activations `[..., C]` (see module doc)."""
    ci = ci.float()
    if not split:
        return ci
    return torch.cat([ci * (acts > 0), ci * (acts < 0)], dim=-1)


class FeatureStats:
    """Firing counts, value histograms and the top-valued positions of one site's features, accumulated over batches."""

    def __init__(self, C: int, split: bool, threshold: float, n_examples: int, ranked: bool = False):
        self.C, self.split, self.threshold, self.n_examples = C, split, float(threshold), n_examples
        self.ranked = ranked  # top examples by a caller's `rank` (among firing positions) instead of by value
        self.F = 2 * C if split else C
        self.positions = 0
        self.fires = torch.zeros(self.F, dtype=torch.float64)
        self.hist = torch.zeros(self.F, HIST_BINS, dtype=torch.float64)
        self.top_values = torch.empty(self.F, 0)
        self.top_index = torch.empty(self.F, 0, dtype=torch.long)

    def update(self, ci: torch.Tensor, acts: torch.Tensor, first_position: int = 0,
               rank: torch.Tensor | None = None) -> None:
        """Add one batch (`[..., C]` each); `first_position` numbers its flattened positions for the examples.
        With `ranked`, `rank [..., F]` orders the top examples (e.g. |CI-gated activation|) among firing positions."""
        v = feature_values(ci, acts, self.split).reshape(-1, self.F).detach().cpu()
        fire = v > self.threshold
        if self.ranked:
            if rank is None:
                raise ValueError("FeatureStats(ranked=True).update needs rank= (one value per position and feature).")
            key = torch.where(fire, rank.reshape(-1, self.F).detach().float().cpu(), float("-inf"))
        else:
            key = v
        self.positions += v.shape[0]
        self.fires += fire.sum(0, dtype=torch.float64)
        bins = (v * HIST_BINS).floor().clamp(0, HIST_BINS - 1).long()
        flat = (torch.arange(self.F) * HIST_BINS + bins)[fire]
        self.hist.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
        if self.n_examples:
            k = min(self.n_examples, v.shape[0])
            vals, idx = key.topk(k, dim=0)
            values = torch.cat([self.top_values, vals.T], dim=1)
            index = torch.cat([self.top_index, idx.T + first_position], dim=1)
            keep = values.topk(min(self.n_examples, values.shape[1]), dim=1).indices
            self.top_values, self.top_index = values.gather(1, keep), index.gather(1, keep)

    def frequency(self) -> torch.Tensor:
        """Firing frequency per feature `[F]`."""
        return (self.fires / max(self.positions, 1)).float()

    def log_sparsity(self) -> torch.Tensor:
        """`log10(frequency + 1e-10)` per feature: the `sparsity` tensor of `sparsity.safetensors`."""
        return torch.log10(self.frequency() + LOG_EPS)

    def examples(self, f: int) -> list[tuple[float, int]]:
        """(value or rank, flattened position) of feature f's top firing positions, best first."""
        floor = float("-inf") if self.ranked else self.threshold
        return [(float(v), int(i)) for v, i in zip(self.top_values[f], self.top_index[f]) if v > floor]


def layer_of(name: str | None) -> int:
    """The layer number in a site or hook name (`blocks.3.`, `h.3.`, `layers.3.`), 0 if none."""
    m = re.search(r"(?:^|\.)(?:blocks|h|layers|layer)\.(\d+)\.", name or "")
    return int(m.group(1)) if m else 0


def token_strings(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """Token strings as Neuronpedia shows them (`Ġ` as a space), or the ids as text without a tokenizer."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [str(i) for i in ids]
    try:
        return [t.replace("Ġ", " ") if isinstance(t, str) else str(i)
                for t, i in zip(tokenizer.convert_ids_to_tokens(ids), ids)]
    except (AttributeError, TypeError, ValueError, IndexError):
        return [str(i) for i in ids]


def _round(values: Iterable[float]) -> list[float]:
    return [round(float(v), 3) for v in values]


Windows = dict[tuple[int, int], tuple[list[int], list[float], int]]  # (feature, position) -> (ids, values, index)


def feature_json(stats: FeatureStats, f: int, windows: Windows,
                 tokenizer: Any, decoder_row: torch.Tensor | None, unembed: torch.Tensor | None,
                 n_prompts: int, n_tokens: int, dataset: str) -> dict:
    """One feature in the NeuronpediaDashboardFeature layout."""
    activations = []
    for _, position in stats.examples(f):
        if (f, position) not in windows:
            continue
        ids, values, qualifying = windows[f, position]
        activations.append({"bin_min": -1, "bin_max": round(values[qualifying], 3), "bin_contains": -1,
                            "tokens": token_strings(tokenizer, ids), "values": _round(values),
                            "qualifying_token_index": qualifying})
    heights = stats.hist[f]
    centres = [(b + 0.5) / HIST_BINS for b in range(HIST_BINS)]
    nonzero = heights > 0
    pos_str, pos_values, neg_str, neg_values = [], [], [], []
    if decoder_row is not None and unembed is not None:
        logits = decoder_row.float() @ unembed.float()
        k = min(N_LOGITS, logits.numel())
        top, bottom = logits.topk(k), (-logits).topk(k)
        pos_str, pos_values = token_strings(tokenizer, top.indices.tolist()), _round(top.values)
        neg_str, neg_values = token_strings(tokenizer, bottom.indices.tolist()), _round(-bottom.values)
    return {
        "feature_index": f,
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": neg_str, "neg_values": neg_values, "pos_str": pos_str, "pos_values": pos_values,
        "frac_nonzero": round(float(stats.frequency()[f]), 6),
        "freq_hist_data_bar_values": _round(c for c, keep in zip(centres, nonzero) if keep),
        "freq_hist_data_bar_heights": [float(h) for h in heights[nonzero]],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": n_prompts, "n_tokens_in_prompt": n_tokens, "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": activations,
    }


def batch_json(stats: FeatureStats, windows: Windows, tokenizer: Any,
               decoder: torch.Tensor | None, unembed: torch.Tensor | None, *, model_id: str, layer: int, sae_set: str,
               sae_id_suffix: str, n_prompts: int, n_tokens: int, dataset: str,
               features: Iterable[int] | None = None) -> dict:
    """The NeuronpediaDashboardBatch layout for the given features (default: all) of one exported SAE."""
    chosen = range(stats.F) if features is None else features
    items = [feature_json(stats, f, windows, tokenizer, None if decoder is None else decoder[f], unembed,
                          n_prompts, n_tokens, dataset) for f in chosen]
    return {"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": sae_id_suffix,
            "features": items}
