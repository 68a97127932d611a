"""Text to token batches for language models: documents joined with EOS and chunked to a context length.

Accepts a `datasets.Dataset` / `IterableDataset`, local text/JSON/parquet files or a hub dataset name (both through
`datasets.load_dataset`; local files in its offline mode, so they never wait on the network), or a plain list of
strings. Streaming keeps memory bounded for data larger than memory.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decomp_hooks.data import DataError
from decomp_hooks.lm import looks_like_path

LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_text_dataset(source: Any, split: str = "train", streaming: bool = False, name: str | None = None) -> Any:
    """A `datasets` dataset from a Dataset object, local file(s) or a directory of them, or a hub dataset name (with
    its config `name`). A string that looks like a path but does not exist is an error, never a hub lookup."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source) and not _all_paths(source):
        return datasets.Dataset.from_dict({"text": list(source)})
    paths = [Path(p) for p in (source if isinstance(source, (list, tuple)) else [source])]
    if all(_is_path(p) for p in paths):
        files = local_files(paths)
        kinds = {LOCAL_FORMATS[f.suffix] for f in files}
        if len(kinds) != 1:
            raise DataError(f"data {source!r}: expected files of one kind among {sorted(LOCAL_FORMATS)}, found {sorted(kinds) or 'none'}.")
        kind, names = kinds.pop(), [str(f) for f in files]
        with datasets_offline(), unreadable_as_data_error(f"data file(s) {names} (read as {kind})"):
            return datasets.load_dataset(kind, data_files=names, split=split, streaming=streaming)
    if isinstance(source, str) and looks_like_path(source, tuple(LOCAL_FORMATS)):
        raise DataError(f"data {source!r}: no such file or directory ({Path(source).expanduser().resolve()}); "
                        "correct the path.")
    if isinstance(source, str):
        return datasets.load_dataset(source, name, split=split, streaming=streaming)
    raise DataError(f"cannot read text from a {type(source).__name__}; pass a datasets.Dataset, file paths or a dataset name.")


@contextmanager
def datasets_offline() -> Iterator[None]:
    """`datasets` in offline mode for the duration, whatever HF_HUB_OFFLINE says: loading local files then sends no
    request (online, `datasets` counts each load with a request to the hub, which waits seconds where a firewall
    drops packets)."""
    from datasets import config

    online = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = online


@contextmanager
def unreadable_as_data_error(what: str) -> Iterator[None]:
    """An error `datasets` raises on a file it cannot parse (not the format its suffix names, not UTF-8 text) as a
    DataError naming `what` and the cause, instead of a traceback from deep inside pyarrow or pandas."""
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except DataError:
        raise
    except (DatasetGenerationError, ValueError) as err:  # pyarrow's ArrowInvalid, UnicodeDecodeError, pandas' errors
        cause = err.__cause__ or err
        raise DataError(f"{what} cannot be read: {type(cause).__name__}: {cause}; check that each file holds what its "
                        "suffix says (.txt: UTF-8 text, one document a line; .json/.jsonl: JSON objects; .csv: a "
                        "header row; .parquet: a parquet table).") from None


def local_files(paths: Iterable[str | Path]) -> list[Path]:
    """The non-empty text/JSON/parquet/CSV files among `paths`, a directory standing for the files directly in it
    (sorted); an empty file holds no document, and `datasets` cannot infer a table from it."""
    paths = [Path(p).expanduser() for p in paths]
    return [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])
            if f.suffix in LOCAL_FORMATS and f.stat().st_size > 0]


def _all_paths(items: Iterable[str]) -> bool:
    return all(_is_path(s) for s in items)


def _is_path(s: str | Path) -> bool:
    try:
        return Path(s).exists()
    except OSError:  # e.g. a long document is not a file name
        return False


def token_stream(texts: Iterable[str], tokenizer: Any, eos_id: int | None = None) -> Iterator[int]:
    """Token ids of each document followed by EOS, as one stream."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; pass eos_id= to join documents.")
    for text in texts:
        yield from tokenizer(text, add_special_tokens=False)["input_ids"]
        yield eos


def iter_texts(dataset: Any, text_column: str = "text", batch_size: int = 1000,
               source: str = "the dataset") -> Iterator[str]:
    """The documents of a `datasets` dataset's text column, read `batch_size` rows at a time; a missing column, a
    row that is not text and a file that cannot be parsed (found while streaming) are errors naming `source`."""
    columns, row = getattr(dataset, "column_names", None), 0
    for batch in _read_batches(dataset, batch_size, source):
        columns = columns or list(batch)
        if text_column not in columns:
            raise DataError(f"{source} has no column {text_column!r}; its columns are {sorted(columns)}; set "
                            "text_column (data.text_column in a config) to the one holding the text.")
        texts = batch[text_column]
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise DataError(f"{source}: column {text_column!r} holds {texts[bad]!r:.60} ({type(texts[bad]).__name__}) "
                            f"at row {row + bad}, not text; set text_column to a column of strings, or drop the rows "
                            "without text.")
        row += len(texts)
        yield from texts


def _read_batches(dataset: Any, batch_size: int, source: str) -> Iterator[dict]:
    """`dataset.iter(batch_size)`, a file that cannot be parsed (found while streaming) an error naming `source`."""
    batches = dataset.iter(batch_size=batch_size)
    while True:
        with unreadable_as_data_error(source):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def token_rows(texts: Iterable[str], tokenizer: Any, context_length: int, eos_id: int | None = None,
               docs_per_call: int = 256) -> Iterator[torch.Tensor]:
    """Blocks of rows `[k, context_length]` (int32) of the documents' tokens joined by EOS, tokenising
    `docs_per_call` documents per tokenizer call (a fast tokenizer batches them); the incomplete tail is dropped."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; pass eos_id= to join documents.")
    texts = iter(texts)
    carry = np.empty(0, dtype=np.int32)
    while group := list(islice(texts, docs_per_call)):
        ids = tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]
        flat = np.concatenate([carry, np.fromiter(chain.from_iterable(d + [eos] for d in ids), dtype=np.int32)])
        n = len(flat) // context_length
        carry = flat[n * context_length:]
        if n:
            yield torch.from_numpy(flat[: n * context_length].reshape(n, context_length))


def chunk_tokens(stream: Iterable[int], context_length: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches `[batch_size, context_length]` of consecutive tokens; the incomplete tail is dropped."""
    row: list[int] = []
    rows: list[list[int]] = []
    for tok in stream:
        row.append(tok)
        if len(row) == context_length:
            rows.append(row)
            row = []
            if len(rows) == batch_size:
                yield torch.tensor(rows, dtype=torch.long)
                rows = []


class TokenBatches:
    """Re-iterable batches of token ids from text: each pass re-reads the dataset (streamed or in memory)."""

    def __init__(self, source: Any, tokenizer: Any, context_length: int, batch_size: int, text_column: str = "text",
                 streaming: bool = False, split: str = "train", max_context: int | None = None):
        if context_length < 1 or batch_size < 1:
            raise DataError(f"context_length={context_length}, batch_size={batch_size}: both must be ≥ 1.")
        if max_context is not None and context_length > max_context:
            raise DataError(f"context_length={context_length} exceeds the model's maximum context {max_context}; "
                            f"use a context_length ≤ {max_context}.")
        self.dataset = load_text_dataset(source, split, streaming)
        self.tokenizer, self.context_length, self.batch_size = tokenizer, context_length, batch_size
        self.text_column = text_column

    def texts(self) -> Iterator[str]:
        """The documents of the text column, read anew."""
        return iter_texts(self.dataset, self.text_column)

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = chunk_tokens(token_stream(self.texts(), self.tokenizer), self.context_length, self.batch_size)
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise DataError(f"the text yields fewer than {self.batch_size}×{self.context_length} tokens: not one batch; "
                            "pass more text, or a smaller batch_size / context_length.")


STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages"})


def stdlib_docstrings(min_chars: int = 200, limit: int | None = None, subpackages: bool = False) -> list[str]:
    """Human-written English every machine has: the Python standard library's longer docstrings (an offline corpus).

    By default only the top-level modules are read; `subpackages=True` also walks the packages (about twice the text),
    skipping test suites, IDLE and installed third-party packages. Files are read in sorted order, so the list is fixed."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = root.rglob("*.py") if subpackages else root.glob("*.py")
    docs: list[str] = []
    for path in sorted(p for p in paths if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
                    if limit is not None and len(docs) >= limit:
                        return docs
    return docs
