"""Text to token batches: EOS-joined documents chunked to a context, local files through datasets, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from decomp_hooks.data import DataError
from decomp_hooks.text import TokenBatches, chunk_tokens, stdlib_docstrings, token_stream

pytest.importorskip("datasets")


class CharTokenizer:
    """One id per character (ord % 90 + 1); EOS = 0: enough to check joining and chunking exactly."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 90 + 1 for c in text]}


def test_documents_joined_with_eos_and_chunked():
    ids = list(token_stream(["ab", "cde"], CharTokenizer()))
    assert ids == [ord("a") % 90 + 1, ord("b") % 90 + 1, 0, ord("c") % 90 + 1, ord("d") % 90 + 1, ord("e") % 90 + 1, 0]
    batches = list(chunk_tokens(range(25), context_length=4, batch_size=2))
    assert len(batches) == 3 and batches[0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batches[2].dtype == torch.long


def test_local_files_and_lists(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    (tmp_path / "b.txt").write_text("more text here\n")
    from_dir = list(TokenBatches(tmp_path, CharTokenizer(), context_length=5, batch_size=2))
    assert from_dir and all(b.shape == (2, 5) for b in from_dir)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": "x" * 30}) for _ in range(3)))
    batches = list(TokenBatches(str(jsonl), CharTokenizer(), context_length=8, batch_size=2, text_column="body"))
    assert len(batches) == 5 and int((torch.cat(batches) == 0).sum()) == 2
    streamed = list(TokenBatches(str(jsonl), CharTokenizer(), 8, 2, text_column="body", streaming=True))
    assert all(torch.equal(a, b) for a, b in zip(batches, streamed))
    assert next(iter(TokenBatches(["some text"] * 5, CharTokenizer(), 4, 2))).shape == (2, 4)


def test_text_errors(tmp_path):
    with pytest.raises(DataError, match="exceeds the model's maximum context 64"):
        TokenBatches(["x"], CharTokenizer(), context_length=128, batch_size=1, max_context=64)
    with pytest.raises(DataError, match="no column 'text'.*\\['body'\\]"):
        list(TokenBatches(str(_jsonl(tmp_path)), CharTokenizer(), 4, 1))
    with pytest.raises(DataError, match="not one batch"):
        list(TokenBatches(["tiny"], CharTokenizer(), context_length=100, batch_size=4))


def _jsonl(tmp_path):
    path = tmp_path / "body.jsonl"
    path.write_text(json.dumps({"body": "hello"}))
    return path


def test_stdlib_corpus_is_real_english():
    docs = stdlib_docstrings(limit=20)
    assert len(docs) == 20 and all(len(d) >= 200 for d in docs)
