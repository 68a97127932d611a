"""LIB results: save/load, SAE-Lens export, graph JSON/PNG, ablation curves, stochastic sources, the CLI, vmap = naive."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import decomp_hooks as dh
from decomp_hooks.lib import build
from decomp_hooks.lib.ablation import Ablator, ablation_curves, edges_for_mass, k_schedule, top_edges
from decomp_hooks.lib.graph import graph_dict, plot_ablation, plot_graph
from decomp_hooks.lib.nodes import NodeLayers
from decomp_hooks.store import MARKER, StoreError
from decomp_hooks.toy.modadd import ModAddConfig, ModAddTransformer

TINY = ModAddConfig(p=11, d_model=16, n_heads=2, d_head=8, d_mlp=32)
LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]


def _tokens(n: int = 48, p: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, p, (n, 2), generator=g)
    return torch.cat([ab, torch.full((n, 1), p)], 1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = ModAddTransformer(TINY).eval()
    res = dh.local_interaction_basis(model, _tokens(), layers=LAYERS, last_position_from="blocks.0.hook_resid_mid",
                                     batch_size=24, progress=False)
    return model, res


def _metric(out, tokens):
    return (out[:, -1].argmax(-1) == (tokens[:, 0] + tokens[:, 1]) % 11).float().mean()


def test_save_load_roundtrip_and_damage(tiny, tmp_path):
    _, res = tiny
    res.save(tmp_path / "lib")
    back = dh.load_lib(tmp_path / "lib")
    assert back.layers == res.layers and back.config == res.config and back.last_only == res.last_only
    for n in res.layers:
        assert torch.equal(back.C[n], res.C[n]) and torch.equal(back.eigenvalues[n], res.eigenvalues[n])
    assert all(torch.equal(a, b) for a, b in zip(back.edges, res.edges))
    with pytest.raises(StoreError, match="already exists"):
        res.save(tmp_path / "lib")
    (tmp_path / "lib" / "lib.safetensors").write_bytes(b"junk")
    with pytest.raises(StoreError, match="lib.safetensors' does not match the SHA-256"):
        dh.load_lib(tmp_path / "lib")
    (tmp_path / "lib" / MARKER).unlink()
    with pytest.raises(StoreError, match="truncated or corrupt"):
        dh.load_lib(tmp_path / "lib")


def test_sae_lens_export_reconstructs_the_projection(tiny, tmp_path):
    from decomp_hooks.export import load_sae

    _, res = tiny
    layer = "blocks.0.hook_resid_mid"
    res.export(tmp_path / "sae", layer)
    sae = load_sae(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == layer and cfg["architecture"] == "standard"
    x = torch.randn(5, TINY.d_model, dtype=torch.float64)
    expected = (torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1) @ res.projector(layer))[:, :-1]
    got = sae.decode(sae.encode(x.float()))
    assert torch.allclose(got.double(), expected, atol=1e-4)


def test_graph_json_and_plots(tiny, tmp_path):
    _, res = tiny
    g = graph_dict(res, top_k=5)
    assert len(g["edges"]) == 5 * len(res.edges)
    first = [e for e in g["edges"] if e["pair"] == g["edges"][0]["pair"]]
    assert first[0]["strength"] == pytest.approx(res.edges[0].max().item())
    assert all(m["edges_90"] <= m["edges_99"] for m in g["mass"].values())
    assert plot_graph(res, tmp_path / "graph.png").stat().st_size > 1000


def test_ablation_endpoints_and_curves(tiny, tmp_path):
    model, res = tiny
    data = _tokens(40, seed=1)
    ab = Ablator(res, model, data, _metric, batch_size=40)
    base = ab.base()
    with torch.no_grad():
        direct = _metric(copy.deepcopy(model).double()(data), data).item()
    assert base == pytest.approx(direct)
    for layer in range(3):  # keeping everything changes nothing; keeping nothing changes the output
        name = res.layers[layer]
        assert ab.node_score(layer, res.C[name].shape[1]) == pytest.approx(base)
        e = res.edges[layer]
        assert ab.edge_score(layer, top_edges(e, e[:, 1:].numel())) == pytest.approx(base)
    curves = ablation_curves(res, model, data, _metric, batch_size=40, progress=False)
    assert set(curves.edges) == {f"{a} -> {b}" for a, b in zip(LAYERS, LAYERS[1:])}
    for pair, k in ((p, curves.required[p]) for p in curves.edges):
        assert dict(curves.edges[pair]).get(k, base) >= base - 0.001
    assert plot_ablation(curves, tmp_path / "ablation.png").is_file()
    assert k_schedule(30)[:10] == list(range(1, 11)) and k_schedule(30)[-1] == 30
    assert edges_for_mass(torch.tensor([[0.0, 9.0, 1.0]]), 0.9) == 1


def test_vmap_jacobians_equal_the_naive_loop(tiny):
    model, res = tiny
    m64 = build.working_model(model, res.config)[0]
    nodes = NodeLayers(m64, LAYERS, "blocks.0.hook_resid_mid")
    data = [_tokens(16, seed=2)]
    nodes.read(data[0])
    c_next = res.C[LAYERS[1]]
    gen = torch.Generator().manual_seed(0)
    fast = build.jacobian_gram(nodes, 0, data, c_next, res.config, gen)
    (x,) = nodes.read(data[0], [0])
    jac = torch.autograd.functional.jacobian(
        lambda z: torch.cat([nodes.run_from(0, data[0], z), torch.ones(16, 1, 1, dtype=z.dtype)], -1) @ c_next, x)
    j = jac.reshape(16, -1, 16, 3, TINY.d_model)  # [b, (t,i), b', s, j]
    j = torch.stack([j[b, :, b] for b in range(16)])  # per-sample blocks [b, (t,i), s, j]
    naive = torch.einsum("bosj,bosk->jk", j, j) / (16 * 3)
    assert torch.allclose(fast[:-1, :-1], naive, rtol=1e-8, atol=1e-12)


def test_stochastic_sources_exact_for_one_output_position(tiny):
    model, res = tiny
    kw = dict(layers=LAYERS, last_position_from="blocks.0.hook_resid_mid", batch_size=24, progress=False)
    sto = dh.local_interaction_basis(model, _tokens(), n_stochastic_sources_basis=3, n_stochastic_sources_edges=2, **kw)
    for n in res.layers:  # every output node layer has one position, where ±1 sources are exact
        assert torch.allclose(sto.eigenvalues[n], res.eigenvalues[n], rtol=1e-6)
    for a, b in zip(sto.edges, res.edges):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)


def test_isolated_layernorm_scale_direction():
    """A tuple node (resid, LN scale): the scale coordinate is kept as its own direction, not mixed into others."""

    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.hook_scale, self.read = nn.Linear(4, 6), nn.Identity(), nn.Linear(6, 3)

        def forward(self, x):
            h = self.embed(x)
            scale = self.hook_scale(h.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
            return self.read(h / scale)

    torch.manual_seed(0)
    res = dh.local_interaction_basis(LN(), torch.randn(256, 4), layers=[["embed", "hook_scale"], "output"],
                                     isolate=["hook_scale"], truncation_threshold=1e-12, progress=False)
    c = res.C["embed+hook_scale"]  # coordinates: 6 of h, 1 scale, 1 constant
    mixed = [k for k in range(1, c.shape[1]) if c[6, k].abs() > 1e-12]
    assert len(mixed) == 1 and c[:6, mixed[0]].abs().max() < 1e-12


def test_cli_lib_on_a_saved_toy(tmp_path):
    from decomp_hooks.cli import main
    from decomp_hooks.toy import save_toy

    torch.manual_seed(0)
    save_toy(ModAddTransformer(ModAddConfig(p=113, d_model=16, n_heads=2, d_head=8, d_mlp=32)), tmp_path / "toy")
    cfg = tmp_path / "lib.yaml"
    cfg.write_text(f"target: {{path: {tmp_path / 'toy'}}}\nablation_samples: 64\n"
                   "lib:\n  layers: [blocks.0.hook_resid_mid, blocks.0.hook_resid_post, output]\n"
                   "  last_position_from: blocks.0.hook_resid_mid\n  n_samples: 64\n  batch_size: 64\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["lib", str(cfg), "--out", str(out), "--no-progress", "--basis", "pca"])
    assert r.exit_code == 0, r.output
    assert {"lib", "graph.json", "graph.png", "ablation.json", "ablation.png"} <= {p.name for p in out.iterdir()}
    assert dh.load_lib(out / "lib").config.basis == "pca" and "edges holding 90 %" in r.output
    r = CliRunner().invoke(main, ["lib", str(cfg), "--out", str(out), "--no-progress"])
    assert r.exit_code != 0 and "--force" in r.output
    cfg.write_text("lib:\n  layers: [a, output]\n  basis: ica\n")
    r = CliRunner().invoke(main, ["lib", str(cfg), "--out", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "basis='ica'" in r.output and not (tmp_path / "o2").exists()
