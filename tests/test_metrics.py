"""Tests for decomp_hooks.metrics and decomp_hooks.plots on hand-built tensors with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decomp_hooks import metrics, plots


@pytest.fixture
def W() -> torch.Tensor:
    """A random [d_out=3, d_in=5] target weight (TMS-like: 5 features into 3 dims)."""
    return torch.randn(3, 5, generator=torch.Generator().manual_seed(0))


def perfect_components(W: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One component per feature column: V = I, U = scale * W.T, so V @ U = scale * W.T."""
    return torch.eye(W.shape[1]), scale * W.T.clone()


def test_ci_l0_counts_components_above_threshold() -> None:
    ci = torch.tensor([[[0.0, 0.5, 1.0], [0.2, 0.05, 0.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    assert metrics.ci_l0(ci, 0.1) == pytest.approx((2 + 1 + 3 + 0) / 4)
    assert metrics.ci_l0(ci, 0.0) == pytest.approx((2 + 2 + 3 + 0) / 4)


def test_mmcs_ml2r_perfect_decomposition(W: torch.Tensor) -> None:
    V, U = perfect_components(W)
    assert (V @ U).T == pytest.approx(W)
    mmcs, ml2r = metrics.mmcs_ml2r(V, U, W)
    assert mmcs == pytest.approx(1.0, abs=1e-6)
    assert ml2r == pytest.approx(1.0, abs=1e-6)


def test_ml2r_measures_shrinkage(W: torch.Tensor) -> None:
    mmcs, ml2r = metrics.mmcs_ml2r(*perfect_components(W, scale=0.5), W)
    assert mmcs == pytest.approx(1.0, abs=1e-6)
    assert ml2r == pytest.approx(0.5, abs=1e-6)


def test_mmcs_ignores_zero_components_and_sign_of_factors(W: torch.Tensor) -> None:
    V, U = perfect_components(W)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    V_big = torch.cat([torch.zeros(5, 4), -V[:, perm]], dim=1)
    U_big = torch.cat([torch.zeros(4, 3), -U[perm]], dim=0)
    mmcs, ml2r = metrics.mmcs_ml2r(V_big, U_big, W)
    assert mmcs == pytest.approx(1.0, abs=1e-6)
    assert ml2r == pytest.approx(1.0, abs=1e-6)


def test_a_dead_component_along_a_feature_does_not_stand_in_for_the_live_one(W: torch.Tensor) -> None:
    """Seen in VPD runs: a component of norm ~1e-3 pointing exactly along feature 0 while the live one is 0.9994
    aligned; the match (and so ML2R) must be the live component."""
    V, U = perfect_components(W)
    tilt = 0.03 * torch.randn(3, generator=torch.Generator().manual_seed(2))
    U[0] = W[:, 0] + tilt  # the live component of feature 0, slightly off
    V_dead, U_dead = torch.zeros(5, 1), 1e-3 * W[:, :1].T.clone()
    V_dead[0, 0] = 1.0
    mmcs, ml2r = metrics.mmcs_ml2r(torch.cat([V, V_dead], 1), torch.cat([U, U_dead]), W)
    live_cos = F.cosine_similarity(U[0], W[:, 0], dim=0).item()
    assert mmcs == pytest.approx((live_cos + 4) / 5, abs=1e-6)
    assert ml2r == pytest.approx(((U[0].norm() / W[:, 0].norm()).item() + 4) / 5, abs=1e-6)


def test_mmcs_penalises_anti_aligned_and_mixed_components(W: torch.Tensor) -> None:
    V, U = perfect_components(W)
    assert metrics.mmcs_ml2r(V, -U, W)[0] == pytest.approx(0.0, abs=1e-6)  # anti-aligned loses to zero ones
    # One component whose contribution to every column j is W[:, 0]: cos and norm ratio against each W[:, j].
    V_one, U_one = torch.ones(5, 1), W[:, :1].T.clone()
    cos = F.cosine_similarity(W[:, :1].expand(-1, 5), W, dim=0)
    mmcs, ml2r = metrics.mmcs_ml2r(V_one, U_one, W)
    assert mmcs == pytest.approx(cos.mean().item(), abs=1e-6)
    assert ml2r == pytest.approx((W[:, 0].norm() / W.norm(dim=0)).mean().item(), abs=1e-6)


def identity_with_dead_columns(n: int, n_dead: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An [n, n + n_dead] CI matrix that is the identity up to a column shuffle, plus the shuffle used."""
    ci = torch.cat([torch.eye(n), torch.zeros(n, n_dead)], dim=1)
    shuffle = torch.randperm(n + n_dead, generator=torch.Generator().manual_seed(seed))
    return ci[:, shuffle], shuffle


def test_permute_to_identity_recovers_shuffle() -> None:
    ci, shuffle = identity_with_dead_columns(6, 4)
    ci[:, (shuffle >= 6).nonzero().squeeze(1)[0]] = 0.05  # one dead column with some mass goes first among dead
    perm = metrics.permute_to_identity(ci)
    assert sorted(perm.tolist()) == list(range(10))
    assert torch.equal(ci[:, perm][:, :6], torch.eye(6))
    assert ci[:, perm[6]].sum() == pytest.approx(0.3)


def test_identity_error_zero_for_shuffled_identity_and_counts_flips() -> None:
    ci, _ = identity_with_dead_columns(8, 5)
    assert metrics.identity_ci_error(ci) == 0
    off = ci.clone()
    off[0, (ci[1] == 1).nonzero().item()] = 0.5  # row 0 also activates row 1's component
    assert metrics.identity_ci_error(off) == 1
    weak = ci.clone()
    weak[2, (ci[2] == 1).nonzero().item()] = 0.85  # the diagonal of row 2 drops below 0.9
    assert metrics.identity_ci_error(weak) == 1
    assert metrics.identity_ci_error(weak, tol=0.2) == 0
    dead = ci.clone()
    dead[3, (ci.sum(0) == 0).nonzero()[0].item()] = 0.3  # an entry in an unmatched column is off-diagonal
    assert metrics.identity_ci_error(dead) == 1


def test_identity_error_when_one_component_serves_two_features() -> None:
    ci = torch.eye(4, 6)
    ci[1] = ci[0]  # features 0 and 1 share component 0, component 1 is dead
    assert metrics.identity_ci_error(ci) == 2  # one diagonal miss + one off-diagonal hit


def test_greedy_matching_on_large_matrix() -> None:
    ci, _ = identity_with_dead_columns(metrics.HUNGARIAN_MAX_DIM, 20)
    perm = metrics.permute_to_identity(ci)
    assert sorted(perm.tolist()) == list(range(metrics.HUNGARIAN_MAX_DIM + 20))
    assert metrics.identity_ci_error(ci) == 0


def test_dense_errors() -> None:
    k, n, C = 3, 5, 9
    ci = torch.zeros(n, C)
    ci[:, torch.tensor([7, 1, 4])] = 0.95
    ci[0, 0] = 0.05
    for error in (metrics.dense_ci_error, metrics.dense_always_on_error):
        assert error(ci, k) == 0
        assert error(ci, k - 1) == n  # one always-on column is now counted as "should be off"
    assert metrics.dense_always_on_error(ci, k + 1) == n  # a dead column is now expected to be on everywhere
    assert metrics.dense_ci_error(ci, k + 1) == 1  # ... and, as the dense error counts, it misses its one strong probe
    ci[2, 4] = 0.5  # an on-column off on one probe: the always-on reading counts it, the dense error does not
    assert metrics.dense_always_on_error(ci, k) == 1 and metrics.dense_ci_error(ci, k) == 0
    ci[:, 4] = 0.5  # never strongly on
    assert metrics.dense_ci_error(ci, k) == 1 and metrics.dense_always_on_error(ci, k) == n


def test_one_hot_probes_norms_and_non_negligible() -> None:
    assert torch.equal(metrics.one_hot_probes(3), 0.75 * torch.eye(3))
    V = torch.tensor([[3.0, 0.0, 0.1], [4.0, 0.0, 0.0]])
    U = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    assert metrics.norms(V, U) == pytest.approx(torch.tensor([10.0, 0.0, 0.1]))
    assert metrics.n_non_negligible(V, U) == 1
    assert metrics.n_non_negligible(V, U, rel=0.01) == 2
    assert metrics.n_non_negligible(torch.zeros(2, 3), torch.zeros(3, 2)) == 0


def test_kl_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    target, pred = torch.randn(2, 4, 7, generator=gen), torch.randn(2, 4, 7, generator=gen)
    assert metrics.kl_logits(target, target).item() == pytest.approx(0.0, abs=1e-6)
    expected = F.kl_div(F.log_softmax(pred, -1), F.log_softmax(target, -1), log_target=True, reduction="sum") / 8
    assert metrics.kl_logits(pred, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics.kl_logits(pred.half(), target.half()).dtype == torch.float32
    masked = target.clone()
    masked[..., 0] = float("-inf")  # p = 0 entries contribute nothing instead of NaN
    assert torch.isfinite(metrics.kl_logits(pred, masked))


def test_mse_and_ce_loss() -> None:
    assert metrics.mse(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4)).item() == pytest.approx(30 / 4)
    gen = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11, generator=gen), torch.randint(0, 11, (2, 5), generator=gen)
    log_probs = F.log_softmax(logits, -1)
    expected = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
    assert metrics.ce_loss(logits, tokens).item() == pytest.approx(expected.item(), rel=1e-6)


def test_plots_write_png_files(tmp_path) -> None:
    ci, shuffle = identity_with_dead_columns(5, 3)
    perm = metrics.permute_to_identity(ci)
    V, U = torch.randn(5, 8), torch.randn(8, 3)
    records = [{"step": s, "loss/total": 1.0 / (s + 1), "lr": 1e-3} for s in range(10)] + [{"step": 10}]
    paths = [
        plots.plot_ci_matrix(ci, tmp_path / "ci.png", "CI", permutation=perm),
        plots.plot_components(V, U, tmp_path / "sub" / "uv.png", "UV", permutation=perm, max_components=4),
        plots.plot_training_curves(records, ["loss/total", "lr", "missing"], tmp_path / "curves.png"),
    ]
    for path in paths:
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ci.png", "curves.png", "uv.png"]


def test_component_plot_of_many_columns_stays_drawable(tmp_path) -> None:
    """APD's C·m rank-one columns (here 3000 of a 600-wide site) draw into a capped figure, not a 150,000-pixel one."""
    from PIL import Image

    path = plots.plot_components(torch.randn(600, 3000), torch.randn(3000, 600), tmp_path / "uv.png", "UV")
    width, height = Image.open(path).size
    assert width <= 2600 and height <= 1800
