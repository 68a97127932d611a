"""Sites on plain torch modules and the shared masked forward: all-ones masks + delta reproduce the target."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from decomp_hooks.adapters import adapter_for, resolve
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteMask
from decomp_hooks.config import CIConfig
from decomp_hooks.sites import SiteError, SiteKind


class Mixed(nn.Module):
    """An embedding, a Linear and an HF Conv1D in a row: every site kind of the torch adapter."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.embed = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 12)
        self.proj = Conv1D(6, 12)  # nf = d_out 6, nx = d_in 12
        self.norm = nn.LayerNorm(6)

    def forward(self, ids):
        return self.norm(self.proj(torch.relu(self.fc(self.embed(ids)))))


def build(model, targets, identity=None, ci="mlp"):
    module, sites, cs = resolve(model, targets, identity)
    return ComponentModel(module, sites, cs, CIConfig(type=ci, hidden=[4]))


def ones(cm, inputs):
    return {n: SiteMask(torch.ones(*x.shape[:-1] if x.is_floating_point() else x.shape, cm.component(n).C),
                        torch.ones(x.shape[:-1] if x.is_floating_point() else x.shape)) for n, x in inputs.items()}


def test_all_ones_with_delta_reproduces_target_every_site_kind():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Mixed()
    cm = build(model, {"embed": 7, "fc": 5, "proj": 9}, identity={"fc": 4})
    ids = torch.randint(0, 50, (3, 11))
    target, inputs = cm(ids, cache=True)
    assert set(inputs) == {"embed", "fc", "proj", "fc.pre_identity"}
    out, _ = cm(ids, masks=ones(cm, inputs))
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)
    # without the delta component the output is different: the components alone are untrained
    masks = {n: SiteMask(m.component) for n, m in ones(cm, inputs).items()}
    assert not torch.allclose(cm(ids, masks=masks)[0], target, atol=1e-3)


def test_canonical_weights_and_site_shapes():
    pytest.importorskip("transformers")
    model = Mixed()
    _, sites, _ = resolve(model, {"embed": 2, "fc": 2, "proj": 2}, {"proj": 3})
    by_name = {s.name: s for s in sites}
    assert by_name["fc"].weight().shape == (12, 8) and by_name["fc"].kind is SiteKind.LINEAR
    torch.testing.assert_close(by_name["proj"].weight(), model.proj.weight.T)
    assert (by_name["proj"].d_in, by_name["proj"].d_out) == (12, 6)
    assert by_name["embed"].kind is SiteKind.EMBEDDING and by_name["embed"].weight().shape == (8, 50)
    torch.testing.assert_close(by_name["proj.pre_identity"].weight(), torch.eye(12))
    identity = by_name["proj.pre_identity"]
    assert identity.kind is SiteKind.IDENTITY and identity.kind.inserted and identity.module == "proj"
    assert [by_name[n].module for n in ("embed", "fc", "proj")] == ["embed", "fc", "proj"]


def test_masked_forward_matches_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    cm = build(model, {"0": 5})
    comps = cm.component("0")
    x = torch.randn(7, 6)
    m, md = torch.rand(7, 5), torch.rand(7)
    out = comps(x, SiteMask(m, md))
    delta = model[0].weight - comps.weight()
    expected = ((x @ comps.V) * m) @ comps.U + md[:, None] * (x @ delta.T) + model[0].bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    route = torch.tensor([True, False] * 3 + [True])
    target = model[0](x)
    routed = comps(x, SiteMask(m, md, route), target_out=target)
    torch.testing.assert_close(routed[~route], target[~route])
    torch.testing.assert_close(routed[route], out[route])


def _grads(out, *tensors):
    return torch.autograd.grad(out.pow(2).sum(), tensors, retain_graph=True)


@pytest.mark.parametrize("bias", [True, False])
def test_delta_from_target_output_equals_delta_weight(bias):
    """With the target output at hand the delta term is m_δ·(target − b − xVU): same values and gradients as x ΔWᵀ."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=bias)
    comps = build(nn.Sequential(lin), {"0": 5}).component("0")
    x = torch.randn(2, 7, 6, requires_grad=True)
    target = lin(x)
    for m, md in [(torch.rand(2, 7, 5), torch.rand(2, 7)), (torch.rand(5), torch.tensor(0.3))]:
        by_weight = comps(x, SiteMask(m, md))
        by_target = comps(x, SiteMask(m, md), target_out=target)
        torch.testing.assert_close(by_target, by_weight, rtol=1e-5, atol=1e-6)
        for a, b in zip(_grads(by_target, x, comps.V, comps.U), _grads(by_weight, x, comps.V, comps.U)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # a detached target output cannot carry the gradient to x: the forward falls back to ΔW
    detached = comps(x, SiteMask(m, md), target_out=target.detach())
    torch.testing.assert_close(_grads(detached, x)[0], _grads(comps(x, SiteMask(m, md)), x)[0])


def test_reused_inner_acts_give_the_same_loss_and_gradients(tms52):
    """Masked forwards that reuse the target pass's x V equal those that recompute it, in value and gradient."""
    cm = ComponentModel(*resolve(tms52, {"linear1": 6, "linear2": 6}), CIConfig(), tied=[["linear1", "linear2"]])
    x = torch.rand(32, 5)
    calls: dict[str, int] = {}
    target, inputs = cm(x, cache=True, calls=calls)
    assert calls == {"linear1": 1, "linear2": 1}
    reuse = {n: c.inner for n, c in cm.causal_importances(inputs, keep_inner=True).items()}
    torch.manual_seed(1)
    masks = {n: SiteMask(torch.rand(32, 6), torch.rand(32)) for n in inputs}
    params = cm.component_parameters()
    for group in (masks, {"linear2": masks["linear2"]}):  # all sites, and the second site alone (layerwise)
        fresh, _ = cm(x, masks=group)
        reused, _ = cm(x, masks=group, reuse=reuse)
        torch.testing.assert_close(reused, fresh)
        for a, b in zip(_grads(reused, *params), _grads(fresh, *params)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Twice(nn.Module):
    """One Linear applied twice in a forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_no_reuse_for_a_site_called_twice():
    """A module run twice per forward sees two inputs; its target-pass x V must not stand in for either."""
    from decomp_hooks.config import load_config
    from decomp_hooks.methods.spd.method import SPD

    torch.manual_seed(0)
    cm = build(Twice(), {"lin": 3})
    ctx = SPD(load_config({"targets": {"lin": 3}})).prepare(cm, torch.randn(8, 4))
    assert ctx.reuse == {}
    once = build(nn.Sequential(nn.Linear(4, 4)), {"0": 3})
    assert set(SPD(load_config({"targets": {"0": 3}})).prepare(once, torch.randn(8, 4)).reuse) == {"0"}


def test_tied_components_share_storage(tms52):
    from decomp_hooks.toy.tms import TMSModel

    cm = ComponentModel(*resolve(tms52, {"linear1": 6, "linear2": 6}), CIConfig(), tied=[["linear1", "linear2"]])
    a, b = cm.component("linear1"), cm.component("linear2")
    assert b.tied and b.V.data_ptr() == a.U_param.data_ptr()
    torch.testing.assert_close(b.weight(), a.weight().T)
    assert isinstance(tms52, TMSModel) and len(cm.component_parameters()) == 2


def test_pattern_errors_name_the_candidates():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(SiteError, match=r"'blocks\.\*' matches no module.*Candidates: .*0, 1, 2"):
        resolve(model, {"blocks.*": 3})
    with pytest.raises(SiteError, match=r"'1' is a LayerNorm.*supported: nn.Linear.*Decomposable modules in this model: 0, 2"):
        resolve(model, {"1": 3})
    with pytest.raises(SiteError, match="matched by both"):
        resolve(model, {"*": 3, "0": 2})
    with pytest.raises(SiteError, match="identity insertion before embedding"):
        resolve(nn.Sequential(nn.Embedding(5, 3)), {}, {"0": 2})


def test_globs_select_several_sites_with_their_c():
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3), "c": nn.Linear(3, 2)})
    _, sites, cs = resolve(model, {"[ab]": 4, "c": 7})
    assert cs == {"a": 4, "b": 4, "c": 7}


def test_adapter_for_picks_the_toolkit_and_names_unsupported_objects():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    adapter = adapter_for(model)
    assert type(adapter).__name__ == "TorchAdapter" and adapter.module(model) is model
    _, sites, _ = resolve(model, {"2": 2}, {"2": 3})
    by_name = {s.name: s for s in sites}
    inserted, own = adapter.hook_names(model, by_name["2.pre_identity"]), adapter.hook_names(model, by_name["2"])
    assert (inserted.hf_hook_name, inserted.hf_hook_io["hf_hook_name_out"]) == ("2", "input")
    assert (own.hf_hook_name_out, own.hf_hook_io["hf_hook_name_out"], own.hook_name) == ("2", "output", None)
    assert adapter.unembedding(model) is None and adapter.final_norm(model) == (None, False)
    assert adapter.model_context(model, "tiny") == {"model_name": "tiny", "model_class_name": "Sequential"}
    with pytest.raises(TypeError, match="cannot decompose a builtins.object"):
        adapter_for(object())
