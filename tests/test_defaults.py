"""Calls as users first write them: no config (the recipe for the kind of model), no targets (every block matrix,
C by the documented rule), no data (built-in text for a model that carries a tokenizer)."""
from __future__ import annotations

import pytest
import torch

import decomp_hooks as dh
from decomp_hooks.defaults import default_targets
from decomp_hooks.lm.capacity import default_c

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 512-token BPE trained here: the same code paths as GPT-2's tokenizer at a fiftieth of the logits' cost
    (saved and reloaded, as TransformerLens wants a tokenizer with a `name_or_path`)."""
    from transformers import AutoTokenizer

    from decomp_hooks.text import stdlib_docstrings
    from decomp_hooks.toy.lm import train_tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    train_tokenizer(list(stdlib_docstrings(limit=2000)), vocab_size=512).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def relative_weight_error(dec: dh.Decomposition, site: str) -> float:
    """‖Σ components − W‖ / ‖W‖ (the components without the delta)."""
    comp = dec.components[site]
    target = comp.delta_weight() + comp.V @ comp.U
    return (comp.delta_weight().norm() / target.norm()).item()


@pytest.fixture
def gpt2(bpe):
    from nnsight import TransformersModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=len(bpe))
    return TransformersModel(GPT2LMHeadModel(config), tokenizer=bpe)


@pytest.fixture
def tokens(bpe):
    from decomp_hooks.text import TokenBatches, stdlib_docstrings

    return TokenBatches(stdlib_docstrings(limit=400), bpe, context_length=16, batch_size=4)


def test_bare_call_on_nnsight_gpt2(gpt2, tokens):
    """The issue's call; width 32, so C = 32 can span the matrix (at width 64 the best rank-32 fit of a random
    init leaves 0.54 of its norm)."""
    site = "transformer.h.0.mlp.c_fc"
    dec = dh.decompose(gpt2, tokens, targets={site: 32}, steps=300, progress=False)
    assert dec.config.method == "vpd" and dec.config.output_loss == "kl"  # the language-model recipe
    assert not dec.model.training  # built from a config, the model trains (dropout); the decomposed one does not
    assert relative_weight_error(dec, site) < 0.5
    ci = dec.causal_importance(next(iter(tokens)))[site]
    assert ci.shape == (4, 16, 32)  # per token


def test_bare_call_on_transformer_lens(bpe, tokens):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=64, d_vocab=len(bpe),
                                  d_mlp=128, act_fn="gelu_new", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg, tokenizer=bpe)
    site = "blocks.0.mlp.W_out"
    dec = dh.decompose(model, tokens, targets={site: 32}, steps=300, progress=False)
    assert relative_weight_error(dec, site) < 0.5
    assert dec.causal_importance(next(iter(tokens)))[site].shape == (4, 16, 32)


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=tokenizer.vocab_size,
                                        max_position_embeddings=32))


def test_decompose_with_neither_targets_nor_data(tokenizer, tmp_path, monkeypatch):
    """A tiny HF Llama saved with its tokenizer and loaded from the directory: every block matrix, built-in text."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tiny_llama(tokenizer).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    cfg = dh.default_config(model)
    cfg.train.faithfulness_warmup_steps, cfg.train.eval_pgd_steps, cfg.data.eval_rows = 20, 2, 4
    with pytest.warns(UserWarning, match="built-in corpus"):
        dec = dh.decompose(model, config=cfg, steps=3, progress=False)
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert dec.site_names == [f"model.layers.0.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}" for k in kinds]
    assert {n: dec.components[n].C for n in dec.site_names} == {
        n: default_c(dec.cm.sites[n]) for n in dec.site_names}
    assert dec.components["model.layers.0.mlp.up_proj"].C == 4 * 32
    final = dec.final_metrics()
    assert final["step"] == 3 and "eval/kl_ci_masked" in final and "eval/eval_positions" in final  # held-out evaluation on the built-in text's rows


def test_default_targets_are_the_block_matrices(tokenizer, tms52):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=16, d_head=8, n_heads=2, n_layers=1, n_ctx=8, d_vocab=50, d_mlp=32,
                                  act_fn="gelu", normalization_type="LN")
    assert list(default_targets(HookedTransformer(cfg))) == [
        "blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V", "blocks.0.attn.W_O", "blocks.0.mlp.W_in",
        "blocks.0.mlp.W_out"]
    assert list(default_targets(tiny_llama(tokenizer)))[-1] == "model.layers.0.mlp.down_proj"  # not lm_head
    assert list(default_targets(tms52)) == ["linear1", "linear2"]  # any other model: every linear layer
    assert dh.default_config(tms52).output_loss == "mse"


def test_without_data_a_model_without_tokenizer_is_refused(tms52):
    with pytest.raises(dh.ConfigError, match="carries no tokenizer"):
        dh.decompose(tms52, steps=1, progress=False)
