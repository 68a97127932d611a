"""The same small language model held through nnsight and through TransformerLens decomposes identically: the same
sites (names aside), the same first-step losses under the same seed."""
from __future__ import annotations

import pytest
import torch

import decomp_hooks as dh

pytest.importorskip("transformer_lens")
nnsight = pytest.importorskip("nnsight")

MATRICES = {"self_attn.q_proj": "attn.W_Q", "self_attn.k_proj": "attn.W_K", "self_attn.v_proj": "attn.W_V",
            "self_attn.o_proj": "attn.W_O", "mlp.c_fc": "mlp.W_in", "mlp.down_proj": "mlp.W_out"}
CONFIG = {
    "ci": {"type": "shared_mlp", "hidden": [8]},
    "losses": [{"type": "faithfulness", "coeff": 100.0}, {"type": "stochastic_recon_subset", "coeff": 1.0},
               {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0, "beta": 0.5}],
    "output_loss": "kl",
    "train": {"steps": 1, "batch_size": 4, "faithfulness_warmup_steps": 3, "eval_pgd_steps": 2, "log_every": 1,
              "eval_every": 1},
}


@pytest.fixture(scope="module")
def small_lm():
    from decomp_hooks.toy.lm import SimpleLlamaForCausalLM, SmallLMConfig

    torch.manual_seed(0)
    cfg = SmallLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_ctx=16)
    return SimpleLlamaForCausalLM(cfg.hf_config()).eval()


def test_nnsight_and_transformer_lens_give_the_same_first_step(small_lm):
    from decomp_hooks.toy.lm import to_hooked_transformer

    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    hf_targets = {f"model.layers.*.{m}": c for m, c in zip(MATRICES, (6, 6, 8, 8, 12, 12))}
    tl_targets = {f"blocks.*.{MATRICES[m]}": c for m, c in zip(MATRICES, (6, 6, 8, 8, 12, 12))}
    via_nnsight = dh.decompose(nnsight.NNsight(small_lm), tokens, targets=hf_targets, config=CONFIG, seed=3,
                               progress=False)
    via_tl = dh.decompose(to_hooked_transformer(small_lm), tokens, targets=tl_targets, config=CONFIG, seed=3,
                          progress=False)
    assert len(via_nnsight.site_names) == len(via_tl.site_names) == 12
    first = [next(r for r in dec.metrics if "train/total" in r) for dec in (via_nnsight, via_tl)]
    terms = [k for k in first[0] if k.startswith("train/") and "grad_norm" not in k and "/l0/model" not in k]
    assert "train/stochastic_recon_subset" in terms and "train/importance_minimality" in terms
    for key in terms:
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-4, abs=1e-7), key
    evals = [dec.metrics[-1] for dec in (via_nnsight, via_tl)]
    for key in ("eval/kl_ci_masked", "eval/ce_stoch_masked", "eval/kl_adversarial", "eval/faithfulness"):
        assert evals[1][key] == pytest.approx(evals[0][key], rel=1e-4), key
