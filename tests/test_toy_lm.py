"""The small Llama-style LM: module layout, Hugging Face round trip, TransformerLens parity, training and the cache."""
from __future__ import annotations

import copy
import json
import math
import sysconfig

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from decomp_hooks.text import stdlib_docstrings
from decomp_hooks.toy import lm
from decomp_hooks.toy.lm import SmallLMConfig, SmallLMTraining

TINY = SmallLMConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_ctx=32)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc",
               "mlp.down_proj")


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    recipe = SmallLMTraining(steps=40, batch_size=8, lr=1e-2, warmup_steps=5, eval_fraction=0.2)
    return lm.train_small_lm(TINY, recipe, progress=False, docs=stdlib_docstrings(limit=80))


def test_every_projection_is_a_bias_free_linear_at_its_llama_path(trained):
    model, _, _ = trained
    names = dict(model.named_modules())
    for i in range(TINY.n_layers):
        for proj in PROJECTIONS:
            module = names[f"model.layers.{i}.{proj}"]
            assert type(module) is nn.Linear and module.bias is None
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert f"model.layers.{i}.{norm}" in names
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(names)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_each_projection_runs_once_on_its_input(trained):
    model, _, _ = trained
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = [module.register_forward_hook(lambda m, args, out, n=name: seen.setdefault(n, []).append(args[0].shape))
               for name, module in model.named_modules() if name.endswith(PROJECTIONS)]
    model(torch.randint(0, TINY.vocab_size, (2, 7)))
    for h in handles:
        h.remove()
    assert len(seen) == 6 * TINY.n_layers and all(len(shapes) == 1 for shapes in seen.values())
    assert seen["model.layers.0.mlp.down_proj"] == [(2, 7, TINY.d_mlp)]
    assert seen["model.layers.1.self_attn.q_proj"] == [(2, 7, TINY.d_model)]


def test_save_and_load_through_the_auto_classes(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, report = trained
    lm.save_small_lm(model, tokenizer, tmp_path / "lm", report)
    loaded, tok = AutoModelForCausalLM.from_pretrained(tmp_path / "lm"), AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert type(loaded) is lm.SimpleLlamaForCausalLM and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = tok("Return the Path of a FILE.", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer("return the path of a file.", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == loaded.config.eos_token_id == 0
    saved = json.loads((tmp_path / "lm" / "training.json").read_text())
    assert saved["heldout_ce"] == pytest.approx(report["heldout_ce"]) and saved["config"]["d_model"] == 32
    again, _ = lm.load_small_lm(tmp_path / "lm")
    assert not again.training and torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_hooked_transformer_matches_logits_and_canonical_weights(trained):
    model, tokenizer = copy.deepcopy(trained[0]), trained[1]
    with torch.no_grad():  # barely trained: move the weights far from their init so a mismatch shows
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    hooked = lm.to_hooked_transformer(model, tokenizer)
    ids = torch.randint(0, TINY.vocab_size, (3, TINY.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hooked(ids) - model(ids).logits).abs().max() < 1e-4
    d = TINY.d_model
    for i, layer in enumerate(model.model.layers):
        attn, block = layer.self_attn, hooked.blocks[i]
        for site, proj in (("W_Q", attn.q_proj), ("W_K", attn.k_proj), ("W_V", attn.v_proj)):
            assert torch.equal(getattr(block.attn, site).permute(1, 0, 2).reshape(d, -1).T, proj.weight)
        assert torch.equal(block.attn.W_O.reshape(-1, d).T, attn.o_proj.weight)
        assert torch.equal(block.mlp.W_in.T, layer.mlp.c_fc.weight)
        assert torch.equal(block.mlp.W_out.T, layer.mlp.down_proj.weight)
    assert hooked.to_tokens("a path", prepend_bos=False).tolist() == [tokenizer("a path")["input_ids"]]


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = lm.SimpleLlamaForCausalLM(TINY.hf_config())
    batch = torch.randint(0, TINY.vocab_size, (4, TINY.n_ctx), generator=torch.Generator().manual_seed(1))
    losses = lm.fit_lm(model, batch, SmallLMTraining(steps=30, batch_size=4, lr=1e-2, warmup_steps=5),
                       progress=False)
    assert losses[-1] < 0.6 * losses[0]


def test_report_beats_the_unigram_entropy_and_the_tokenizer_is_reproducible(trained):
    _, tokenizer, report = trained
    assert report["heldout_ce"] < math.log(TINY.vocab_size) - 1  # 40 steps learn about the unigram statistics
    assert report["tokens"]["heldout"] > 0 and report["seed"] == 0
    train_docs, _ = lm.split_documents(stdlib_docstrings(limit=80), 0.2)
    assert lm.train_tokenizer(train_docs, TINY.vocab_size).backend_tokenizer.to_str() == \
        tokenizer.backend_tokenizer.to_str()
    assert tokenizer.decode(tokenizer("Hello World")["input_ids"]) == "hello world"


def test_right_padding_leaves_the_real_tokens_logits_alone(trained):
    model, _, _ = trained
    ids = torch.randint(1, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        short = model(ids[1:, :5]).logits
        full = model(ids).logits
    assert torch.allclose(padded[1, :5], short[0], atol=1e-5) and torch.allclose(padded[0], full[0], atol=1e-5)
    assert torch.isfinite(padded).all()


def test_generate_is_greedy_decoding(trained):
    model, _, _ = trained
    ids = torch.randint(1, TINY.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    expected = ids
    with torch.no_grad():
        for _ in range(3):
            expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == expected.tolist()


def test_small_lm_dir_trains_once_and_reuses(trained, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lm, "train_small_lm", lambda config, training, progress: calls.append(training) or trained)
    first = lm.small_lm_dir(seed=3, progress=False, root=tmp_path)
    second = lm.small_lm_dir(seed=3, progress=False, root=tmp_path)
    assert first == second and len(calls) == 1 and calls[0].seed == 3 and first.parent == tmp_path
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert lm.small_lm_dir(seed=4, progress=False, root=tmp_path) != first and len(calls) == 2


def test_bad_shapes_name_the_fix():
    with pytest.raises(ValueError, match="hidden_size=30"):
        lm.SimpleLlamaConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=32"):
        lm.SimpleLlamaForCausalLM(TINY.hf_config())(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="eval_fraction=1.5"):
        lm.split_documents(["a"], 1.5)


def test_stdlib_docstrings_can_walk_subpackages(tmp_path, monkeypatch):
    doc = '"""{} docstring that is long enough."""\n'
    for rel in ("top.py", "pkg/mod.py", "test/skip.py", "site-packages/dep/skip.py", "idlelib/skip.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(doc.format(rel))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert [d.split()[0] for d in stdlib_docstrings(min_chars=10)] == ["top.py"]
    assert [d.split()[0] for d in stdlib_docstrings(min_chars=10, subpackages=True)] == ["pkg/mod.py", "top.py"]


def test_cli_lm_help_and_refuses_a_full_directory(tmp_path):
    from decomp_hooks.cli import main

    help_text = CliRunner().invoke(main, ["toy", "lm", "--help"]).output
    assert "decomp-hooks toy lm --out" in help_text and "--steps" in help_text
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = CliRunner().invoke(main, ["toy", "lm", "--out", str(tmp_path / "full")])
    assert result.exit_code != 0 and "--force" in result.output
