"""TransformerLens adapter: TL-named sites on HookedTransformer and TransformerBridge, fwd_hooks and run_with_cache."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformer_lens")

import decomp_hooks as dh  # noqa: E402
from decomp_hooks.adapters import resolve  # noqa: E402
from decomp_hooks.component_model import ComponentModel  # noqa: E402
from decomp_hooks.components import SiteMask  # noqa: E402
from decomp_hooks.config import CIConfig, DecomposeConfig  # noqa: E402
from decomp_hooks.decomposition import Decomposition  # noqa: E402
from decomp_hooks.sites import SiteError, SiteKind  # noqa: E402

SIZES = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=16, d_vocab=50, d_mlp=64)
ALL_SITES = {"blocks.*.mlp.W_in": 5, "blocks.*.mlp.W_out": 6, "blocks.*.attn.W_[QKVO]": 7, "embed.W_E": 4,
             "unembed.W_U": 3}
BRIDGE_SITES = {"blocks.*.mlp.W_in": 5, "blocks.*.mlp.W_out": 6, "embed.W_E": 4, "unembed.W_U": 3}


def hooked(**overrides):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(HookedTransformerConfig(**{**SIZES, "act_fn": "gelu_new", "normalization_type": "LN",
                                                            "seed": 0, "device": "cpu", **overrides}))


def bridge():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(**SIZES, act_fn="gelu", normalization_type="LN", seed=0)
    return TransformerBridge.boot_native(cfg, device="cpu")


@pytest.fixture(scope="module")
def ht():
    return hooked()


@pytest.fixture
def tokens():
    return torch.randint(0, SIZES["d_vocab"], (3, 9), generator=torch.Generator().manual_seed(0))


def build(model, targets):
    module, sites, cs = resolve(model, targets)
    return ComponentModel(module, sites, cs, CIConfig(type="mlp", hidden=[4]))


def ones(cm, inputs, delta=True):
    masks = {}
    for name, x in inputs.items():
        lead = x.shape[:-1] if x.is_floating_point() else x.shape
        masks[name] = SiteMask(torch.ones(*lead, cm.component(name).C), torch.ones(lead) if delta else None)
    return masks


def assert_reproduces(model, targets, tokens):
    cm = build(model, targets)
    target, inputs = cm(tokens, cache=True)
    assert set(inputs) == set(cm.site_names)
    out, _ = cm(tokens, masks=ones(cm, inputs))
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5 * target.abs().max().item())
    # the untrained components alone (no delta) are far from the target: the hooks really replace the outputs
    assert (cm(tokens, masks=ones(cm, inputs, delta=False))[0] - target).abs().max() > 1e-2
    return cm


def test_hooked_transformer_all_sites_reproduce_with_all_ones_and_delta(ht, tokens):
    cm = assert_reproduces(ht, ALL_SITES, tokens)
    assert len(cm.site_names) == 2 * 6 + 2
    torch.testing.assert_close(cm(tokens)[0], ht(tokens))


@pytest.mark.parametrize("config", [
    {"normalization_type": "RMS", "gated_mlp": True, "act_fn": "silu", "n_key_value_heads": 2,
     "positional_embedding_type": "rotary", "rotary_dim": 8},
    {"normalization_type": None, "parallel_attn_mlp": True, "use_attn_result": True},
], ids=["rms-gated-gqa-rotary", "no-norm-parallel"])
def test_hooked_transformer_variants_reproduce(config, tokens):
    targets = {**ALL_SITES, **({"blocks.*.mlp.W_gate": 3} if config.get("gated_mlp") else {})}
    cm = assert_reproduces(hooked(**config), targets, tokens)
    if config.get("n_key_value_heads"):  # grouped K/V sites are the stored, unexpanded weights
        assert cm.sites["blocks.0.attn.W_K"].d_out == 2 * SIZES["d_head"]


def test_bridge_mlp_embed_unembed_reproduce(tokens):
    b = bridge()
    assert_reproduces(b, BRIDGE_SITES, tokens)
    assert_reproduces(b, {"blocks.*.attn.W_[QKVO]": 7}, tokens)
    b.enable_compatibility_mode(disable_warnings=True)  # folds LayerNorms into the HF weights in place
    assert_reproduces(b, BRIDGE_SITES, tokens)


def test_canonical_weights_and_shapes(ht, tokens):
    module, sites, _ = resolve(ht, ALL_SITES)
    by = {s.name: s for s in sites}
    attn, mlp = ht.blocks[0].attn, ht.blocks[0].mlp
    H, D, E = SIZES["n_heads"], SIZES["d_model"], SIZES["d_head"]
    q = by["blocks.0.attn.W_Q"]
    assert (q.d_in, q.d_out) == (D, H * E)
    torch.testing.assert_close(q.weight()[2 * E + 3], attn.W_Q[2, :, 3])  # row h·d_head + e is head h, column e
    torch.testing.assert_close(q.bias(), attn.b_Q.flatten())
    o = by["blocks.0.attn.W_O"]
    assert (o.d_in, o.d_out) == (H * E, D)
    torch.testing.assert_close(o.weight()[:, 2 * E + 3], attn.W_O[2, 3])
    torch.testing.assert_close(by["blocks.0.mlp.W_in"].weight(), mlp.W_in.T)
    torch.testing.assert_close(by["unembed.W_U"].weight(), ht.unembed.W_U.T)
    e = by["embed.W_E"]
    assert e.kind is SiteKind.EMBEDDING and (e.d_in, e.d_out) == (SIZES["d_vocab"], D) and e.module == "embed.W_E"
    # with U = 0 the delta component alone is the target map x Wᵀ + b: TL's hook_q for W_Q, the attention out for W_O
    cm = ComponentModel(module, sites, {s.name: 3 for s in sites}, CIConfig(type="mlp", hidden=[4]))
    with torch.no_grad():
        for p in cm.component_parameters():
            p.zero_()
    _, inputs = cm(tokens, cache=True)
    _, cache = ht.run_with_cache(tokens)
    for name, hook in [("blocks.0.attn.W_Q", "blocks.0.attn.hook_q"), ("blocks.1.attn.W_V", "blocks.1.attn.hook_v"),
                       ("blocks.0.attn.W_O", "blocks.0.hook_attn_out"), ("blocks.1.mlp.W_in", "blocks.1.mlp.hook_pre"),
                       ("embed.W_E", "hook_embed")]:
        x, comps = inputs[name], cm.component(name)
        lead = x.shape[:-1] if x.is_floating_point() else x.shape
        out = comps(x, SiteMask(torch.zeros(comps.C), torch.ones(lead)))
        torch.testing.assert_close(out, cache[hook].flatten(2), rtol=1e-5, atol=1e-5)


def test_bridge_attention_weights_match_tl_layout():
    b = bridge()
    _, sites, _ = resolve(b, {"blocks.0.attn.W_[QO]": 2, "blocks.0.mlp.W_out": 2})
    tl = dict(b.tl_named_parameters())
    by = {s.name: s for s in sites}
    W_Q = tl["blocks.0.attn.W_Q"]
    torch.testing.assert_close(by["blocks.0.attn.W_Q"].weight(), W_Q.permute(1, 0, 2).reshape(32, 32).T)
    torch.testing.assert_close(by["blocks.0.attn.W_O"].weight(), tl["blocks.0.attn.W_O"].reshape(32, 32).T)
    torch.testing.assert_close(by["blocks.0.mlp.W_out"].weight(), tl["blocks.0.mlp.W_out"].T)


def test_decompose_lowers_stochastic_recon(ht):
    data = torch.randint(0, SIZES["d_vocab"], (64, 16), generator=torch.Generator().manual_seed(1))
    cfg = {"ci": {"type": "mlp", "hidden": [8]}, "output_loss": "kl",
           "losses": [{"type": "stochastic_recon", "coeff": 1.0},
                      {"type": "importance_minimality", "coeff": 1e-4, "pnorm": 2.0}],
           "train": {"steps": 40, "batch_size": 16, "lr": 3e-3, "log_every": 20, "eval_every": 40,
                     "checkpoint_every": 1000, "faithfulness_warmup_steps": 0}}
    dec = dh.decompose(ht, data, targets={"blocks.*.mlp.W_in": 16}, config=cfg, device="cpu", progress=False)
    evals = [r for r in dec.metrics if "eval/stochastic_recon" in r]
    assert [r["step"] for r in evals] == [0, 40]
    assert evals[-1]["eval/stochastic_recon"] < 0.7 * evals[0]["eval/stochastic_recon"]
    assert dec.components["blocks.1.mlp.W_in"].V.shape == (SIZES["d_model"], 16)


@pytest.mark.parametrize("model", ["hooked", "bridge"])
def test_fwd_hooks_match_dec_run_and_run_with_cache(model, tokens):
    m = hooked() if model == "hooked" else bridge()
    targets = {k: v for k, v in ALL_SITES.items() if k != "embed.W_E"} if model == "hooked" else {**ALL_SITES}
    dec = Decomposition(build(m, targets), DecomposeConfig())
    ablate = {"blocks.0.mlp.W_in": [0, 2], "blocks.1.attn.W_Q": [1], "unembed.W_U": [0]}
    keep = {"blocks.0.attn.W_O": [3]}
    expected = dec.run(tokens, masks=dec.site_masks(keep=keep, ablate=ablate))
    got = m.run_with_hooks(tokens, fwd_hooks=dec.fwd_hooks(keep=keep, ablate=ablate))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - m(tokens)).abs().max() > 1e-3
    # all-ones masks with the delta component reproduce the model
    torch.testing.assert_close(m.run_with_hooks(tokens, fwd_hooks=dec.fwd_hooks()), m(tokens), rtol=1e-5, atol=1e-4)
    mask = torch.rand(tokens.shape + (5,), generator=torch.Generator().manual_seed(2))
    given = {"blocks.1.mlp.W_in": mask}
    torch.testing.assert_close(m.run_with_hooks(tokens, fwd_hooks=dec.fwd_hooks(masks=given)),
                               dec.run(tokens, masks=dec.site_masks(masks=given)))
    logits, cache = dec.run_with_cache(tokens)
    torch.testing.assert_close(logits, m(tokens))
    for name in dec.site_names:
        C = dec.cm.component(name).C
        assert cache[f"{name}.hook_component_acts"].shape == (*tokens.shape, C)
        ci = cache[f"{name}.hook_ci"]
        assert ci.shape == (*tokens.shape, C) and ((ci >= 0) & (ci <= 1)).all()


def test_fwd_hooks_errors(ht, tokens):
    dec = Decomposition(build(ht, {"embed.W_E": 3, "blocks.0.mlp.W_in": 4}), DecomposeConfig())
    with pytest.raises(SiteError, match=r"'embed.W_E' cannot be reached with TL fwd_hooks: .*use_hook_tokens=True"):
        dec.fwd_hooks()
    with pytest.raises(SiteError, match=r"ablate\['blocks.9.mlp.W_in'\]: not a decomposed site; the sites are"):
        dec.site_masks(ablate={"blocks.9.mlp.W_in": [0]})
    with pytest.raises(SiteError, match="out of range; it has C=4"):
        dec.site_masks(keep={"blocks.0.mlp.W_in": [4]})
    with pytest.raises(SiteError, match="in both keep and ablate"):
        dec.site_masks(keep={"blocks.0.mlp.W_in": [0]}, ablate={"blocks.0.mlp.W_in": [1]})
    dec = Decomposition(build(hooked(use_hook_tokens=True), {"embed.W_E": 3}), DecomposeConfig())
    assert [name for name, _ in dec.fwd_hooks()] == ["hook_tokens", "hook_embed"]


def test_target_errors_name_candidates_and_reasons(ht):
    with pytest.raises(SiteError, match=r"'blocks\.\*\.mlp\.W_up' matches no decomposable TransformerLens weight. "
                                        r"Candidates: embed.W_E, blocks.0.attn.W_Q, .*unembed.W_U"):
        resolve(ht, {"blocks.*.mlp.W_up": 4})
    with pytest.raises(SiteError, match=r"parameter 'blocks.0.ln1.w' is not a decomposable weight; supported: .*"
                                        r"Decomposable weights in this model: embed.W_E"):
        resolve(ht, {"blocks.0.ln1.w": 4})
    with pytest.raises(SiteError, match="identity insertion is not supported for TransformerLens"):
        resolve(ht, {"blocks.0.mlp.W_in": 4}, {"blocks.0.mlp.W_out": 4})
    split = hooked(use_split_qkv_input=True)
    with pytest.raises(SiteError, match=r"'blocks.0.attn.W_Q' cannot be decomposed: per-head attention inputs"):
        resolve(split, {"blocks.*.attn.W_Q": 4})
    resolve(split, {"blocks.*.attn.W_O": 4})  # W_O does not read the split inputs
    with pytest.raises(SiteError, match=r"parameter 'blocks.0.ln2.w' is not a decomposable weight"):
        resolve(bridge(), {"blocks.0.ln2.w": 4})
