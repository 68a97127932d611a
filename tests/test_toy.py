"""Toy targets: TMS and residual MLP models, samplers, short trainings, the registry, and save/load."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from decomp_hooks.toy import load_toy, make_toy, save_toy, toy_names, toy_sampler
from decomp_hooks.toy.resid_mlp import (
    ResidMLP,
    ResidMLPConfig,
    resid_mlp_labels,
    sample_resid_mlp,
    train_resid_mlp,
)
from decomp_hooks.toy.tms import TMS_PRESETS, TMSConfig, TMSModel, sample_tms, tms_ground_truth, train_tms

SMALL_RESID = ResidMLPConfig(n_features=20, d_embed=200, d_mlp=10, n_layers=2, feature_prob=0.05)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread avoids intra-op sync costs that explode on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tms_eval_batch(n_features: int = 5) -> torch.Tensor:
    return sample_tms(50_000, n_features, 0.05, torch.Generator().manual_seed(1234))


def test_tms_forward_shapes_and_relu() -> None:
    model = TMSModel(TMSConfig(n_features=5, n_hidden=2))
    assert model(torch.rand(3, 5)).shape == (3, 5)
    out = model(torch.rand(2, 4, 5))
    assert out.shape == (2, 4, 5)
    assert (out >= 0).all()


def test_tms_decoder_is_tied_to_encoder() -> None:
    model = TMSModel(TMSConfig(n_features=5, n_hidden=2))
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)
    assert model.linear2.weight.data_ptr() == model.linear1.weight.data_ptr()
    assert set(model.state_dict()) == {"linear1.weight", "linear2.bias"}
    with torch.no_grad():
        model.linear1.weight.mul_(2)
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)


def test_tms_bias_init() -> None:
    assert torch.equal(TMSModel(TMSConfig(init_bias_to_zero=True)).linear2.bias, torch.zeros(5))
    bias = TMSModel(TMSConfig(init_bias_to_zero=False)).linear2.bias
    assert bias.abs().max() <= 2**-0.5 and bias.abs().sum() > 0


def test_tms_identity_layer_is_frozen_identity() -> None:
    config = TMSConfig(n_features=5, n_hidden=2, n_identity_layers=1, init_bias_to_zero=True)
    model = train_tms(config, steps=30, batch_size=64, progress=False)
    (layer,) = model.hidden_layers
    assert torch.equal(layer.weight, torch.eye(2))
    assert not layer.weight.requires_grad
    x = torch.rand(8, 5)
    expected = F.relu(x @ model.linear1.weight.T @ model.linear1.weight + model.linear2.bias)
    torch.testing.assert_close(model(x), expected)


def test_sample_tms_distribution_and_rng() -> None:
    x = sample_tms(20_000, 5, 0.05, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 5)
    assert x.min() >= 0 and x.max() <= 1
    assert abs((x > 0).float().mean().item() - 0.05) < 0.005
    assert (x.sum(dim=1) == 0).any()  # all-zero samples are allowed
    torch.manual_seed(7)
    first = sample_tms(16, 5, 0.5)
    torch.manual_seed(7)
    assert torch.equal(first, sample_tms(16, 5, 0.5))  # no generator: the global RNG drives it


def test_train_tms_5_2_learns_all_features() -> None:
    config, _ = TMS_PRESETS["tms_5-2"]
    x = _tms_eval_batch()
    with torch.no_grad():
        untrained = F.mse_loss(TMSModel(config)(x), x).item()
    rng_before = torch.get_rng_state()
    model = train_tms(config, steps=1500, batch_size=1024, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not model.training
    with torch.no_grad():
        trained = F.mse_loss(model(x), x).item()
    zero_output = x.pow(2).mean().item()
    assert trained < 0.2 * untrained
    assert trained < 0.2 * zero_output
    W = tms_ground_truth(model)
    assert W.shape == (2, 5)
    assert (W.norm(dim=0) > 0.5).all()


def test_train_tms_is_seeded() -> None:
    config = TMSConfig(init_bias_to_zero=True)
    a = train_tms(config, steps=20, batch_size=32, seed=3, progress=False)
    b = train_tms(config, steps=20, batch_size=32, seed=3, progress=False)
    c = train_tms(config, steps=20, batch_size=32, seed=4, progress=False)
    assert torch.equal(a.linear1.weight, b.linear1.weight)
    assert not torch.equal(a.linear1.weight, c.linear1.weight)


def test_resid_mlp_embedding_and_forward() -> None:
    model = ResidMLP(ResidMLPConfig(), seed=0)
    assert model.W_E.shape == (100, 1000)
    torch.testing.assert_close(model.W_E.norm(dim=1), torch.ones(100))
    assert "W_E" in dict(model.named_buffers()) and "W_E" not in dict(model.named_parameters())
    assert torch.equal(model.W_E, ResidMLP(ResidMLPConfig(), seed=0).W_E)
    assert not torch.equal(model.W_E, ResidMLP(ResidMLPConfig(), seed=1).W_E)
    names = {name for name, _ in model.named_modules()}
    assert {"layers.0.mlp_in", "layers.0.mlp_out"} <= names
    assert model(torch.rand(3, 100)).shape == (3, 100)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.mlp_out.weight)
    x = torch.rand(3, 100)
    torch.testing.assert_close(model(x), x @ model.W_E @ model.W_E.T)


def test_sample_resid_mlp_and_labels() -> None:
    x = sample_resid_mlp(20_000, 100, 0.01, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1 and x.min() < 0
    assert abs((x != 0).float().mean().item() - 0.01) < 0.002
    torch.testing.assert_close(resid_mlp_labels(torch.tensor([-0.5, 0.0, 0.25])), torch.tensor([-0.5, 0.0, 0.5]))


def test_train_resid_mlp_beats_identity_baseline() -> None:
    x = sample_resid_mlp(20_000, SMALL_RESID.n_features, SMALL_RESID.feature_prob, torch.Generator().manual_seed(1))
    y = resid_mlp_labels(x)
    identity = F.mse_loss(x, y).item()
    model = train_resid_mlp(SMALL_RESID, steps=400, batch_size=512, progress=False)
    with torch.no_grad():
        trained = F.mse_loss(model(x), y).item()
    assert trained < 0.3 * identity


def test_save_load_round_trip(tmp_path) -> None:
    tms = train_tms(TMSConfig(n_identity_layers=1, init_bias_to_zero=True), steps=20, batch_size=64, progress=False)
    resid = ResidMLP(SMALL_RESID, seed=5)
    for name, model in [("tms", tms), ("resid", resid)]:
        path = tmp_path / name
        save_toy(model, path)
        assert sorted(p.name for p in path.iterdir() if p.name != ".decomp-hooks") == ["model.safetensors", "toy.json"]
        loaded = load_toy(path)
        assert type(loaded) is type(model) and loaded.config == model.config
        x = toy_sampler(model)(64)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not load_toy(tmp_path / "tms").hidden_layers[0].weight.requires_grad
    meta = json.loads((tmp_path / "resid" / "toy.json").read_text())
    assert meta["kind"] == "resid_mlp" and meta["config"]["d_embed"] == 200
    save_toy(tms, tmp_path / "named", preset="tms_5-2-id", seed=3)  # the caller's preset and seed are recorded
    named = json.loads((tmp_path / "named" / "toy.json").read_text())
    assert (named["preset"], named["seed"]) == ("tms_5-2-id", 3)
    save_toy(resid, tmp_path / "tms")  # overwriting an existing save replaces it whole
    assert isinstance(load_toy(tmp_path / "tms"), ResidMLP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named", "resid", "tms"]


def test_make_toy_and_registry() -> None:
    assert set(toy_names()) == {
        "tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-apd", "tms_40-10-id", "resid_mlp1", "resid_mlp2", "resid_mlp3"
    }
    model, sampler = make_toy("tms_5-2-id", steps=10, progress=False)
    assert isinstance(model, TMSModel) and len(model.hidden_layers) == 1
    assert sampler(7).shape == (7, 5)


def test_unknown_toy_name() -> None:
    with pytest.raises(ValueError, match="tms_3-1") as error:
        make_toy("tms_3-1")
    assert all(name in str(error.value) for name in toy_names())
