"""Language-model runs from a config: `decomp-hooks decompose` with `model:` / `data:` (or --model / --data) on local
weights and text, its held-out evaluation (eval.json, plots, table), under torchrun, and the shipped SmolLM2 configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import decomp_hooks as dh
from decomp_hooks.cli import main
from decomp_hooks.lm.run import finish_lm, run_lm
from decomp_hooks.text import stdlib_docstrings

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "targets": {"transformer.h.*.attn.c_attn": None, "transformer.h.*.attn.c_proj": None,
                "transformer.h.*.mlp.c_fc": None, "transformer.h.*.mlp.c_proj": None},
    "c_scale": 0.25,
    "data": {"context_length": 16, "eval_rows": 8, "cache_dir": ""},
    "ci": {"type": "shared_mlp", "hidden": [8]},
    "losses": [{"type": "stochastic_recon_subset", "coeff": 1.0},
               {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0}],
    "output_loss": "kl",
    "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "faithfulness_warmup_steps": 2, "eval_pgd_steps": 2,
              "eval_pgd_scope": "shared_across_batch", "log_every": 1, "eval_every": 2, "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from decomp_hooks.assets import gpt2_tokenizer

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64))
    folder = tmp_path_factory.mktemp("gpt2")
    model.eval().save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "docs.txt").write_text("\n".join(d.replace("\n", " ") for d in stdlib_docstrings(limit=150)))
    return folder


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_cli_decomposes_a_local_model_and_writes_the_evaluation(gpt2_dir, text_dir, config_file, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["decompose", str(config_file), "--model", str(gpt2_dir), "--data",
                                       str(text_dir), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "adversarial" in result.output and "total" in result.output
    summary = json.loads((out / "eval.json").read_text())
    assert summary["step"] == 3 and summary["eval_positions"] == 8 * 16
    assert set(summary["masks"]) == {"ci_masked", "unmasked", "stoch_masked", "rounded_masked", "random_masked",
                                     "zero_masked", "adversarial"}
    zero_gap = summary["masks"]["zero_masked"]["ce"] - summary["ce_target"]
    unrecovered = summary["masks"]["ci_masked"]["ce_unrecovered"]
    assert (unrecovered is None) == (zero_gap < 0.01)  # a random model's tiny zero-ablation gap is not divided by
    sites = summary["sites"]
    assert len(sites) == 8 and sites["transformer.h.0.attn.c_attn"]["C"] == round(8 / 3 * 32 * 0.25)
    assert summary["total"]["C"] == sum(s["C"] for s in sites.values())
    assert all(0 <= s["alive"] <= s["C"] for s in sites.values())
    for png in ("training_curves.png", "eval_kl.png", "sites.png"):
        assert (out / png).stat().st_size > 1000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/kl_adversarial" in r] == [0, 2, 3]


def test_config_without_text_or_model_is_refused(gpt2_dir, tmp_path):
    cfg = {**TINY, "model": {"source": str(gpt2_dir)}}
    path = tmp_path / "no-data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["decompose", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "data" in result.output and not (tmp_path / "r").exists()
    path.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "data"}))
    result = CliRunner().invoke(main, ["decompose", str(path)])
    assert result.exit_code != 0 and "--model" in result.output


def test_typo_in_the_model_path_names_it(text_dir, config_file, tmp_path):
    result = CliRunner().invoke(main, ["decompose", str(config_file), "--model", "./no-such-model-dir",
                                       "--data", str(text_dir), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "no-such-model-dir" in result.output


def test_torchrun_two_ranks_gloo(gpt2_dir, text_dir, config_file, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "decomp_hooks.cli", "decompose", str(config_file), "--model",
                           str(gpt2_dir), "--data", str(text_dir), "--out", str(out), "--no-progress", "--nproc", "2",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "eval.json").read_text())
    assert summary["provenance"]["world_size"] == 2 and summary["eval_positions"] == 8 * 16


@pytest.mark.parametrize("name", ["smollm2_mlp", "smollm2_all"])
def test_smollm2_configs_run_two_steps_on_a_few_layers(name, tmp_path):
    pytest.importorskip("gguf")
    cfg = dh.load_config(f"lm/{name}")
    cfg.targets = {k.replace("model.layers.*.", "model.layers.[01]."): v for k, v in cfg.targets.items()}
    cfg.c_scale, cfg.ci.d_model, cfg.ci.n_blocks, cfg.ci.n_heads = 0.02, 32, 1, 2
    cfg.data.context_length, cfg.data.eval_rows, cfg.data.max_rows = 16, 2, 64
    cfg.data.cache_dir = str(tmp_path / "tokens")
    t = cfg.train
    t.steps, t.batch_size, t.micro_batch_size, t.faithfulness_warmup_steps, t.eval_pgd_steps = 2, 2, 1, 2, 1
    dec = run_lm(cfg, tmp_path / "run", None, "cpu", 0, False, False)
    table = finish_lm(dec, tmp_path / "run")
    n_sites = 6 if name == "smollm2_mlp" else 14
    assert len(dec.site_names) == n_sites and "zero_masked" in table
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["step"] == 2 and torch.isfinite(torch.tensor(summary["masks"]["ci_masked"]["kl"]))


def test_targets_as_a_list_of_globs_take_c_from_the_table(gpt2_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokens = torch.randint(0, 50257, (4, 8), generator=torch.Generator().manual_seed(0))
    cfg = {k: v for k, v in TINY.items() if k not in ("targets", "data", "c_scale")}
    dec = dh.decompose(model, tokens, targets=["transformer.h.*.mlp.c_fc", "transformer.h.0.attn.c_attn"],
                       config={**cfg, "train": {**cfg["train"], "steps": 1}}, progress=False)
    assert {n: dec.cm.component(n).C for n in dec.site_names} == {
        "transformer.h.0.mlp.c_fc": 128, "transformer.h.1.mlp.c_fc": 128, "transformer.h.0.attn.c_attn": 85}
