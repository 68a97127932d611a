"""The harvest pass: stream N tokens through the decomposition once, accumulate (`accumulate`), checkpoint every K
batches, and write the directory `read` loads.

Every write of the output directory, checkpoint or final, is one `store.atomic_dir`: a kill at any moment leaves the
previous checkpoint (or nothing), never a half-written directory. A checkpoint is the same directory with
`complete: false` and the data position (batches, sequences, tokens read, and a digest of the last batch); resuming
reads it back, skips that many batches of the same data (checking the digest) and continues, so a resumed harvest
ends bit for bit where an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.activations import stream
from decomp_hooks.export.inputs import check_count
from decomp_hooks.harvest.accumulate import TOKEN_COUNTS, Accumulators
from decomp_hooks.harvest.read import (
    FORMAT,
    META,
    VERSION,
    Harvest,
    HarvestError,
    accumulators,
    decomposition_digest,
    load_harvest,
    read_files,
    read_meta,
)
from decomp_hooks.progress import progress_bar
from decomp_hooks.train.preflight import vocab_size

#: the settings a resumed harvest must share with the checkpoint it continues
IDENTITY = ("config", "n_tokens", "sites", "components", "vocab", "threshold", "token_counts", "decomposition")


@dataclass
class HarvestConfig:
    """What a harvest keeps per component and how it reads the data (defaults shown)."""

    batch_size: int = 16  # sequences per batch of a token-id tensor (an iterable of batches keeps its own)
    top_k: int = 30  # top contexts kept per component
    window: int = 20  # tokens kept on each side of a top context's position
    pmi_top: int = 40  # tokens of highest PMI kept per component, for the input and for the next token
    token_counts: str = "auto"  # joint token counts: dense (an [N, V] table), frequent (Misra–Gries), auto
    max_table: int = 2**25  # auto: dense while N·V (components times vocabulary) is at most this
    summary_size: int = 256  # frequent: (token, count) pairs kept per component
    checkpoint_every: int = 200  # batches between checkpoints

    def __post_init__(self) -> None:
        """Refuse sizes that are not positive integers and unknown count kinds, naming them."""
        for name in ("batch_size", "top_k", "pmi_top", "max_table", "summary_size", "checkpoint_every"):
            check_count(f"HarvestConfig.{name}", getattr(self, name), HarvestError)
        check_count("HarvestConfig.window", self.window, HarvestError, minimum=0)
        if self.token_counts not in ("auto", *TOKEN_COUNTS):
            raise HarvestError(f"HarvestConfig.token_counts={self.token_counts!r}: use 'auto', "
                               f"{' or '.join(repr(k) for k in TOKEN_COUNTS)}.")

    def counts_kind(self, N: int, V: int) -> str:
        """The joint-count kind for N components and V tokens: `token_counts`, or under auto dense when it fits."""
        if self.token_counts != "auto":
            return self.token_counts
        return "dense" if N * V <= self.max_table else "frequent"


def plan(dec: Any, n_tokens: int | None, cfg: HarvestConfig, dataset: str) -> dict:
    """What identifies a harvest: settings, sites and components, vocabulary, threshold, decomposition digest."""
    V = vocab_size(dec.cm.target)
    if V is None:
        raise HarvestError("a harvest counts tokens, but the decomposed model has no vocabulary (config.vocab_size, "
                           "cfg.d_vocab or an nn.Embedding); harvest a language model.")
    sites, components, offset = [], [], 0
    for n in dec.site_names:
        C = dec.cm.component(n).C
        sites.append({"name": n, "C": C, "offset": offset})
        components += [[n, c] for c in range(C)]
        offset += C
    return {"format": FORMAT, "version": VERSION, "config": asdict(cfg), "n_tokens": n_tokens, "sites": sites,
            "components": components, "vocab": V, "threshold": float(dec.config.ci_alive_threshold),
            "token_counts": cfg.counts_kind(offset, V), "decomposition": decomposition_digest(dec), "dataset": dataset}


def fresh(meta: dict) -> dict:
    """The position of a pass that has read nothing yet."""
    return {**meta, "complete": False, "batches": 0, "sequences": 0, "tokens": 0, "seq_len": None,
            "data_digest": None, "seconds": 0.0}


def start(dec: Any, out: Path, meta: dict, acc: Accumulators, resume: bool, overwrite: bool) -> dict:
    """Where the pass starts: the checkpoint in `out` when resuming one (its state loaded into `acc`), else the
    beginning, after checking that `out` may be written."""
    store.recover_dir(out)
    held = (out / META).is_file()
    if resume and held:
        saved = read_meta(out)
        for key in IDENTITY:
            if saved.get(key) != meta[key]:
                raise HarvestError(f"cannot resume the harvest in {str(out)!r}: its {key} differs from this call's "
                                   f"({saved.get(key)!r} vs {meta[key]!r}). Resume with the same decomposition and "
                                   "settings, or start over with overwrite=True (--force).")
        if not saved["complete"]:
            acc.load(read_files(out, saved), saved["scalars"])
        return saved
    if held and not overwrite and not read_meta(out).get("complete"):
        raise HarvestError(f"{str(out)!r} holds an unfinished harvest; pass resume=True (--resume) to continue it, "
                           "or overwrite=True (--force) to start over.")
    store.replaceable_dir(out, overwrite, HarvestError, inputs=(dec.run_dir,))
    return fresh(meta)


def limited(batches: Iterable[torch.Tensor], n_tokens: int | None) -> Iterator[torch.Tensor]:
    """The token-id batches up to `n_tokens` tokens, rounded up to whole sequences (the last batch is cut to the rows
    needed, and no batch is read beyond it); all of them when `n_tokens` is None."""
    seen = 0
    for ids in batches:
        if n_tokens is not None:
            ids = ids[:-(-(n_tokens - seen) // ids.shape[1])]
        seen += ids.numel()
        yield ids
        if n_tokens is not None and seen >= n_tokens:
            return


def digest(ids: torch.Tensor) -> str:
    """SHA-256 of a batch of token ids: a resumed pass checks that it skipped the same data."""
    return hashlib.sha256(ids.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()[:32]


def skip(batches: Iterator[torch.Tensor], meta: dict) -> None:
    """Read past the batches the checkpoint holds, refusing data whose last of them differs."""
    last = None
    for _ in range(meta["batches"]):
        last = next(batches, None)
        if last is None:
            raise HarvestError(f"the data ends before the {meta['batches']} batches the checkpoint has read; resume "
                               "with the same data.")
    if last is not None and digest(last) != meta["data_digest"]:
        raise HarvestError(f"batch {meta['batches'] - 1} of the data differs from the one the checkpoint read; resume "
                           "with the same data and batch size.")


def write(out: Path, acc: Accumulators, meta: dict) -> Harvest:
    """Write the whole harvest directory (a checkpoint or the result) in one atomic replacement; what it holds."""
    files, meta = acc.files(meta["config"]["pmi_top"]), {**meta, "scalars": acc.scalars()}
    with store.atomic_dir(out, overwrite=out.exists()) as tmp:
        for name, tensors in files.items():
            store.write_tensors(tmp / f"{name}.safetensors", tensors)
        store.write_json(tmp / META, meta)
    return Harvest(out, meta, files)


def harvest(dec: Any, data: Any, n_tokens: int | None, out_dir: str | Path, config: HarvestConfig | None = None, *,
            resume: bool = False, overwrite: bool = False, dataset: str = "", progress: bool = True) -> Harvest:
    """Stream `n_tokens` tokens of `data` (token ids `[n, seq]`, or an iterable of such batches such as
    `TokenBatches`; rounded up to whole sequences, None for all) through `dec` once and write per-component
    statistics to `out_dir` (see docs/harvest.md); returns them as `load_harvest` reads them. `resume=True` continues
    the checkpoint in `out_dir` (give the same data), `overwrite=True` replaces a finished or unfinished one."""
    from decomp_hooks.dashboard.build import config_or_default, token_batches  # the dashboard package needs jinja2

    cfg = config_or_default(config, HarvestConfig, HarvestError)
    check_count("n_tokens", n_tokens, HarvestError, optional=True)
    out = Path(out_dir)
    meta = plan(dec, n_tokens, cfg, dataset)
    acc = accumulators(meta)
    meta = start(dec, out, meta, acc, resume, overwrite)
    if meta["complete"]:
        return load_harvest(out)
    batches = limited(token_batches(dec, data, cfg.batch_size, error=HarvestError), n_tokens)
    skip(batches, meta)
    names, done, began = dec.site_names, meta["tokens"], time.perf_counter()
    bar = progress_bar(total=n_tokens, initial=done, desc="harvest", unit="tok", unit_scale=True, disable=not progress)
    for batch in stream(dec, names, batches, progress=False):
        if meta["batches"] % cfg.checkpoint_every == 0 and meta["tokens"] > done:
            write(out, acc, {**meta, "seconds": meta["seconds"] + time.perf_counter() - began})
        ids = batch.tokens
        ci, acts = (torch.cat([getattr(batch.sites[n], f) for n in names], 1).float().cpu() for f in ("ci", "acts"))
        acc.update(ids, ci, acts, meta["tokens"])
        meta.update(batches=meta["batches"] + 1, sequences=meta["sequences"] + ids.shape[0],
                    tokens=meta["tokens"] + ids.numel(), seq_len=ids.shape[1], data_digest=digest(ids))
        bar.total = None if n_tokens is None else -(-n_tokens // ids.shape[1]) * ids.shape[1]  # whole sequences
        bar.update(ids.numel())
    bar.close()
    return finish(out, acc, meta, done, time.perf_counter() - began, progress)


def finish(out: Path, acc: Accumulators, meta: dict, done: int, seconds: float, progress: bool) -> Harvest:
    """Write the finished harvest and report its speed; returns it (its tensors are the accumulators')."""
    if meta["tokens"] == 0:
        raise HarvestError("the data yielded no tokens; pass token ids [n, seq] with at least one row.")
    if meta["n_tokens"] is not None and meta["tokens"] < meta["n_tokens"]:
        warnings.warn(f"the data ran out after {meta['tokens']} of the {meta['n_tokens']} tokens asked for; the "
                      "harvest holds those.", stacklevel=3)
    total = meta["seconds"] + seconds
    result = write(out, acc, {**meta, "complete": True, "seconds": total,
                              "tokens_per_s": meta["tokens"] / max(total, 1e-9)})
    if progress:
        rate = (meta["tokens"] - done) / max(seconds, 1e-9)
        print(f"harvest: {meta['tokens'] - done:,} tokens in {seconds:.1f} s, {rate:,.0f} tokens/s -> {out}",
              file=sys.stderr)
    return result
