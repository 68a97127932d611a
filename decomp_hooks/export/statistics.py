"""The statistics an export writes beside the weights: per-feature firing over evaluation data and top examples.

One streaming pass (`decomp_hooks.activations.stream`) gives every exported site's `FeatureStats`; for token-id data
of one sequence length a second pass reads back the token windows of the top examples (Neuronpedia JSON).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from decomp_hooks.activations import site_batches, stream, windows
from decomp_hooks.data import iter_batches, reiterable
from decomp_hooks.export.format import SIGNED, ExportError
from decomp_hooks.export.inputs import checked_batches
from decomp_hooks.export.neuronpedia import FeatureStats, Windows, feature_values


@dataclass
class Statistics:
    """Per-site feature statistics over the evaluation data, and the token windows of the top examples."""

    stats: dict[str, FeatureStats]
    windows: dict[str, Windows] = field(default_factory=dict)
    n_prompts: int = 0
    n_tokens: int = 0
    text: bool = False


def collect_statistics(dec: Any, names: list[str], format: str, data: Any, batch_size: int = 32,
                       max_batches: int | None = None, n_examples: int = 20) -> Statistics:
    """One pass over `data` for firing counts and top examples; a second over the sequences holding the examples,
    when the data is token ids of one sequence length."""
    split = format != SIGNED
    stats = {n: FeatureStats(dec.cm.component(n).C, split, dec.config.ci_alive_threshold, n_examples) for n in names}
    data = reiterable(data)
    seq_len, text, n_prompts, seen = None, True, 0, 0
    batches = checked_batches(dec, data, batch_size, max_batches, ExportError)
    for batch in stream(dec, names, batches, desc="export statistics", progress=False):
        for n in names:
            stats[n].update(batch.sites[n].ci, batch.sites[n].acts, batch.first)
        ids = batch.tokens
        text = text and ids is not None and seq_len in (None, ids.shape[1])
        if ids is not None:
            seq_len, n_prompts = ids.shape[1], n_prompts + ids.shape[0]
        seen += 1
    if not seen:
        raise ExportError("the export data yielded no batches; pass a non-empty tensor, dict batch or list of batches, "
                          "or data=None to export without statistics.")
    if not text or not n_examples:
        return Statistics(stats)

    def read(ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        got = site_batches(dec, names, ids.to(dec.device))
        return {n: [feature_values(b.ci, b.acts, split).cpu()] for n, b in got.items()}

    wanted = {n: [(f, pos) for f in range(stats[n].F) for _, pos in stats[n].examples(f)] for n in names}
    contexts = windows(read, iter_batches(data, batch_size, max_batches), wanted, progress=False)
    found = {n: {k: (ids, values[0], q) for k, (ids, values, q) in contexts[n].items()} for n in names}
    return Statistics(stats, found, n_prompts, seq_len, True)
