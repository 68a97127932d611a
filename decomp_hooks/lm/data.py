"""Text for language-model runs, tokenised into rows of `context_length` tokens: training rows and disjoint
held-out evaluation rows.

Without streaming the corpus is tokenised once and cached (safetensors + JSON, keyed by the source's identity, the
text column, the context length, the row limit and the tokenizer); with streaming, batches are tokenised as they are
read, for corpora larger than memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.data import DataError
from decomp_hooks.lm import config_error, load_tokenizer, looks_like_path
from decomp_hooks.progress import progress_bar
from decomp_hooks.text import LOCAL_FORMATS, iter_texts, load_text_dataset, local_files, stdlib_docstrings, token_rows

CACHE_FORMAT = 1
#: offline corpora by name: () -> documents
NAMED_CORPORA: dict[str, Callable[[], list[str]]] = {"stdlib_docstrings": stdlib_docstrings}


@dataclass
class DataConfig:
    """Text to train and evaluate on, tokenised into rows of `context_length` tokens."""

    source: str | None = None  # hub dataset, local .txt/.json/.jsonl/.parquet/.csv file or folder, or stdlib_docstrings
    files: list[str] = field(default_factory=list)  # several local files/folders instead of one source
    name: str | None = None  # the hub dataset's config name
    split: str = "train"  # the split to train on (local files and stdlib_docstrings have only "train")
    text_column: str = "text"  # the column holding the documents (a .txt file's documents are its lines)
    tokenizer: str | None = None  # a local tokenizer directory; None: the model's tokenizer
    context_length: int = 128  # tokens per row; documents are joined by EOS and the incomplete tail is dropped
    eval_split: str | None = None  # a hub split to evaluate on; None: hold out the last eval_rows rows of `split`
    eval_rows: int = 64  # evaluation rows of context_length tokens
    streaming: bool = False  # tokenise while reading instead of all at once (corpora larger than memory; no cache)
    max_rows: int | None = None  # stop after this many training rows
    cache_dir: str | None = None  # token cache; None: $XDG_CACHE_HOME/decomp-hooks/tokens; "": no cache

    def __post_init__(self) -> None:
        """Refuse a bad value when the config is read, before any text is read: each error names it and the fix."""
        if self.source == "" or "" in self.files:
            raise config_error(f"data.source={self.source!r}, data.files={self.files}: an empty path; name a hub "
                               f"dataset, a local file or folder, or one of {sorted(NAMED_CORPORA)}.")
        if self.context_length < 1:
            raise config_error(f"data.context_length={self.context_length}: must be ≥ 1 (tokens per row).")
        if self.eval_rows < 0:
            raise config_error(f"data.eval_rows={self.eval_rows}: must be ≥ 0 (held-out rows).")
        if self.max_rows is not None and self.max_rows < 1:
            raise config_error(f"data.max_rows={self.max_rows}: must be ≥ 1, or null for every row.")


@dataclass
class TokenData:
    """Token rows to train on (a tensor, or re-iterable batches when streaming) and disjoint rows to evaluate on."""

    train: Any
    eval: torch.Tensor
    info: dict


@dataclass
class Corpus:
    """Where the text comes from: what `load_text_dataset` reads, its identity for the cache key, and a description."""

    source: Any
    identity: dict
    description: str
    named_splits: bool = False

    def dataset(self, split: str, streaming: bool, name: str | None) -> Any:
        """The corpus as a `datasets` dataset; an unreachable hub is an error naming the fixes."""
        try:
            return load_text_dataset(self.source, split, streaming, name=name)
        except ConnectionError as err:
            raise config_error(f"data.source {self.source!r}: no local file or directory of that name exists and the "
                               f"hub cannot be reached ({err}); correct the path, or unset HF_HUB_OFFLINE, or "
                               "pre-download the dataset.") from None


def token_data(cfg: DataConfig, tokenizer: Any = None, batch_size: int = 32, progress: bool = True) -> TokenData:
    """Training and held-out evaluation rows of `cfg.context_length` tokens of the configured text, tokenised with
    `cfg.tokenizer` or else `tokenizer` (the model's)."""
    if batch_size < 1:
        raise config_error(f"batch_size={batch_size}: must be ≥ 1.")
    tokenizer = data_tokenizer(cfg, tokenizer)
    text = corpus(cfg)
    if not text.named_splits and (cfg.split != "train" or cfg.eval_split is not None):
        raise config_error(f"data: {text.description} has a single split; drop data.split / data.eval_split and "
                           "hold out data.eval_rows rows for evaluation instead.")
    build = streamed_data if cfg.streaming else cached_data
    return build(cfg, text, tokenizer, batch_size, progress)


def data_tokenizer(cfg: DataConfig, tokenizer: Any = None) -> Any:
    """`cfg.tokenizer` (a local directory) when set, else `tokenizer`; it needs an EOS id to join documents."""
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_dir():
            raise config_error(f"data.tokenizer {cfg.tokenizer!r}: no such directory ({path.resolve()}); correct the "
                               "path, or drop it to use the model's tokenizer.")
        tokenizer = load_tokenizer(str(path), "data.tokenizer")
    if tokenizer is None:
        raise config_error("data: no tokenizer; pass the model's, or set data.tokenizer to a local tokenizer "
                           "directory.")
    if tokenizer.eos_token_id is None:
        raise config_error(f"the tokenizer {type(tokenizer).__name__} has no eos_token_id, which joins documents; set "
                           "its eos_token or use another tokenizer (data.tokenizer).")
    return tokenizer


def corpus(cfg: DataConfig) -> Corpus:
    """The configured source: a named offline corpus, local files or folders, or a hub dataset."""
    if cfg.files and cfg.source is not None:
        raise config_error(f"data.source={cfg.source!r} and data.files={cfg.files} are both set; keep one.")
    if cfg.files:
        return files_corpus(cfg.files)
    if cfg.source is None:
        raise config_error(f"data.source is not set; name a hub dataset, a local file or folder, or one of "
                           f"{sorted(NAMED_CORPORA)}.")
    if cfg.source in NAMED_CORPORA:
        docs = NAMED_CORPORA[cfg.source]()
        digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:16]
        return Corpus(docs, {"corpus": cfg.source, "sha256": digest}, f"{cfg.source} ({len(docs)} documents)")
    if looks_like_path(cfg.source, tuple(LOCAL_FORMATS)):
        return files_corpus([cfg.source])
    return Corpus(cfg.source, {"hub": cfg.source, "name": cfg.name}, f"hub dataset {cfg.source!r}", named_splits=True)


def files_corpus(paths: list[str]) -> Corpus:
    """Local files and folders of files; identified by their resolved paths, sizes and modification times."""
    for p in paths:
        if not Path(p).expanduser().exists():
            raise config_error(f"data: {p!r}: no such file or directory ({Path(p).expanduser().resolve()}); correct "
                               "the path.")
    files = local_files(paths)
    if not files:
        raise config_error(f"data: {paths} hold no non-empty {'/'.join(sorted(LOCAL_FORMATS))} files; name files of "
                           "those kinds that hold text.")
    stats = [(str(f.resolve()), f.stat()) for f in files]
    identity = {"files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats]}
    return Corpus([str(f) for f in files], identity, f"{len(files)} local file(s) ({', '.join(paths)})")


# -- tokenised once, cached ----------------------------------------------------------------------------------------


def cached_data(cfg: DataConfig, text: Corpus, tokenizer: Any, batch_size: int, progress: bool) -> TokenData:
    """All rows in memory: evaluation rows from `eval_split`, or else the last `eval_rows` rows held out of training."""
    held_out = 0 if cfg.eval_split else cfg.eval_rows
    limit = None if cfg.max_rows is None else cfg.max_rows + held_out
    rows, cache = cached_rows(cfg, text, cfg.split, tokenizer, limit, progress)
    if len(rows) < held_out + batch_size:
        raise DataError(f"{text.description} gives {len(rows)} rows of {cfg.context_length} tokens: too few for "
                        f"{held_out} evaluation rows and one training batch of {batch_size}; add text, or lower "
                        "data.eval_rows, data.context_length or the batch size.")
    train, evals = rows[: len(rows) - held_out], rows[len(rows) - held_out:]
    held = f"the last {held_out} rows of split {cfg.split!r}, held out of training"
    if cfg.eval_split:
        evals, _ = cached_rows(cfg, text, cfg.eval_split, tokenizer, cfg.eval_rows, progress)
        _check_eval_rows(evals, cfg, text, cfg.eval_split)
        held = f"the first {cfg.eval_rows} rows of split {cfg.eval_split!r}"
    info = {"source": text.description, "rows": len(train), "tokens": train.numel(), "eval_rows": len(evals),
            "eval": held, "context_length": cfg.context_length, "streaming": False, **cache}
    return TokenData(train, evals, info)


def cached_rows(cfg: DataConfig, text: Corpus, split: str, tokenizer: Any, limit: int | None,
                progress: bool) -> tuple[torch.Tensor, dict]:
    """The split's rows (LongTensor) from the token cache, or tokenised and then cached; with a note of which."""
    key = json.loads(json.dumps({"format": CACHE_FORMAT, "source": text.identity, "split": split,
                                 "text_column": cfg.text_column, "context_length": cfg.context_length,
                                 "rows": limit, "tokenizer": tokenizer_fingerprint(tokenizer)}))
    folder = cache_folder(cfg.cache_dir, key)
    rows = read_cache(folder, key) if folder is not None else None
    if rows is not None:
        return rows, {"cache": str(folder), "cache_hit": True}
    rows = tokenise(text.dataset(split, False, cfg.name), cfg, tokenizer, limit, progress, text.description)
    if folder is not None:
        write_cache(folder, key, rows)
    return rows, {"cache": folder and str(folder), "cache_hit": False}


def tokenise(dataset: Any, cfg: DataConfig, tokenizer: Any, limit: int | None, progress: bool,
             source: str) -> torch.Tensor:
    """Up to `limit` rows of the dataset's documents joined by EOS (LongTensor `[rows, context_length]`); `source`
    names the text in errors."""
    docs = progress_bar(iter_texts(dataset, cfg.text_column, source=source), total=_length(dataset), desc="tokenise",
                        unit="doc", disable=not progress)
    blocks, n = [], 0
    for block in token_rows(docs, tokenizer, cfg.context_length):
        blocks.append(block)
        n += len(block)
        if limit is not None and n >= limit:
            break
    docs.close()
    rows = torch.cat(blocks) if blocks else torch.empty(0, cfg.context_length, dtype=torch.int32)
    return rows[:limit].long()


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides token ids: the tokenizer's class, EOS id and full spec (or vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{spec}".encode()).hexdigest()[:16]


def cache_folder(cache_dir: str | None, key: dict) -> Path | None:
    """The cache entry for `key` under `cache_dir` (None: $XDG_CACHE_HOME/decomp-hooks/tokens; "": no caching)."""
    if cache_dir == "":
        return None
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    root = Path(cache_dir).expanduser() if cache_dir is not None else xdg / "decomp-hooks" / "tokens"
    if root.exists() and not root.is_dir():
        raise config_error(f"data.cache_dir {str(root)!r} is a file, not a directory; name a directory, or \"\" for no "
                           "token cache.")
    return root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_cache(folder: Path, key: dict) -> torch.Tensor | None:
    """The cached rows, or None when absent; a damaged or mismatched entry is reported and tokenised again."""
    if not folder.exists():
        return None
    try:
        meta = store.read_json(folder / "tokens.json")
        rows = store.read_tensors(folder / "tokens.safetensors")["tokens"]
    except (store.StoreError, KeyError) as err:
        warnings.warn(f"token cache {folder} is unreadable ({err}); tokenising again.", stacklevel=2)
        return None
    if meta.get("key") != key or meta.get("sha256") != _digest(rows) or rows.shape[1:] != (key["context_length"],):
        warnings.warn(f"token cache {folder} does not match its record (edited or corrupt); tokenising again.",
                      stacklevel=2)
        return None
    return rows.long()


def write_cache(folder: Path, key: dict, rows: torch.Tensor) -> None:
    """Store rows as int32 safetensors with their key, counts and checksum, replacing the entry in one rename."""
    small = rows.to(torch.int32)
    with store.atomic_dir(folder, overwrite=True) as tmp:
        store.write_tensors(tmp / "tokens.safetensors", {"tokens": small})
        store.write_json(tmp / "tokens.json", {"key": key, "rows": len(rows), "tokens": rows.numel(),
                                               "sha256": _digest(small)})


def _digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def _check_eval_rows(evals: torch.Tensor, cfg: DataConfig, text: Corpus, split: str) -> None:
    if len(evals) < cfg.eval_rows:
        raise DataError(f"split {split!r} of {text.description} gives {len(evals)} rows of "
                        f"{cfg.context_length} tokens, fewer than data.eval_rows={cfg.eval_rows}; lower eval_rows or "
                        "context_length.")


# -- streamed ------------------------------------------------------------------------------------------------------


class StreamedBatches:
    """Re-iterable training batches `[batch_size, context_length]`: each pass streams the corpus again, skips the
    rows taken for evaluation and stops after `max_rows` rows; the incomplete last batch is dropped."""

    def __init__(self, cfg: DataConfig, text: Corpus, tokenizer: Any, batch_size: int, skip_rows: int):
        self.cfg, self.text, self.tokenizer = cfg, text, tokenizer
        self.batch_size, self.skip_rows = batch_size, skip_rows

    def __iter__(self) -> Iterator[torch.Tensor]:
        stop = None if self.cfg.max_rows is None else self.skip_rows + self.cfg.max_rows
        rows = islice(stream_rows(self.cfg, self.text, self.cfg.split, self.tokenizer), self.skip_rows, stop)
        empty = True
        while len(batch := list(islice(rows, self.batch_size))) == self.batch_size:
            empty = False
            yield torch.stack(batch)
        if empty:
            raise DataError(f"{self.text.description} yields no training batch of {self.batch_size}×"
                            f"{self.cfg.context_length} tokens after {self.skip_rows} evaluation rows; add text, or "
                            "lower data.eval_rows, data.context_length or the batch size.")


def stream_rows(cfg: DataConfig, text: Corpus, split: str, tokenizer: Any) -> Iterator[torch.Tensor]:
    """Single rows (LongTensor `[context_length]`) of a split, tokenised while it streams."""
    docs = iter_texts(text.dataset(split, True, cfg.name), cfg.text_column, source=text.description)
    for block in token_rows(docs, tokenizer, cfg.context_length):
        yield from block.long()


def streamed_data(cfg: DataConfig, text: Corpus, tokenizer: Any, batch_size: int, progress: bool) -> TokenData:
    """Evaluation rows read first (from `eval_split`, or the start of the stream, which training then skips) and
    training batches streamed on every pass."""
    split = cfg.eval_split or cfg.split
    rows = list(islice(stream_rows(cfg, text, split, tokenizer), cfg.eval_rows))
    evals = torch.stack(rows) if rows else torch.empty(0, cfg.context_length, dtype=torch.long)
    _check_eval_rows(evals, cfg, text, split)
    skip = 0 if cfg.eval_split else cfg.eval_rows
    held = f"the first {cfg.eval_rows} rows of split {split!r}" + ("" if cfg.eval_split else ", skipped in training")
    info = {"source": text.description, "rows": None, "tokens": None, "eval_rows": len(evals), "eval": held,
            "context_length": cfg.context_length, "streaming": True, "cache": None, "cache_hit": False}
    return TokenData(StreamedBatches(cfg, text, tokenizer, batch_size, skip), evals, info)
