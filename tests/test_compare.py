"""Components against SAE-Lens SAE/transcoder features: exact matches recovered, streamed correlation equals the
one-shot Pearson correlation, unexplained features found, input- and output-space SAEs, bad input, the command."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from click.testing import CliRunner  # noqa: E402

import decomp_hooks as dh  # noqa: E402
from decomp_hooks import store  # noqa: E402
from decomp_hooks.cli import main  # noqa: E402
from decomp_hooks.dashboard import CompareConfig, DashboardError, compare_with_sae  # noqa: E402
from decomp_hooks.activations import Moments  # noqa: E402
from decomp_hooks.export import export_basis  # noqa: E402

CONFIG = {"ci": {"type": "mlp", "hidden": [4]}, "ci_alive_threshold": 0.0,
          "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3}],
          "output_loss": "kl", "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 10, "eval_every": 1000,
                                         "checkpoint_every": 1000, "eval_pgd_steps": 0}}
SITE = "transformer.h.0.mlp.c_proj"
TOKENS = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(5))
STRICT = CompareConfig(min_cosine=0.99, min_corr=0.99, batch_size=5)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                                                 vocab_size=97)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = dh.decompose(model, TOKENS, targets={SITE: 5, "transformer.h.0.mlp.c_fc": 4}, config=CONFIG,
                           progress=False)
    return model, dec


def test_streamed_correlation_is_pearson():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 3, generator=g), torch.randn(200, 4, generator=g)
    y[:, 0] = 2 * x[:, 1] + 0.1 * y[:, 0]
    m = Moments(3, 4)
    for i in range(0, 200, 30):
        m.update(x[i:i + 30], y[i:i + 30])
    expected = np.corrcoef(x.T.numpy(), y.T.numpy())[:3, 3:]
    assert np.allclose(m.corr().numpy(), expected, atol=1e-5)


def test_the_components_own_transcoder_matches_them_exactly(lm, tmp_path):
    _, dec = lm
    saes = dec.export(tmp_path / "export", sites=SITE)  # ±-split transcoder: features c and C + c are component c
    result = compare_with_sae(dec, SITE, saes[SITE], TOKENS, out=tmp_path / "cmp", config=STRICT, progress=False)
    s = result.summary()
    assert (result.reads, result.space) == ("input", "output") and s["features"] == 2 * s["components"] == 10
    live = result.live_components
    assert live and s["unexplained_components"] == 0
    for c in live:
        best = result.top_features(c)[:2]
        assert {(m["feature"], m["sign"]) for m in best} == {(c, "+"), (5 + c, "-")}
        assert all(m["cosine"] == pytest.approx(1.0, abs=1e-5) for m in best)
    assert set(result.pairs) >= {(c, c) for c in live}  # one-to-one: part c with feature c
    assert all(f in result.unexplained_features() for f in result.live_features if f % 5 not in live)
    files = {p.name for p in (tmp_path / "cmp").iterdir()} - {".decomp-hooks"}
    assert files == {"summary.json", "components.csv", "features.csv", "compare.html"}
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert html.count('<section class="card component"') == len(live) and "<script" not in html
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["matched_pairs"] == len(result.pairs)
    rows = (tmp_path / "cmp" / "components.csv").read_text().splitlines()
    assert len(rows) == 1 + len(live)


def test_an_output_space_sae_with_foreign_features(lm, tmp_path):
    model, dec = lm
    U = dec.cm.component(SITE).U.detach()
    g = torch.Generator().manual_seed(1)
    decoder = torch.cat([U[:2], torch.randn(6, 32, generator=g)])  # two component directions, six foreign ones
    encoder = torch.cat([U[:2], torch.randn(6, 32, generator=g)]).T
    path = export_basis(tmp_path / "sae", encoder, decoder, format="standard", hook_name="blocks.0.hook_mlp_out")
    result = compare_with_sae(dec, SITE, path, TOKENS, config=STRICT, progress=False)
    assert (result.reads, result.space) == ("output", "output") and result.cosine.shape == (10, 16)
    cos, _, part = result.best_for_features()
    for f in (0, 1, 8, 9):  # features f and 8 + f of the ±-split basis carry U_f and −U_f
        if float(result.feat_freq[f]) > 0 and float(result.comp_freq[f % 8]) > 0:
            assert float(cos[f]) == pytest.approx(1.0, abs=1e-5) and int(part[f]) % 5 == f % 8
    foreign = [f for f in result.live_features if f % 8 >= 2]
    assert foreign and set(foreign) <= set(result.unexplained_features())


def test_an_input_space_sae_compares_input_directions(lm, tmp_path):
    _, dec = lm
    V = dec.cm.component(SITE).V.detach()  # [128, 5]
    path = export_basis(tmp_path / "sae", V, V.T, format="standard", hook_name="blocks.0.mlp.hook_post")
    result = compare_with_sae(dec, SITE, path, TOKENS, config=STRICT, progress=False)
    assert (result.reads, result.space) == ("input", "input")
    assert torch.allclose(result.cosine[:5, :5].diagonal(), torch.ones(5), atol=1e-5)
    diag = result.corr[:5, :5].diagonal()  # ReLU(g·a_c) and ReLU(a_c) rise together (the gate g only rescales)
    assert (diag >= -1e-6).all() and (diag > 0.3).any()


def test_bad_input(lm, tmp_path):
    _, dec = lm
    path = export_basis(tmp_path / "sae", torch.randn(7, 3), torch.randn(3, 7), format="standard", hook_name="x")
    with pytest.raises(DashboardError, match="reads"):
        compare_with_sae(dec, SITE, path, TOKENS, progress=False)
    with pytest.raises(DashboardError, match="not decomposed"):
        compare_with_sae(dec, "transformer.h.0.attn.c_attn", path, TOKENS, progress=False)


def test_compare_command(lm, tmp_path):
    model, dec = lm
    model.save_pretrained(tmp_path / "model")
    dec.save(tmp_path / "run" / "decomposition")
    store.write_tensors(tmp_path / "tokens.safetensors", {"tokens": TOKENS})
    saes = dec.export(tmp_path / "export", sites=SITE)
    args = ["compare", str(tmp_path / "run"), str(saes[SITE]), "--model", str(tmp_path / "model"), "--data",
            str(tmp_path / "tokens.safetensors"), "--out", str(tmp_path / "cmp"), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "matched pairs" in result.output and (tmp_path / "cmp" / "compare.html").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "--force" in again.output
    assert "Examples" in CliRunner().invoke(main, ["compare", "--help"]).output
