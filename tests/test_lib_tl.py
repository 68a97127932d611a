"""LIB on a TransformerLens model: node layers are hook points, the LayerNorm scale kept as its own direction."""
from __future__ import annotations

import pytest
import torch

import decomp_hooks as dh

tl = pytest.importorskip("transformer_lens")


def test_hook_points_and_isolated_ln_scale():
    torch.manual_seed(0)
    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=8, n_heads=2, d_mlp=32, d_vocab=20,
                                     act_fn="gelu", normalization_type="LN")
    model = tl.HookedTransformer(cfg)
    tokens = torch.randint(0, 20, (32, 8))
    node = ["blocks.0.hook_resid_mid", "blocks.0.ln2.hook_scale"]
    res = dh.local_interaction_basis(model, tokens, layers=[node, "blocks.0.hook_resid_post", "output"],
                                     isolate=["blocks.0.ln2.hook_scale"], rotate_final=True, progress=False)
    name = "+".join(node)
    c = res.C[name]
    assert c.shape[0] == 16 + 1 + 1  # residual, LN scale, constant
    assert len(c[16].nonzero()) == 1  # the scale coordinate feeds exactly one direction ...
    (k,) = c[16].nonzero().flatten().tolist()
    assert c[:16, k].abs().max() < 1e-12  # ... which touches nothing else
    # LayerNorms project out the mean of the residual stream: one direction fewer than d_model is read downstream
    assert res.sizes()["blocks.0.hook_resid_post"] == 1 + 15
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched (a float64 copy ran)
