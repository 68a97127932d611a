"""Editing one component: scaling its write vector to zero is the masked forward with it ablated, in a torch copy,
through TransformerLens hooks and inside an nnsight trace; a rewritten vector gives W′ = W + v (u′ − u)ᵀ exactly."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import decomp_hooks as dh
from decomp_hooks.adapters import resolve
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.decomposition import Decomposition
from decomp_hooks.sites import SiteError
from decomp_hooks.tied import TiedLinear

TIGHT = dict(rtol=1e-5, atol=1e-5)


class Net(nn.Module):
    """Token embedding, a linear layer and a tied decoder back to the embedding width."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 8)
        self.out = TiedLinear(self.fc)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.embed(tokens))))


def decomposition(model, targets, identity=None) -> Decomposition:
    """Untrained components: random factors, the delta component holding the rest, so ablations change outputs."""
    torch.manual_seed(0)
    module, sites, cs = resolve(model, targets, identity)
    return Decomposition(ComponentModel(module, sites, cs, dh.CIConfig(type="mlp", hidden=[4])), dh.DecomposeConfig())


def ablated(dec, site, c, batch):
    return dec.run(batch, dec.site_masks(ablate={site: [c]}))


@pytest.fixture(scope="module")
def net_dec():
    return decomposition(Net(), {"embed": 4, "fc": 5, "out": 3}, {"out": 7})


TOKENS = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("site,c", [("embed", 2), ("fc", 4), ("out", 0), ("out.pre_identity", 6)])
def test_zero_write_in_a_torch_copy_is_the_ablation(net_dec, site, c):
    before = {k: v.clone() for k, v in net_dec.model.state_dict().items()}
    edited = net_dec.edit(site, c, write=0.0).model()
    expected = ablated(net_dec, site, c, TOKENS)
    torch.testing.assert_close(edited(TOKENS), expected, **TIGHT)
    assert (expected - net_dec.model(TOKENS)).abs().max() > 1e-3  # the ablation does change the output
    for k, v in net_dec.model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    assert isinstance(net_dec.model.out, TiedLinear) and net_dec.model.out.source[0] is net_dec.model.fc


@pytest.mark.parametrize("site,c", [("embed", 1), ("fc", 3), ("out", 2)])
def test_rewritten_write_vector_gives_the_rank_one_weight_exactly(net_dec, site, c):
    comps = net_dec.cm.component(site)
    u_new = torch.randn(comps.d_out, generator=torch.Generator().manual_seed(c))
    edit = net_dec.edit(site, c, write=u_new)
    edited = edit.model()
    W = net_dec.cm.sites[site].weight()  # canonical [d_out, d_in]
    v, u = comps.V[:, c].detach(), comps.U[c].detach()
    expected = (W.T + torch.outer(v, u_new - u)).T  # W' = W + v (u' − u)ᵀ in forward orientation
    (fresh,), _ = resolve(edited, {net_dec.cm.sites[site].module: 1})[1:]
    assert torch.equal(fresh.weight(), expected)
    assert torch.equal(edit.weight_delta(), torch.outer(u_new - u, v))
    # the tie is cut in the copy only: editing fc leaves the tied decoder's weight as it was, and vice versa
    other = "out" if site == "fc" else "fc"
    if site != "embed":
        assert torch.equal(resolve(edited, {other: 1})[1][0].weight(), net_dec.cm.sites[other].weight())


def test_read_edit_and_scaling(net_dec):
    comps = net_dec.cm.component("fc")
    v_new = torch.randn(comps.d_in, generator=torch.Generator().manual_seed(3))
    edit = net_dec.edit("fc", 1, read=v_new, write=2.0)
    u, v = comps.U[1].detach(), comps.V[:, 1].detach()
    torch.testing.assert_close(edit.weight_delta(), torch.outer(2 * u, v_new) - torch.outer(u, v))
    # doubling u_c adds one more copy of the component: the masked forward with mask 2 on it
    twice = net_dec.edit("fc", 1, write=2.0).model()
    torch.testing.assert_close(twice(TOKENS), net_dec.run(TOKENS, net_dec.site_masks(scale={"fc": {1: 2.0}})), **TIGHT)


def test_bad_edits_are_refused_naming_the_value(net_dec):
    with pytest.raises(SiteError, match=r"site 'fc2' is not a decomposed site; the sites are \['embed', 'fc'"):
        net_dec.edit("fc2", 0, write=0.0)
    for bad in (5, -1, True, 1.5, "2"):
        with pytest.raises(SiteError, match=rf"component {bad!r} is out of range for site 'fc': it has C=5"):
            net_dec.edit("fc", bad, write=0.0)
    with pytest.raises(ValueError, match="nothing to edit"):
        net_dec.edit("fc", 0)
    with pytest.raises(ValueError, match=r"write has shape \[6\]; site 'fc' needs \[8\] \(the site's d_out\)"):
        net_dec.edit("fc", 0, write=torch.zeros(6))
    with pytest.raises(ValueError, match=r"read has dtype torch.int64; pass a floating-point tensor"):
        net_dec.edit("fc", 0, read=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"write holds 1 NaN or Inf value\(s\)"):
        net_dec.edit("fc", 0, write=torch.tensor([0.0] * 7 + [float("nan")]))
    with pytest.raises(ValueError, match=r"write=inf: a factor must be a finite number"):
        net_dec.edit("fc", 0, write=float("inf"))
    with pytest.raises(ValueError, match=r"write is a list; pass a tensor of shape \[8\]"):
        net_dec.edit("fc", 0, write=[0.0] * 8)


# -- TransformerLens -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tl_dec():
    pytest.importorskip("transformer_lens")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=16, d_vocab=50, d_mlp=64,
                                  act_fn="gelu_new", normalization_type="LN", seed=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    return decomposition(model, {"blocks.0.attn.W_[QKVO]": 5, "blocks.1.mlp.W_*": 6, "unembed.W_U": 4})


TL_TOKENS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("site", ["blocks.0.attn.W_Q", "blocks.0.attn.W_V", "blocks.0.attn.W_O", "blocks.1.mlp.W_in",
                                  "blocks.1.mlp.W_out", "unembed.W_U"])
def test_transformer_lens_zero_write_hooks_and_copy_are_the_ablation(tl_dec, site):
    model, c = tl_dec.model, 3
    before = model(TL_TOKENS)
    expected = ablated(tl_dec, site, c, TL_TOKENS)
    edit = tl_dec.edit(site, c, write=0.0)
    torch.testing.assert_close(model.run_with_hooks(TL_TOKENS, fwd_hooks=edit.fwd_hooks()), expected, **TIGHT)
    edited = edit.model()
    torch.testing.assert_close(edited(TL_TOKENS), expected, **TIGHT)
    assert (expected - model(TL_TOKENS)).abs().max() > 1e-4
    # the copy holds W' in the TL layout: the site read back from the copy is W + (u' − u) vᵀ
    comps = tl_dec.cm.component(site)
    expected_w = tl_dec.cm.sites[site].weight() + torch.outer(-comps.U[c].detach(), comps.V[:, c].detach())
    (fresh,), _ = resolve(edited, {site: 1})[1:]
    torch.testing.assert_close(fresh.weight(), expected_w, rtol=0, atol=1e-7)
    assert torch.equal(model(TL_TOKENS), before)  # the original is untouched


def test_transformer_lens_read_edit_agrees_between_hooks_and_copy(tl_dec):
    site = "blocks.0.attn.W_K"
    v_new = torch.randn(tl_dec.cm.component(site).d_in, generator=torch.Generator().manual_seed(4))
    edit = tl_dec.edit(site, 2, read=v_new, write=-1.5)
    torch.testing.assert_close(tl_dec.model.run_with_hooks(TL_TOKENS, fwd_hooks=edit.fwd_hooks()),
                               edit.model()(TL_TOKENS), **TIGHT)


def test_grouped_query_key_weights_are_written_per_key_value_head(tl_dec):
    from transformer_lens import HookedTransformer

    cfg = tl_dec.model.cfg.to_dict()
    for ungroup in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer({**cfg, "n_key_value_heads": 2, "ungroup_grouped_query_attention": ungroup})
        dec = decomposition(model, {"blocks.0.attn.W_K": 5})
        edit = dec.edit("blocks.0.attn.W_K", 1, write=0.0)
        expected = ablated(dec, "blocks.0.attn.W_K", 1, TL_TOKENS)
        torch.testing.assert_close(model.run_with_hooks(TL_TOKENS, fwd_hooks=edit.fwd_hooks()), expected, **TIGHT)
        if ungroup:
            with pytest.raises(SiteError, match=r"'blocks.0.attn.W_K' is not one parameter of the model .* use the "
                                                r"edit's fwd_hooks instead"):
                edit.model()
        else:
            torch.testing.assert_close(edit.model()(TL_TOKENS), expected, **TIGHT)


# -- nnsight ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_dec():
    nnsight = pytest.importorskip("nnsight")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                              vocab_size=97)).eval()
    model = nnsight.NNsight(hf)
    return model, decomposition(model, {"transformer.h.0.mlp.c_fc": 8, "transformer.h.1.attn.c_proj": 8,
                                        "transformer.wte": 8})


GPT_TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("site", ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj", "transformer.wte"])
def test_nnsight_zero_write_in_a_trace_and_in_a_copy_is_the_ablation(gpt2_dec, site):
    import nnsight

    model, dec = gpt2_dec
    expected = ablated(dec, site, 5, GPT_TOKENS)
    edit = dec.edit(site, 5, write=0.0)
    with model.trace(GPT_TOKENS):
        edit.intervene(model)
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, expected, **TIGHT)
    edited = nnsight.NNsight(edit.model())
    with edited.trace(GPT_TOKENS):
        copy_logits = edited.output.logits.save()
    torch.testing.assert_close(copy_logits, expected, **TIGHT)
    assert (expected - model._module(GPT_TOKENS).logits).abs().max() > 1e-4
    if site == "transformer.wte":  # the copy's tied lm_head keeps the original weight: the tie is cut in the copy
        assert torch.equal(edit.model().lm_head.weight, model._module.lm_head.weight)


def test_nnsight_rewritten_conv1d_write_vector_gives_w_prime_exactly(gpt2_dec):
    _, dec = gpt2_dec
    site = "transformer.h.0.mlp.c_fc"
    comps = dec.cm.component(site)
    u_new = torch.randn(comps.d_out, generator=torch.Generator().manual_seed(6))
    edited = dec.edit(site, 1, write=u_new).model()
    v, u = comps.V[:, 1].detach(), comps.U[1].detach()
    W_fwd = dec.model.transformer.h[0].mlp.c_fc.weight.detach()  # Conv1D holds the forward orientation [d_in, d_out]
    assert torch.equal(edited.transformer.h[0].mlp.c_fc.weight, W_fwd + torch.outer(v, u_new - u))
