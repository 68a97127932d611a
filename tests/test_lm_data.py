"""Text to token rows from config: local folders/JSONL/parquet, the token cache (hit, miss on change, rebuilt when
damaged), held-out evaluation rows disjoint from training, streaming, and errors that name the value and the fix."""
from __future__ import annotations

import json
import os

import pytest
import torch

from decomp_hooks import store
from decomp_hooks.config import ConfigError
from decomp_hooks.data import DataError
from decomp_hooks.lm.data import DataConfig, token_data
from decomp_hooks.text import stdlib_docstrings

datasets = pytest.importorskip("datasets")


class Counting:
    """A tokenizer that counts its calls (tokenisation work), delegating everything else."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def docs():
    return stdlib_docstrings(limit=40)


@pytest.fixture
def txt_dir(tmp_path, docs):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(docs[:20]))
    (folder / "b.txt").write_text("\n".join(docs[20:]))
    return folder


def _cfg(source, tmp_path, **kwargs):
    return DataConfig(**{"source": str(source), "context_length": 16, "eval_rows": 4,
                         "cache_dir": str(tmp_path / "cache"), **kwargs})


def test_text_folder_rows_and_held_out_eval(txt_dir, tmp_path, tokenizer):
    data = token_data(_cfg(txt_dir, tmp_path), tokenizer, batch_size=8, progress=False)
    whole = token_data(_cfg(txt_dir, tmp_path, eval_rows=0), tokenizer, batch_size=8, progress=False)
    assert data.train.dtype == torch.long and data.train.shape[1] == 16 and data.eval.shape == (4, 16)
    assert torch.equal(torch.cat([data.train, data.eval]), whole.train)  # eval = the last rows, not in train
    assert data.info["rows"] == len(data.train) and "last 4 rows" in data.info["eval"]
    lines = (txt_dir / "a.txt").read_text().split("\n")[:20]  # a .txt file's documents are its lines
    ids = [t for line in lines for t in tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]]
    assert data.train[:2].flatten().tolist() == ids[:32]
    capped = token_data(_cfg(txt_dir, tmp_path, max_rows=10), tokenizer, batch_size=8, progress=False)
    assert len(capped.train) == 10 and torch.equal(capped.train, whole.train[:10])


def test_jsonl_with_a_text_column_and_parquet(tmp_path, tokenizer, docs):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)))
    data = token_data(_cfg(jsonl, tmp_path, text_column="body"), tokenizer, batch_size=4, progress=False)
    assert data.train.shape[1] == 16 and len(data.train) > 4
    with pytest.raises(DataError, match=r"no column 'text'.*\['body', 'id'\].*text_column"):
        token_data(_cfg(jsonl, tmp_path), tokenizer, progress=False)
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(parquet))
    from_parquet = token_data(_cfg(parquet, tmp_path, text_column="body"), tokenizer, batch_size=4, progress=False)
    assert torch.equal(from_parquet.train, data.train)


def test_cache_hit_miss_on_change_and_rebuilt_when_damaged(txt_dir, tmp_path, tokenizer):
    counting = Counting(tokenizer)
    first = token_data(_cfg(txt_dir, tmp_path), counting, progress=False)
    assert counting.calls > 0 and not first.info["cache_hit"]
    counting.calls = 0
    second = token_data(_cfg(txt_dir, tmp_path), counting, progress=False)
    assert counting.calls == 0 and second.info["cache_hit"] and second.info["cache"] == first.info["cache"]
    assert torch.equal(second.train, first.train) and torch.equal(second.eval, first.eval)
    stat = (txt_dir / "a.txt").stat()
    os.utime(txt_dir / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, newer
    third = token_data(_cfg(txt_dir, tmp_path), counting, progress=False)
    assert counting.calls > 0 and not third.info["cache_hit"] and third.info["cache"] != first.info["cache"]
    cached = os.path.join(third.info["cache"], "tokens.safetensors")
    with open(cached, "r+b") as f:
        f.truncate(os.path.getsize(cached) - 8)
    with pytest.warns(UserWarning, match="unreadable.*tokenising again"):
        rebuilt = token_data(_cfg(txt_dir, tmp_path), counting, progress=False)
    assert torch.equal(rebuilt.train, first.train) and not rebuilt.info["cache_hit"]
    with open(cached, "r+b") as f:  # same length, one token changed: the folder's manifest of hashes refuses it
        f.seek(-4, os.SEEK_END)
        f.write((12345).to_bytes(4, "little"))
    with pytest.warns(UserWarning, match="unreadable.*does not match the SHA-256"):
        assert torch.equal(token_data(_cfg(txt_dir, tmp_path), counting, progress=False).train, first.train)
    with open(cached, "r+b") as f:  # and without the manifest, the cache's own record does
        f.seek(-4, os.SEEK_END)
        f.write((12345).to_bytes(4, "little"))
    os.remove(os.path.join(third.info["cache"], store.MARKER))
    with pytest.warns(UserWarning, match="does not match its record"):
        assert torch.equal(token_data(_cfg(txt_dir, tmp_path), counting, progress=False).train, first.train)
    assert token_data(_cfg(txt_dir, tmp_path), counting, progress=False).info["cache_hit"]


def test_cache_location(txt_dir, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = token_data(DataConfig(source=str(txt_dir), context_length=16, eval_rows=4), tokenizer, progress=False)
    assert data.info["cache"].startswith(str(tmp_path / "xdg" / "decomp-hooks" / "tokens"))
    off = token_data(DataConfig(source=str(txt_dir), context_length=16, eval_rows=4, cache_dir=""), tokenizer,
                     progress=False)
    assert off.info["cache"] is None and torch.equal(off.train, data.train)


def test_streaming_batches_skip_the_eval_rows(txt_dir, tmp_path, tokenizer):
    whole = token_data(_cfg(txt_dir, tmp_path, eval_rows=0), tokenizer, progress=False).train
    streamed = token_data(_cfg(txt_dir, tmp_path, streaming=True), tokenizer, batch_size=3, progress=False)
    batches = list(streamed.train)
    assert all(b.shape == (3, 16) and b.dtype == torch.long for b in batches)
    assert torch.equal(streamed.eval, whole[:4]) and torch.equal(torch.cat(batches), whole[4: 4 + 3 * len(batches)])
    assert len(batches) == (len(whole) - 4) // 3 and torch.equal(torch.cat(list(streamed.train)), torch.cat(batches))
    capped = token_data(_cfg(txt_dir, tmp_path, streaming=True, max_rows=7), tokenizer, batch_size=3, progress=False)
    assert [b.shape[0] for b in capped.train] == [3, 3] and capped.info["streaming"]


def test_stdlib_corpus_and_a_tokenizer_directory(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    cfg = DataConfig(source="stdlib_docstrings", tokenizer=str(tmp_path / "tok"), context_length=32, eval_rows=2,
                     max_rows=6, cache_dir="")
    data = token_data(cfg, None, batch_size=2, progress=False)
    assert data.train.shape == (6, 32) and data.eval.shape == (2, 32)
    assert "stdlib_docstrings" in data.info["source"]


def test_too_small_a_corpus_names_the_counts(tmp_path, tokenizer):
    (tmp_path / "tiny.txt").write_text("just a few words of text, not many")
    with pytest.raises(DataError, match=r"gives 1 rows of 8 tokens.*4 evaluation rows and one training batch of 2"):
        token_data(DataConfig(source=str(tmp_path / "tiny.txt"), context_length=8, eval_rows=4, cache_dir=""),
                   tokenizer, batch_size=2, progress=False)


@pytest.mark.parametrize("source", ["./no_such_folder", "no_such.jsonl", "data/no/such", "/nowhere/x.txt"])
def test_a_missing_path_is_named_and_never_looked_up(source, tokenizer, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"load_dataset{a}"))
    with pytest.raises(ConfigError, match=f"{source!r}: no such file or directory.*correct the path"):
        token_data(DataConfig(source=source), tokenizer, progress=False)


def test_config_errors(txt_dir, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'no-org/no-data'.*hub cannot be reached.*correct the path.*HF_HUB_OFFLINE"):
        token_data(DataConfig(source="no-org/no-data", cache_dir=""), tokenizer, progress=False)
    with pytest.raises(ConfigError, match="single split.*eval_rows"):
        token_data(_cfg(txt_dir, tmp_path, eval_split="validation"), tokenizer, progress=False)
    with pytest.raises(ConfigError, match="no tokenizer"):
        token_data(_cfg(txt_dir, tmp_path), None, progress=False)
    with pytest.raises(ConfigError, match="data.tokenizer '/no/tok'"):
        token_data(_cfg(txt_dir, tmp_path, tokenizer="/no/tok"), None, progress=False)
    with pytest.raises(ConfigError, match="'stdlib_docstrings'"):
        token_data(DataConfig(), tokenizer, progress=False)


def test_hub_dataset_with_an_eval_split(tmp_path, tokenizer, docs, monkeypatch):
    calls = []

    def load_dataset(path, name=None, split="train", streaming=False):
        calls.append((path, name, split, streaming))
        ds = datasets.Dataset.from_dict({"text": docs[:30] if split == "train" else docs[30:]})
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(source="org/corpus", name="en", eval_split="validation", context_length=16, eval_rows=3,
                     cache_dir=str(tmp_path))
    data = token_data(cfg, tokenizer, batch_size=4, progress=False)
    valid = token_data(DataConfig(source="org/corpus", split="validation", eval_rows=0, context_length=16,
                                  cache_dir=""), tokenizer, progress=False).train
    assert torch.equal(data.eval, valid[:3]) and "first 3 rows of split 'validation'" in data.info["eval"]
    assert calls[:2] == [("org/corpus", "en", "train", False), ("org/corpus", "en", "validation", False)]
    streamed = token_data(DataConfig(**{**cfg.__dict__, "streaming": True}), tokenizer, batch_size=4, progress=False)
    assert torch.equal(streamed.eval, data.eval) and torch.equal(next(iter(streamed.train)), data.train[:4])


NO_NETWORK = """
import socket, sys, time

attempts = []


def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access while loading local files")


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = refuse, refuse, refuse
from transformers import AutoTokenizer

from decomp_hooks.lm.data import DataConfig, token_data

start = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
for streaming in (False, True):
    cfg = DataConfig(source=sys.argv[1], context_length=16, eval_rows=2, cache_dir="", streaming=streaming)
    next(iter(token_data(cfg, tokenizer, batch_size=4, progress=False).train))
print(f"{time.perf_counter() - start:.2f}")
sys.exit(f"network attempts: {attempts}" if attempts else 0)
"""


def test_local_files_load_without_touching_the_network(txt_dir, tmp_path, tokenizer):
    """With HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset, `datasets` would ask the hub to count the load (10.5 s
    where a firewall drops packets); a local corpus makes no connection attempt at all, streamed or not."""
    import subprocess
    import sys

    tokenizer.save_pretrained(tmp_path / "tok")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, str(txt_dir), str(tmp_path / "tok")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 20, done.stdout


def test_offline_mode_is_for_local_files_only(txt_dir, tmp_path, tokenizer, monkeypatch):
    """datasets' offline switch is on while local files load and back as it was after; a hub name loads online."""
    from decomp_hooks.text import datasets_offline, load_text_dataset

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    seen = []
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        seen.append((args[0], datasets.config.HF_HUB_OFFLINE))
        return real(*args, **kwargs) if args[0] == "text" else datasets.Dataset.from_dict({"text": ["a b c"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    load_text_dataset(str(txt_dir))
    load_text_dataset("org/corpus")
    assert seen == [("text", True), ("org/corpus", False)] and datasets.config.HF_HUB_OFFLINE is False
    with pytest.raises(RuntimeError), datasets_offline():
        raise RuntimeError
    assert datasets.config.HF_HUB_OFFLINE is False
