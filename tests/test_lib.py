"""LIB invariances on networks whose answer is known: planted irrelevant directions, linear closed forms, projectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import decomp_hooks as dh
from decomp_hooks.config import ConfigError
from decomp_hooks.lib.jacobians import integration_points
from decomp_hooks.lib.nodes import NodeError


class Duplicate(nn.Module):
    """Appends a copy of the last coordinate: a duplicated neuron."""

    def forward(self, h):
        return torch.cat([h, h[..., -1:]], -1)


class Planted(nn.Module):
    """x [6] → h = x W + b [6] → hidden = [h, h_6] (duplicated neuron) → ReLU(hidden B + c) with vᵀB = 0 → out [4]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Linear(6, 6)
        self.hidden = Duplicate()
        self.read = nn.Linear(7, 8)
        self.out = nn.Linear(8, 4)
        v = torch.randn(6, generator=g)
        v = torch.cat([v, v[-1:]])  # inside the data's span {z: z_6 = z_7}
        self.ignored = v / v.norm()
        with torch.no_grad():
            w = self.read.weight  # [8, 7]: hidden B with B = wᵀ; make vᵀ B = 0
            w -= torch.outer(w @ self.ignored, self.ignored)

    def forward(self, x):
        return self.out(torch.relu(self.read(self.hidden(self.embed(x)))))


def _data(n: int = 512, d: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 0.5


def test_planted_ignored_direction_and_duplicated_neuron():
    torch.manual_seed(0)
    model, x = Planted(), _data()
    kw = dict(layers=["hidden", "output"], truncation_threshold=1e-10, progress=False, batch_size=128)
    lib = dh.local_interaction_basis(model, x, basis="lib", **kw)
    pca = dh.local_interaction_basis(model, x, basis="pca", **kw)
    # 7 coordinates, 6 independent (duplicate), 5 read by the next layer; + the constant direction
    assert pca.sizes()["hidden"] == 1 + 6
    assert lib.sizes()["hidden"] == 1 + 5
    # no kept LIB direction moves the ignored direction: C's columns (non-constant) are orthogonal to it in the
    # dual sense C⁺ᵀ v = 0, and the duplicated pair is read with equal weight
    cp = lib.C_pinv["hidden"][:, :7]
    v = model.ignored.double()
    recon = torch.cat([v, torch.zeros(1, dtype=torch.float64)]) @ lib.C["hidden"]
    assert recon[1:].abs().max() < 1e-8
    assert torch.allclose(cp[:, 5], cp[:, 6], atol=1e-8)


def test_linear_network_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(5, 4, bias=False))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g) + torch.randn(5, generator=g)
    lib = dh.local_interaction_basis(model, x, layers=["0", "output"], progress=False, batch_size=100)
    c = lib.C["0"]
    # closed form, independently in numpy: whitened centred PCA, then the SVD of R⁺_rest A
    xs = x.double().numpy()
    cov = np.cov(xs.T, bias=True)
    d, u = np.linalg.eigh(cov)
    r_pinv = np.sqrt(d)[:, None] * u.T  # rows: whitened coordinates (centring acts on the constant only)
    a = model[1].weight.detach().double().numpy().T
    vecs, sing, _ = np.linalg.svd(r_pinv @ a, full_matrices=False)
    expected = (u / np.sqrt(d)) @ vecs * sing  # R V S on the non-constant coordinates
    got = c[:5, 1:].numpy()
    assert got.shape == (5, 4)  # rank-4 Jacobian: the fifth direction is dropped
    signs = np.sign((got * expected).sum(0))
    np.testing.assert_allclose(got * signs, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(lib.eigenvalues["0"][1:].numpy(), sing**2, rtol=1e-8)
    # centring: features have mean 0 (except the constant) and second moment Λ
    feats = lib.features("0", x.double())
    np.testing.assert_allclose(feats[:, 0].numpy(), 1.0)
    np.testing.assert_allclose(feats[:, 1:].mean(0).numpy(), 0, atol=1e-9)
    np.testing.assert_allclose((feats[:, 1:] ** 2).mean(0).numpy(), sing**2, rtol=1e-8)
    # squared edges of a linear map: (K_ji y_j)² averaged, K the map in LIB coordinates
    k = (lib.C_pinv["0"][:, :5] @ torch.from_numpy(a)).numpy()  # [k_in, 4]
    expected_edges = (k.T[:, :, None] ** 2 * (feats.numpy().T ** 2)[None]).mean(-1)
    np.testing.assert_allclose(lib.edges[0][1:].numpy(), expected_edges, rtol=1e-8, atol=1e-12)
    assert lib.edges[0][0].abs().max() == 0  # the constant output node has no inputs


@pytest.mark.parametrize("basis", ["lib", "pca"])
def test_c_cpinv_is_a_projector(basis):
    torch.manual_seed(0)
    model, x = Planted(), _data(256)
    res = dh.local_interaction_basis(model, x, layers=["embed", "read", "output"], basis=basis, progress=False,
                                     truncation_threshold=1e-10)
    for layer in ("embed", "read"):
        c, cp = res.C[layer], res.C_pinv[layer]
        eye = torch.eye(c.shape[1], dtype=torch.float64)
        assert torch.allclose(cp @ c, eye, atol=1e-8)
        p = c @ cp
        assert torch.allclose(p @ p, p, atol=1e-8)
        assert torch.allclose(res.C[layer][:-1, 0], torch.zeros(c.shape[0] - 1, dtype=torch.float64))  # constant first


def test_integration_rules():
    a, w = integration_points("gauss-legendre", 3)
    assert np.isclose(sum(w), 1) and np.isclose(sum(wi * ai**7 for ai, wi in zip(a, w)), 1 / 8)
    a, w = integration_points("trapezoidal", 4)
    assert np.isclose(sum(w), 1) and len(a) == 5 and 0 < a[0] < 1e-3
    assert integration_points("trapezoidal", 0) == ([0.5], [1.0])
    with pytest.raises(ValueError, match="n_intervals=0"):
        integration_points("gradient", 2)


def test_bad_inputs_name_the_fix():
    model, x = Planted(), _data(16)
    with pytest.raises(NodeError, match="Did you mean 'hidden'"):
        dh.local_interaction_basis(model, x, layers=["hiden", "output"], progress=False)
    with pytest.raises(ConfigError, match="basis='ica'"):
        dh.local_interaction_basis(model, x, layers=["hidden", "output"], basis="ica", progress=False)
    with pytest.raises(ConfigError, match="n_intervals"):
        dh.local_interaction_basis(model, x, layers=["hidden", "output"], integration="gradient", n_intervals=3,
                                   progress=False)


@pytest.mark.parametrize("rule,n", [("trapezoidal", 4), ("gauss-legendre", 2)])
def test_integration_rules_agree_on_a_linear_network(rule, n):
    """For a linear section ∂f̂/∂f̂ is constant in α and the weights sum to 1, so every rule gives the gradient's answer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(5, 4))
    x = _data(128, 5)
    kw = dict(layers=["0", "output"], progress=False, truncation_threshold=1e-10)
    grad = dh.local_interaction_basis(model, x, **kw)
    ig = dh.local_interaction_basis(model, x, integration=rule, n_intervals=n, **kw)
    assert torch.allclose(ig.eigenvalues["0"], grad.eigenvalues["0"], rtol=1e-9)
    assert torch.allclose(ig.edges[0], grad.edges[0], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_truncation_keeps_exactly_the_directions_that_matter_at_any_scale(scale):
    """A layer of 32 whose downstream reads an 8-dimensional subspace (float32 weights, so the other 24 directions
    are zero only to float32 rounding): LIB keeps those 8 plus the constant, whatever the activations' scale; PCA of
    data spanning 12 of 32 dimensions keeps 12 plus the constant. (An absolute 1e-15 floor kept 32 at scale 1e3.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Identity(), nn.Linear(32, 10))
    q, _ = torch.linalg.qr(torch.randn(32, 8))
    with torch.no_grad():
        model[2].weight.copy_(model[2].weight @ (q @ q.T))
    kw = dict(layers=["1", "output"], progress=False, batch_size=1000)
    lib = dh.local_interaction_basis(model, torch.randn(4000, 32) * scale, **kw)
    assert lib.sizes()["1"] == 1 + 8
    low_rank = torch.randn(4000, 12) @ torch.randn(12, 32) * scale
    pca = dh.local_interaction_basis(nn.Sequential(nn.Identity(), nn.Identity()), low_rank, basis="pca",
                                     layers=["0", "output"], progress=False, batch_size=1000)
    assert pca.sizes()["0"] == 1 + 12
