"""nnsight models (HF GPT-2 with Conv1D, HF Llama with a gated MLP): exact all-ones reconstruction, a short SPD
run with the KL objective, and reading / editing components inside a trace."""
from __future__ import annotations

import pytest
import torch

import decomp_hooks as dh
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteMask
from decomp_hooks.adapters import resolve

nnsight = pytest.importorskip("nnsight")
transformers = pytest.importorskip("transformers")

LM_CONFIG = {
    "ci": {"type": "vector_mlp", "hidden": [8]},
    "losses": [
        {"type": "stochastic_recon", "coeff": 1.0},
        {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0},
    ],
    "output_loss": "kl",
    "ci_alive_threshold": 0.0,
    "train": {"steps": 40, "batch_size": 4, "lr": 3e-3, "log_every": 10, "eval_every": 40, "checkpoint_every": 1000},
}


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=97)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


TOKENS = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("make,targets", [
    (gpt2, {"transformer.h.*.mlp.c_fc": 8, "transformer.h.*.mlp.c_proj": 8, "transformer.h.*.attn.c_attn": 8,
            "transformer.h.*.attn.c_proj": 8, "transformer.wte": 8, "lm_head": 8}),
    (llama, {"model.layers.*.mlp.*_proj": 8, "model.layers.*.self_attn.*_proj": 8, "model.embed_tokens": 8}),
], ids=["gpt2", "llama"])
def test_all_ones_reproduces_logits(make, targets):
    model = nnsight.NNsight(make())
    module, sites, cs = resolve(model, targets)
    cm = ComponentModel(module, sites, cs, dh.CIConfig(type="mlp", hidden=[4]))
    target, inputs = cm(TOKENS, cache=True)
    masks = {n: SiteMask(torch.ones(*TOKENS.shape, cs[n]), torch.ones(TOKENS.shape)) for n in inputs}
    out, _ = cm(TOKENS, masks=masks)
    assert (out - target).norm() / target.norm() < 1e-5


def test_short_spd_run_lowers_kl_and_reports_lm_metrics():
    model = nnsight.NNsight(gpt2())
    data = torch.randint(0, 97, (64, 16), generator=torch.Generator().manual_seed(2))
    dec = dh.decompose(model, data, targets={"transformer.h.0.mlp.c_fc": 32}, config=LM_CONFIG, progress=False)
    evals = [r for r in dec.metrics if "eval/stochastic_recon" in r]
    assert evals[-1]["eval/stochastic_recon"] < evals[0]["eval/stochastic_recon"]
    final = dec.final_metrics()
    for mt in ("ci_masked", "unmasked", "stoch_masked", "random_masked", "rounded_masked", "zero_masked"):
        assert f"eval/kl_{mt}" in final and f"eval/ce_unrecovered_{mt}" in final
    assert final["eval/kl_zero_masked"] > final["eval/kl_unmasked"]


@pytest.fixture(scope="module")
def gpt2_dec():
    model = nnsight.NNsight(gpt2())
    cfg = {**LM_CONFIG, "train": {**LM_CONFIG["train"], "steps": 5}}
    dec = dh.decompose(model, TOKENS, targets={"transformer.h.*.mlp.c_fc": 12}, config=cfg, progress=False)
    return model, dec


def test_intervention_in_trace_equals_manual(gpt2_dec):
    model, dec = gpt2_dec
    edit = {"transformer.h.0.mlp.c_fc": [0, 3, 5]}
    with model.trace(TOKENS):
        readout = dec.intervene(model, ablate=edit, scale={"transformer.h.1.mlp.c_fc": {2: 0.5}})
        logits = model.output.logits.save()
    by_hand = dec.run(TOKENS, masks=dec.site_masks(ablate=edit, scale={"transformer.h.1.mlp.c_fc": {2: 0.5}}))
    torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)
    plain = model._module(TOKENS).logits
    assert not torch.allclose(logits, plain, atol=1e-4)
    ci = dec.causal_importance(TOKENS)
    torch.testing.assert_close(readout["transformer.h.0.mlp.c_fc"]["ci"], ci["transformer.h.0.mlp.c_fc"])
    assert readout["transformer.h.1.mlp.c_fc"]["acts"].shape == (4, 16, 12)


def test_keep_all_components_with_delta_is_the_model(gpt2_dec):
    model, dec = gpt2_dec
    keep = {n: list(range(12)) for n in dec.site_names}
    with model.trace(TOKENS):
        dec.intervene(model, keep=keep)
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, model._module(TOKENS).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"keep\['transformer.h.9.mlp.c_fc'\]: not a decomposed site"):
        dec.site_masks(keep={"transformer.h.9.mlp.c_fc": [0]})


def test_load_reattaches_to_a_fresh_nnsight_model(gpt2_dec, tmp_path):
    model, dec = gpt2_dec
    dec.save(tmp_path / "dec")
    fresh = nnsight.NNsight(gpt2())  # same seed: same weights
    again = dh.load(tmp_path / "dec", model=fresh)
    torch.testing.assert_close(again.causal_importance(TOKENS)["transformer.h.0.mlp.c_fc"],
                               dec.causal_importance(TOKENS)["transformer.h.0.mlp.c_fc"])
    other = gpt2()
    torch.nn.init.normal_(other.transformer.h[0].mlp.c_fc.weight)
    with pytest.raises(dh.FingerprintError):
        dh.load(tmp_path / "dec", model=nnsight.NNsight(other))
