"""Harvest: one resumable streaming pass over a corpus that keeps per-component statistics in bounded memory.

    import decomp_hooks as dh
    h = dh.harvest(dec, tokens, 100_000, "harvest/")   # firing, top contexts, token PMI, co-firing of every component
    h = dh.load_harvest("harvest/")                    # read back (checked); h.density, h.coact, h.pmi(site, c)

Modules: `accumulate` (the fixed-size accumulators), `run` (the pass, checkpoints and resume), `read` (the
directory read back). docs/harvest.md describes the files.
"""
from __future__ import annotations

from decomp_hooks.harvest.read import Harvest, HarvestError, load_harvest
from decomp_hooks.harvest.run import HarvestConfig, harvest

__all__ = ["Harvest", "HarvestConfig", "HarvestError", "harvest", "load_harvest"]
