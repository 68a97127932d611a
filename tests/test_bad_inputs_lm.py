"""Bad language-model input, table-driven: each `model:` / `data:` value, on each path that reads it (the Python API,
a config, the command line), raises its exact error class with a message naming the bad value, never a traceback
from inside transformers, datasets or pyarrow, and a refused run leaves no directory behind. Also: a sampler that
returns another number of rows than asked."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

import decomp_hooks as dh
from decomp_hooks.cli import main
from decomp_hooks.config import ConfigError
from decomp_hooks.data import DataError, iter_batches
from decomp_hooks.lm.data import DataConfig, token_data
from decomp_hooks.lm.model import ModelConfig, load_model
from decomp_hooks.text import stdlib_docstrings

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

N_POSITIONS = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer) -> Path:
    """A folder of good and broken models and texts for the cases to point into ("{root}" in a case)."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    gpt2 = root / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                         n_positions=N_POSITIONS)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    for name in ("no_tokenizer", "no_weights", "bad_config", "made_up"):
        shutil.copytree(gpt2, root / name)
    for f in (root / "no_tokenizer").iterdir():
        if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            f.unlink()
    (root / "no_weights" / "model.safetensors").unlink()
    (root / "bad_config" / "config.json").write_text("{not json")
    config = json.loads((gpt2 / "config.json").read_text())
    (root / "made_up" / "config.json").write_text(json.dumps({**config, "model_type": "made_up"}))
    (root / "not_gguf.gguf").write_bytes(b"these bytes are not GGUF" * 8)
    (root / "two_gguf").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (root / "two_gguf" / name).write_bytes(b"GGUF")
    (root / "empty_dir").mkdir()
    (root / "weights.bin").write_bytes(b"\0" * 64)
    (root / "cachefile").write_text("not a folder")
    docs = [d.replace("\n", " ") for d in stdlib_docstrings(limit=60)]
    (root / "doc.txt").write_text("\n".join(docs))
    (root / "empty.txt").write_text("")
    (root / "plain.json").write_text("\n".join(docs[:5]))
    (root / "bad.parquet").write_text("not a parquet table")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "body.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    (root / "numbers.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(20)))
    (root / "notes.md").write_text("# notes\n" + docs[0])
    (root / "mixed").mkdir()
    (root / "mixed" / "a.txt").write_text(docs[0])
    (root / "mixed" / "b.jsonl").write_text(json.dumps({"text": docs[1]}))
    return root


def at(root: Path, value):
    """`value` with "{root}" in its strings replaced by the fixture folder."""
    if isinstance(value, str):
        return value.replace("{root}", str(root))
    if isinstance(value, dict):
        return {k: at(root, v) for k, v in value.items()}
    if isinstance(value, list):
        return [at(root, v) for v in value]
    return value


@pytest.fixture(autouse=True)
def _offline_in_a_scratch_folder(tmp_path, monkeypatch):
    """Relative paths resolve in an empty folder; the hub is offline and any hub call fails the test."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, lambda *a, **k: pytest.fail(f"hub lookup {a}"))


# (id, ModelConfig fields, error class, regex the message must match)
MODEL_CASES = [
    ("directory missing", dict(source="{root}/no_such_model"), ConfigError,
     r"model.source '.*/no_such_model': no such file or directory .*correct the path"),
    ("relative folder with a slash, missing", dict(source="no_such_model/"), ConfigError,
     r"model.source 'no_such_model/': no such file or directory"),
    ("empty source", dict(source=""), ConfigError, r"model.source='' is empty.*'small_lm', 'smollm2'"),
    ("a .gguf that is not GGUF", dict(source="{root}/not_gguf.gguf"), ConfigError,
     r"model.source '.*/not_gguf\.gguf': its model config cannot be read .*not a GGUF file"),
    ("a file that is not .gguf", dict(source="{root}/weights.bin"), ConfigError,
     r"model.source '.*/weights\.bin' is a file but not a \.gguf"),
    ("directory without config.json", dict(source="{root}/empty_dir"), ConfigError,
     r"model.source '.*/empty_dir' is not a Hugging Face model directory: it has no config.json"),
    ("directory with two .gguf files", dict(source="{root}/two_gguf"), ConfigError,
     r"model.source '.*/two_gguf' holds several \.gguf files \['a\.gguf', 'b\.gguf'\]; name one"),
    ("config.json that is not JSON", dict(source="{root}/bad_config"), ConfigError,
     r"model.source '.*/bad_config': its model config cannot be read .*not a valid JSON"),
    ("unknown model type", dict(source="{root}/made_up"), ConfigError,
     r"model.source '.*/made_up': its model config cannot be read .*model type `made_up`"),
    ("weights missing", dict(source="{root}/no_weights"), ConfigError,
     r"model.source '.*/no_weights': the weights cannot be loaded .*model\.safetensors.*save_pretrained"),
    ("tokenizer missing beside the model", dict(source="{root}/no_tokenizer"), ConfigError,
     r"model.source '.*/no_tokenizer' has no tokenizer files.*tokenizer\.save_pretrained"),
    ("asset name typo", dict(source="small-lm"), ConfigError,
     r"model.source 'small-lm'.*hub is offline.*Did you mean the offline asset 'small_lm'"),
    ("dtype name", dict(source="{root}/gpt2", dtype="fp16"), ConfigError,
     r"model.dtype='fp16' is not supported; use one of \['bfloat16', 'float16', 'float32'\]"),
    ("toolkit name", dict(source="{root}/gpt2", toolkit="tl"), ConfigError, r"model.toolkit='tl' is not supported"),
    ("device name", dict(source="{root}/gpt2", device="gpu"), ConfigError, r"model.device='gpu' is not a torch device"),
    ("seed -1", dict(source="{root}/gpt2", seed=-1), ConfigError, r"model.seed=-1: must be an integer in \[0, 2³²\)"),
]


@pytest.mark.parametrize("case, fields, error, match", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_load_model_refuses(root, case, fields, error, match):
    with pytest.raises(error, match=match):
        load_model(ModelConfig(**at(root, fields)), "cpu", progress=False)


# (id, DataConfig fields, batch size, error class, regex the message must match)
DATA_CASES = [
    ("file missing", dict(source="{root}/no_such.txt"), 4, ConfigError,
     r"data: '.*/no_such\.txt': no such file or directory .*correct the path"),
    ("relative folder with a slash, missing", dict(source="no_texts/"), 4, ConfigError,
     r"data: 'no_texts/': no such file or directory"),
    ("empty source", dict(source=""), 4, ConfigError, r"data.source='', data.files=\[\]: an empty path"),
    ("one of data.files missing", dict(files=["{root}/doc.txt", "{root}/gone.txt"]), 4, ConfigError,
     r"data: '.*/gone\.txt': no such file or directory"),
    ("source and files both set", dict(source="{root}/doc.txt", files=["{root}/doc.txt"]), 4, ConfigError,
     r"data.source='.*/doc\.txt' and data.files=.* are both set; keep one"),
    ("empty text file", dict(source="{root}/empty.txt"), 4, ConfigError,
     r"data: \['.*/empty\.txt'\] hold no non-empty .*files"),
    ("unsupported suffix", dict(source="{root}/notes.md"), 4, ConfigError,
     r"data: \['.*/notes\.md'\] hold no non-empty \.csv/\.json/\.jsonl/\.parquet/\.txt files"),
    ("plain text in a .json file", dict(source="{root}/plain.json"), 4, DataError,
     r"\['.*/plain\.json'\] \(read as json\) cannot be read: ArrowInvalid: JSON parse error.*suffix says"),
    ("plain text in a .json file, streamed", dict(source="{root}/plain.json", streaming=True), 4, DataError,
     r"\(.*/plain\.json\) cannot be read: ArrowInvalid: JSON parse error"),
    ("a .parquet that is not parquet", dict(source="{root}/bad.parquet"), 4, DataError,
     r"\['.*/bad\.parquet'\] \(read as parquet\) cannot be read: ArrowInvalid"),
    ("binary bytes in a .txt file", dict(source="{root}/binary.txt"), 4, DataError,
     r"\['.*/binary\.txt'\] \(read as text\) cannot be read: UnicodeDecodeError"),
    ("files of two kinds", dict(source="{root}/mixed"), 4, DataError,
     r"expected files of one kind .*found \['json', 'text'\]"),
    ("text column missing in JSON lines", dict(source="{root}/body.jsonl"), 4, DataError,
     r"\(.*/body\.jsonl\) has no column 'text'; its columns are \['body'\]; set text_column"),
    ("numbers in the text column", dict(source="{root}/numbers.jsonl"), 4, DataError,
     r"\(.*/numbers\.jsonl\): column 'text' holds 0 \(int\) at row 0, not text"),
    ("context_length 0", dict(source="{root}/doc.txt", context_length=0), 4, ConfigError,
     r"data.context_length=0: must be ≥ 1"),
    ("eval_rows -1", dict(source="{root}/doc.txt", eval_rows=-1), 4, ConfigError, r"data.eval_rows=-1: must be ≥ 0"),
    ("max_rows 0", dict(source="{root}/doc.txt", max_rows=0), 4, ConfigError, r"data.max_rows=0: must be ≥ 1"),
    ("held out more rows than the text has", dict(source="{root}/doc.txt", eval_rows=100_000), 4, DataError,
     r"\(.*/doc\.txt\) gives \d+ rows of 16 tokens: too few for 100000 evaluation rows"),
    ("fewer rows than one batch", dict(source="{root}/doc.txt"), 100_000, DataError,
     r"\(.*/doc\.txt\) gives \d+ rows of 16 tokens: too few for 2 evaluation rows and one training batch of 100000"),
    ("batch size 0", dict(source="{root}/doc.txt"), 0, ConfigError, r"batch_size=0: must be ≥ 1"),
    ("eval split of a local file", dict(source="{root}/doc.txt", eval_split="validation"), 4, ConfigError,
     r"data: 1 local file\(s\) \(.*/doc\.txt\) has a single split; drop data.split / data.eval_split"),
    ("tokenizer directory missing", dict(source="{root}/doc.txt", tokenizer="{root}/no_tok"), 4, ConfigError,
     r"data.tokenizer '.*/no_tok': no such directory"),
    ("tokenizer directory without a tokenizer", dict(source="{root}/doc.txt", tokenizer="{root}/empty_dir"), 4,
     ConfigError, r"data.tokenizer '.*/empty_dir' has no loadable tokenizer"),
    ("cache_dir is a file", dict(source="{root}/doc.txt", cache_dir="{root}/cachefile"), 4, ConfigError,
     r"data.cache_dir '.*/cachefile' is a file, not a directory"),
    ("hub dataset while offline", dict(source="no-org/no-data"), 4, ConfigError,
     r"data.source 'no-org/no-data': no local file or directory of that name exists and the hub cannot be reached"),
]


@pytest.mark.parametrize("case, fields, batch_size, error, match", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_token_data_refuses(root, tokenizer, case, fields, batch_size, error, match):
    fields = {"context_length": 16, "eval_rows": 2, "cache_dir": "", **at(root, fields)}
    with pytest.raises(error, match=match):
        data = token_data(DataConfig(**fields), tokenizer, batch_size, progress=False)
        next(iter(data.train))  # a streamed corpus is read here


BASE_RUN = {
    "model": {"source": "{root}/gpt2"},
    "data": {"source": "{root}/doc.txt", "context_length": 16, "eval_rows": 2, "cache_dir": ""},
    "targets": {"transformer.h.0.mlp.c_fc": 4},
    "losses": [{"type": "stochastic_recon"}, {"type": "importance_minimality", "coeff": 1e-3}],
    "output_loss": "kl",
    "train": {"steps": 2, "batch_size": 4, "eval_pgd_steps": 0, "log_every": 1, "eval_every": 2},
}

# (id, changes to the run's config sections, extra command-line arguments, exit status, regex of the message)
CLI_CASES = [
    ("typo in a data key", {"data": {"context_lenght": 16}}, [], 2,
     r"data: unknown key 'context_lenght'. Did you mean 'context_length'"),
    ("typo in a model key", {"model": {"tool_kit": "nnsight"}}, [], 2, r"model: unknown key 'tool_kit'"),
    ("dtype name", {"model": {"dtype": "fp32"}}, [], 2, r"model.dtype='fp32' is not supported"),
    ("context_length 0", {"data": {"context_length": 0}}, [], 2, r"data.context_length=0: must be ≥ 1"),
    ("context longer than the model's", {"data": {"context_length": 2 * N_POSITIONS}}, [], 1,
     rf"data.context_length={2 * N_POSITIONS} exceeds the model's context {N_POSITIONS}"),
    ("eval_rows 0", {"data": {"eval_rows": 0}}, [], 1, r"data.eval_rows=0: a language-model run is evaluated on"),
    ("no text", {"data": {"source": None}}, [], 1, r"a `model:` section but no text"),
    ("--model directory missing", {}, ["--model", "{root}/no_such_model"], 1,
     r"model.source '.*/no_such_model': no such file or directory"),
    ("--model directory without a tokenizer", {}, ["--model", "{root}/no_tokenizer"], 1,
     r"model.source '.*/no_tokenizer' has no tokenizer files"),
    ("--data file missing", {}, ["--data", "{root}/no_such.txt"], 1, r"data: '.*/no_such\.txt': no such file"),
    ("--data of the wrong format", {}, ["--data", "{root}/plain.json"], 1,
     r"plain\.json'\] \(read as json\) cannot be read"),
    ("--data empty", {}, ["--data", ""], 2, r"data.source='', data.files=\[\]: an empty path"),
    ("rows fewer than the batch", {"train": {"batch_size": 100_000}}, [], 1, r"one training batch of 100000"),
]


@pytest.mark.parametrize("case, changes, args, code, match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(root, tmp_path, case, changes, args, code, match):
    config = {k: {**v, **changes.get(k, {})} if isinstance(v, dict) else v for k, v in BASE_RUN.items()}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(at(root, config)))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["decompose", str(path), *at(root, args), "--out", str(out), "--no-progress"])
    message = " ".join(result.output.split())
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert re.search(match, message), result.output
    assert not out.exists(), "a refused run left a directory behind"


def test_the_same_config_runs(root, tmp_path):
    """The cases' base config is good: each refusal above is the one bad value."""
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(at(root, BASE_RUN)))
    result = CliRunner().invoke(main, ["decompose", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "eval.json").is_file()


def test_the_default_recipe_fits_a_shorter_model_context(root, tmp_path):
    """Without a config there is nothing for the user to edit: the recipe's 128-token rows shrink to the model's 32;
    the run's tools then find the model through its config.
    (A 512-token vocabulary keeps the recipe's held-out evaluation, KL over the vocabulary, to seconds.)"""
    from decomp_hooks.toy.lm import train_tokenizer

    docs = [d.replace("\n", " ") for d in stdlib_docstrings(limit=60)]
    tokenizer = train_tokenizer(docs, vocab_size=512)
    model_dir, out = tmp_path / "model", tmp_path / "run"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=N_POSITIONS,
                                                         vocab_size=len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = CliRunner().invoke(main, ["decompose", "--model", str(model_dir), "--data", str(root / "doc.txt"),
                                       "--steps", "1", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"context_length: {N_POSITIONS}" in (out / "config.yaml").read_text()
    exported = CliRunner().invoke(main, ["export", str(out), str(tmp_path / "sae")])  # no --model: the run's config names it
    assert exported.exit_code == 0 and (tmp_path / "sae" / "export.json").is_file(), exported.output


# (id, the `data:` section of a call without data, error class, regex): dh.decompose(model) reads the config's text
DEFAULT_DATA_CASES = [
    ("data path missing", {"source": "{root}/no_such.txt"}, ConfigError, r"data: '.*/no_such\.txt': no such file"),
    ("text column missing", {"source": "{root}/body.jsonl"}, DataError, r"has no column 'text'.*\['body'\]"),
    ("eval_rows -5", {"source": "{root}/doc.txt", "eval_rows": -5}, ConfigError, r"data.eval_rows=-5"),
]


@pytest.mark.parametrize("case, section, error, match", DEFAULT_DATA_CASES, ids=[c[0] for c in DEFAULT_DATA_CASES])
def test_decompose_without_data_refuses(root, tmp_path, case, section, error, match):
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "gpt2")
    config = {**BASE_RUN, "model": None, "data": {"context_length": 16, "cache_dir": "", **at(root, section)}}
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        dh.decompose(model, config=config, out_dir=out, progress=False)
    assert not out.exists(), "a refused run left a directory behind"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 5))


SAMPLER_CONFIG = {"targets": {"0": 4}, "losses": [{"type": "stochastic_recon"}],
                  "train": {"steps": 2, "batch_size": 8, "eval_every": 2, "eval_pgd_steps": 0}}

# (id, sampler, regex): decompose asks for 8 rows a step; the first draw is refused
SAMPLER_CASES = [
    ("fewer rows than asked", lambda n: torch.rand(n - 1, 5), r"the sampler returned 7 rows when asked for 8"),
    ("more rows than asked", lambda n: torch.rand(2 * n, 5), r"the sampler returned 16 rows when asked for 8"),
    ("one fixed batch", lambda n: torch.rand(32, 5), r"the sampler returned 32 rows when asked for 8"),
    ("a dict with fewer rows", lambda n: {"input": torch.rand(1, 5)}, r"returned 1 rows when asked for 8"),
    ("not a tensor", lambda n: [0.5] * n, r"the sampler returned a list for sample\(8\); return a tensor"),
]


@pytest.mark.parametrize("case, sampler, match", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_a_sampler_must_return_the_rows_asked_for(tmp_path, case, sampler, match):
    out = tmp_path / "run"
    with pytest.raises(DataError, match=match):
        dh.decompose(mlp(), sampler, config=SAMPLER_CONFIG, out_dir=out, progress=False)
    assert not out.exists(), "a refused run left a directory behind"


def test_a_finite_pass_over_a_sampler_checks_its_rows():
    assert [len(b) for b in iter_batches(lambda n: torch.rand(n, 5), 4, n_samples=10)] == [4, 4, 2]
    with pytest.raises(DataError, match=r"the sampler returned 4 rows when asked for 2"):
        list(iter_batches(lambda n: torch.rand(4, 5), 4, n_samples=10))
