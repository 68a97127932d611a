"""SPD loss terms against their definitions, and short decompositions that a broken loss would fail."""
from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from torch import nn

import decomp_hooks as dh
from decomp_hooks.adapters import resolve
from decomp_hooks.component_model import CausalImportance, ComponentModel
from decomp_hooks.config import ConfigError, LossConfig, load_config
from decomp_hooks.sites import SiteError
from decomp_hooks.methods.spd.method import SPD
from decomp_hooks.methods.spd.terms.pgd import pgd_recon
from decomp_hooks.methods.spd.terms.importance_minimality import (annealed_beta, annealed_gamma, annealed_p,
                                                                  importance_minimality)
from decomp_hooks.toy import toy_sampler
from decomp_hooks.toy.evaluate import passes, toy_metrics


def spd_setup(model, config):
    cfg = load_config(config)
    cm = ComponentModel(*resolve(model, cfg.targets), cfg.ci, cfg.tied)
    return cm, SPD(cfg)


def test_importance_minimality_formula():
    g = torch.rand(6, 4)
    ci = {"a": CausalImportance(g, g), "b": CausalImportance(g[:, :2], g[:, :2])}
    p, eps, beta, world = 0.7, 1e-12, 0.3, 2
    got = importance_minimality(ci, p, eps, beta, world)
    expected = 0.0
    for x in (g, g[:, :2]):
        mu = (x + eps).pow(p).mean(0)
        expected += (mu + beta * mu * torch.log2(1 + 6 * world * mu)).sum()
    torch.testing.assert_close(got, expected)


def test_importance_minimality_site_weights_scale_their_sites(tms52, spd_config):
    """`site_coeffs` multiplies each matched site's sum (others keep 1); a glob matching no site names the sites."""
    g = torch.rand(6, 4)
    ci = {"a": CausalImportance(g, g), "b": CausalImportance(g[:, :2], g[:, :2])}
    per_site = {n: importance_minimality({n: c}, 2.0, 1e-12, 0.0, 1) for n, c in ci.items()}
    torch.testing.assert_close(importance_minimality(ci, 2.0, 1e-12, 0.0, 1, {"a": 0.1}), 0.1 * per_site["a"] + per_site["b"])

    cm, spd = spd_setup(tms52, spd_config)
    ctx = spd.prepare(cm, toy_sampler(tms52)(64))
    lc = LossConfig(type="importance_minimality", site_coeffs={"linear2": 0.0})
    only_linear1 = importance_minimality({"linear1": ctx.ci["linear1"]}, 2.0, 1e-12, 0.0, 1)
    torch.testing.assert_close(spd.term(lc, ctx, 0.0), only_linear1)
    with pytest.raises(SiteError, match=r"pattern 'hidden\*' matches no site. Candidates: linear1, linear2"):
        spd.term(LossConfig(type="importance_minimality", site_coeffs={"hidden*": 0.1}), ctx, 0.0)



def test_layerwise_recon_site_weights_pick_and_scale_sites(tms52, spd_config):
    """On a `*_layerwise` term `site_coeffs` weights each site's forward in the mean over sites; a site at 0 is not
    run, and a term with every site at 0 is an error that says so."""
    cm, spd = spd_setup(tms52, spd_config)
    ctx = spd.prepare(cm, toy_sampler(tms52)(64))
    alone = {n: spd.recon(ctx, spd.masks(ctx, "ci", {n: None})) for n in ("linear1", "linear2")}
    term = LossConfig(type="ci_masked_recon_layerwise")
    torch.testing.assert_close(spd.term(term, ctx, 0.0), (alone["linear1"] + alone["linear2"]) / 2)
    term.site_coeffs = {"linear1": 0.0}
    torch.testing.assert_close(spd.term(term, ctx, 0.0), alone["linear2"] / 2)
    term.site_coeffs = {"linear1": 0.5}
    torch.testing.assert_close(spd.term(term, ctx, 0.0), (0.5 * alone["linear1"] + alone["linear2"]) / 2)
    term.site_coeffs = {"linear*": 0.0}
    with pytest.raises(ConfigError, match=r"set every site to 0"):
        spd.term(term, ctx, 0.0)

def test_keep_freed_memory_applies_on_linux_cpu_only():
    import platform

    from decomp_hooks.config import TrainConfig
    from decomp_hooks.train import keep_freed_memory

    assert keep_freed_memory(torch.device("cpu"), TrainConfig()) == (platform.system() == "Linux")
    assert not keep_freed_memory(torch.device("cpu"), TrainConfig(keep_freed_memory=False))
    assert not keep_freed_memory(torch.device("meta"), TrainConfig())



def test_cpu_bf16_autocast_only_where_the_cpu_has_bf16_units(monkeypatch):
    """`autocast_bf16_cpu` runs bf16 on CPUs with AMX/AVX512-BF16; elsewhere (emulated bf16, ~12× slower) fp32 with a
    warning that names the setting. CUDA follows `autocast_bf16` alone."""
    from decomp_hooks.config import TrainConfig
    from decomp_hooks.train import runtime

    cpu, asked = torch.device("cpu"), TrainConfig(autocast_bf16_cpu=True)
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: True)
    assert runtime.uses_autocast(cpu, asked) and not runtime.uses_autocast(cpu, TrainConfig())
    assert isinstance(runtime.autocast(cpu, asked), torch.autocast)
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)
    runtime.warn_no_bf16_units.cache_clear()
    with pytest.warns(UserWarning, match="train.autocast_bf16_cpu: false"):
        assert not runtime.uses_autocast(cpu, asked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert not runtime.uses_autocast(cpu, asked)
    assert runtime.uses_autocast(torch.device("cuda"), TrainConfig(autocast_bf16=True))

def test_p_annealing():
    lc = LossConfig(type="importance_minimality", pnorm=2.0, p_anneal_final_p=0.5, p_anneal_start_frac=0.2, p_anneal_end_frac=0.6)
    assert annealed_p(lc, 0.1) == 2.0 and annealed_p(lc, 0.9) == 0.5
    assert math.isclose(annealed_p(lc, 0.4), 1.25)


def test_beta_annealing_sets_the_frequency_weight_of_each_step():
    """β runs from `beta` to `beta_anneal_final` over its window; the term at progress t equals the unannealed term
    at β(t), and the trainer logs β(t)."""
    lc = LossConfig(type="importance_minimality", pnorm=1.0, beta=1.0, beta_anneal_final=0.5,
                    beta_anneal_start_frac=0.2, beta_anneal_end_frac=0.5)
    assert annealed_beta(lc, 0.1) == 1.0 and annealed_beta(lc, 0.9) == 0.5 and math.isclose(annealed_beta(lc, 0.35), 0.75)
    assert annealed_beta(LossConfig(type="importance_minimality", beta=0.3), 0.9) == 0.3
    spd = SPD(load_config({"targets": {"linear1": 4}, "losses": [{"type": "stochastic_recon"}, vars(lc)]}))
    g = torch.rand(6, 4)
    ci = {"s": CausalImportance(lower=g, upper=g)}
    ctx = types.SimpleNamespace(ci=ci)
    got = spd.term(lc, ctx, 0.35)
    assert torch.allclose(got, importance_minimality(ci, 1.0, lc.eps, 0.75, 1))
    assert not torch.allclose(got, importance_minimality(ci, 1.0, lc.eps, 1.0, 1))
    assert spd.step_log(0.35)["importance_beta"] == annealed_beta(lc, 0.35)
    fixed = {"targets": {"linear1": 4}, "losses": [{"type": "importance_minimality", "beta": 0.5}]}
    assert "importance_beta" not in SPD(load_config(fixed)).step_log(0.35)


def test_smooth_l0_counts_important_components_as_its_width_anneals():
    """With `gamma`, ψ(g) = g²/(g² + γ²) replaces (g + ε)^p; γ anneals linearly, is logged instead of p, and as it
    falls a partly important component costs nearly as much as a fully important one."""
    lc = LossConfig(type="importance_minimality", gamma=1.0, gamma_anneal_final=0.01, gamma_anneal_start_frac=0.0,
                    beta=0.5)
    assert annealed_gamma(lc, 0.0) == 1.0 and math.isclose(annealed_gamma(lc, 0.5), 0.505)
    assert annealed_gamma(LossConfig(type="importance_minimality"), 0.5) is None
    g = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.0, 1.0]])
    ci = {"s": CausalImportance(lower=g, upper=g)}
    spd = SPD(load_config({"targets": {"linear1": 3}, "losses": [vars(lc)]}))
    got = spd.term(lc, types.SimpleNamespace(ci=ci), 0.5)
    gamma = annealed_gamma(lc, 0.5)
    mu = (g.square() / (g.square() + gamma**2)).mean(0)
    torch.testing.assert_close(got, (mu + 0.5 * mu * torch.log2(1 + 2 * mu)).sum())
    assert spd.step_log(0.5) == {"importance_gamma": gamma}
    late = importance_minimality(ci, 1.0, 1e-12, 0.0, 1, gamma=0.01)
    assert late.item() == pytest.approx(0.5 + 1.0, rel=1e-3)  # the 0.3 value counts as a whole component
    with pytest.raises(ConfigError, match=r"losses\[0\].gamma_anneal_final needs a starting width"):
        load_config({"targets": {"linear1": 3}, "losses": [{"type": "importance_minimality", "gamma_anneal_final": 0.01}]})


ALL_TERMS = ["faithfulness", "importance_minimality", "stochastic_recon", "stochastic_recon_layerwise",
             "stochastic_recon_subset", "ci_masked_recon", "ci_masked_recon_layerwise", "ci_masked_recon_subset",
             "unmasked_recon", "pgd_recon", "pgd_recon_layerwise", "pgd_recon_subset", "stochastic_hidden_acts_recon"]


def test_every_loss_term_is_finite_and_has_gradients(tms52, spd_config):
    spd_config["losses"] = [{"type": t, "coeff": 1.0} for t in ALL_TERMS]
    spd_config["targets"]["hidden_layers.0"] = 4
    from decomp_hooks.toy import make_toy

    model, _ = make_toy("tms_5-2-id", steps=200, progress=False)
    cm, spd = spd_setup(model, spd_config)
    out = spd.loss(cm, toy_sampler(model)(64), 0.5)
    assert set(out.terms) == set(ALL_TERMS) and all(torch.isfinite(v) for v in out.terms.values())
    out.total.backward()
    assert all(p.grad is not None for p in cm.component_parameters() + cm.ci_parameters())


def test_unmasked_and_delta_terms_vanish_at_exact_weights(tms52, spd_config):
    cm, spd = spd_setup(tms52, spd_config)
    x = toy_sampler(tms52)(128)
    ctx = spd.prepare(cm, x)
    # with the delta component, stochastic masks of all ones are exact whatever U, V are
    ones = {n: None for n in ctx.ci}
    masks = spd.masks(ctx, "unmasked", ones)
    for m in masks.values():
        m.delta = torch.ones(m.component.shape[:-1])
    assert spd.recon(ctx, masks).item() < 1e-12


def test_layerwise_and_subset_routing(tms52, spd_config):
    cm, spd = spd_setup(tms52, spd_config)
    ctx = spd.prepare(cm, toy_sampler(tms52)(500))
    assert spd.site_groups(ctx, "layerwise", None) == [{"linear1": None}, {"linear2": None}]
    (group,) = spd.site_groups(ctx, "subset", LossConfig(type="stochastic_recon_subset"))
    routed = torch.stack([group["linear1"], group["linear2"]], -1)
    assert routed.any(-1).all()  # uniform_k_subset routes at least one site per position
    assert 0.1 < routed.all(-1).float().mean() < 0.9  # and sometimes both


def test_pgd_finds_worse_masks_than_random(tms52, spd_config):
    cm, spd = spd_setup(tms52, spd_config)
    ctx = spd.prepare(cm, toy_sampler(tms52)(512))
    group = {n: None for n in ctx.ci}
    random_loss = spd.recon(ctx, spd.masks(ctx, "stochastic", group)).item()
    lc = LossConfig(type="pgd_recon", n_steps=5, step_size=0.2, mask_scope="unique_per_datapoint")
    assert pgd_recon(spd, ctx, group, lc).item() > random_loss


def test_nan_input_is_refused(tms52, spd_config):
    data = torch.rand(64, 5)
    data[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        dh.decompose(tms52, data, config=spd_config, progress=False)


def short_toy_run(model, config: str):
    """A shipped toy config cut to 1500 steps of batch 1024 (lr 3e-3): the fast versions of the success bars
    (docs/toys.md#fast-versions-in-the-test-suite)."""
    cfg = load_config(config)
    cfg.train.batch_size, cfg.train.lr, cfg.train.eval_every, cfg.train.log_every = 1024, 3e-3, 10_000, 500
    return dh.decompose(model, toy_sampler(model), config=cfg, steps=1500, seed=0, progress=False)


def test_short_tms_5_2_recovers_the_features(tms52, spd_config):
    """The fast bar (docs/toys.md#fast-versions-in-the-test-suite): after a short CPU run, MMCS ≥ 0.99 and identity CI
    error ≤ 1."""
    dec = short_toy_run(tms52, "tms_5-2")
    m = toy_metrics(dec)
    assert m["mmcs"] >= 0.99 and 0.95 <= m["ml2r"] <= 1.03
    assert m["identity_ci_error/linear1"] <= 1 and m["identity_ci_error_0p2/linear2"] <= 1
    assert m["non_negligible/linear1"] <= 6
    # the training log has every loss term, the lr, grad norms and CI-L0 per site
    record = next(r for r in dec.metrics if "train/total" in r)
    for k in ("train/stochastic_recon", "train/importance_minimality", "train/lr", "train/grad_norm/components",
              "train/l0/linear1", "time_per_step_s", "peak_memory_mb"):
        assert k in record
    # CI-L0 near the derived 5 × 0.05 = 0.25 active features per input
    assert 0.1 < dec.metrics[-1]["eval/l0/linear1"] < 0.6


def test_short_tms_5_2_id_finds_two_identity_components():
    """TMS 5-2+ID, short run: the 2x2 identity becomes exactly 2 components, dense CI error (k = 2) 0."""
    from decomp_hooks.toy import make_toy

    model, _ = make_toy("tms_5-2-id", seed=0, progress=False)
    dec = short_toy_run(model, "tms_5-2-id")
    m = toy_metrics(dec)
    assert m["non_negligible/hidden_layers.0"] == 2 and m["dense_ci_error/hidden_layers.0"] == 0, m
    assert m["mmcs"] >= 0.99 and m["non_negligible/linear1"] <= 6, m
    # the verdict scores the dense site with the dense CI-pattern error (docs/toys.md#metrics); the always-on count
    # is reported, not required
    solved = {**m, "mmcs": 1.0, "ml2r": 1.0, "dense_always_on_error/hidden_layers.0": 2,
              **{f"{k}/{s}": v for s in ("linear1", "linear2") for k, v in (("identity_ci_error", 0), ("non_negligible", 5))}}
    assert passes(solved, dec) and not passes({**solved, "dense_ci_error/hidden_layers.0": 1}, dec)


def test_own_model_with_shipped_config():
    """A plain nn.Module (not a project toy) with a shipped YAML: the YAML's target section is ignored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3, bias=False), nn.ReLU(), nn.Linear(3, 6))

    def sample(n):
        return torch.rand(n, 6) * (torch.rand(n, 6) < 0.1)

    dec = dh.decompose(model, sample, targets={"0": 8, "2": 8}, config="tms_5-2", steps=30, progress=False)
    assert dec.components["0"].V.shape == (6, 8) and dec.components["2"].U.shape == (8, 6)
    assert dec.components["0"].weight().shape == model[0].weight.shape
    ci = dec.causal_importance(sample(10))
    assert ci["2"].shape == (10, 8) and ((ci["2"] >= 0) & (ci["2"] <= 1)).all()


def test_repr_and_summary_say_what_was_found(tms52):
    from conftest import SPD_5_2

    from decomp_hooks.toy import toy_sampler

    dec = dh.decompose(tms52, toy_sampler(tms52), config=SPD_5_2, progress=False)
    assert repr(dec) == "Decomposition(method='spd', sites=2, C=40, step=20)"
    lines = dec.summary().splitlines()
    final = dec.final_metrics()
    assert lines[0] == repr(dec) and f"faithfulness {final['eval/faithfulness']:.4g}" in lines[1]
    row = next(line.split() for line in lines if line.strip().startswith("linear1"))
    assert row[1:3] == ["20", str(final["eval/live/linear1"])]


def test_a_loaded_run_knows_its_directory_and_metrics(tms52, tmp_path):
    from conftest import SPD_5_2

    from decomp_hooks.toy import toy_sampler

    dec = dh.decompose(tms52, toy_sampler(tms52), config=SPD_5_2, out_dir=tmp_path / "run", progress=False)
    assert repr(dec) == f"Decomposition(method='spd', sites=2, C=40, step=20, run_dir='{tmp_path / 'run'}')"
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "eval/faith')  # a torn last line, as a killed writer leaves
    again = dh.load(tmp_path / "run" / "decomposition", model=tms52)
    assert again.run_dir == tmp_path / "run" and again.final_metrics() == dec.final_metrics()
    assert again.summary().splitlines()[1:] == dec.summary().splitlines()[1:]
