"""Component dashboards: streamed statistics equal one-shot ones, pages per site with one section per live component,
logit effects through the final norm, Neuronpedia JSON, the `dashboard` command and the sae-dashboard engine."""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from click.testing import CliRunner  # noqa: E402

import decomp_hooks as dh  # noqa: E402
from decomp_hooks import store  # noqa: E402
from decomp_hooks.cli import main  # noqa: E402
from decomp_hooks.dashboard import DashboardConfig, DashboardError, build_dashboards  # noqa: E402
from decomp_hooks.dashboard.logits import logit_effects  # noqa: E402
from decomp_hooks.dashboard.statistics import SIGNED_BINS, ComponentStats, SignedHistogram  # noqa: E402

CONFIG = {
    "ci": {"type": "mlp", "hidden": [4]},
    "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3}],
    "output_loss": "kl", "ci_alive_threshold": 0.1,
    "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 10, "eval_every": 1000, "checkpoint_every": 1000,
              "faithfulness_warmup_steps": 0, "eval_pgd_steps": 0},
}
TARGETS = {"transformer.h.0.mlp.c_fc": 6, "transformer.h.0.mlp.c_proj": 5}
TOKENS = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(3))


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=97)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def lm():
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = dh.decompose(model, TOKENS, targets=TARGETS, config=CONFIG, progress=False)
    return model, dec


def live_components(dec, site):
    ci = dec.causal_importance(TOKENS)[site].reshape(-1, TARGETS[site])
    return sorted(torch.nonzero((ci > 0.1).any(0)).flatten().tolist())


def test_streamed_statistics_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    ci, acts = torch.rand(96, 7, generator=g), torch.randn(96, 7, generator=g) * torch.linspace(0.1, 5, 96)[:, None]
    whole, parts = ComponentStats(7, 0.3, 4), ComponentStats(7, 0.3, 4)
    whole.update(ci, acts)
    for i in range(0, 96, 8):  # growing activations force the signed histogram to rescale on the way
        parts.update(ci[i:i + 8], acts[i:i + 8], first_position=i)
    fire = (ci > 0.3).double()
    assert torch.equal(parts.features.fires, fire.sum(0)) and torch.equal(parts.coactive, fire.T @ fire)
    assert torch.equal(parts.signed.counts.sum((1, 2)), fire.sum(0))  # every firing activation counted once
    assert torch.all(parts.signed.range >= (acts.abs() * (ci > 0.3)).amax(0))
    for c in range(7):  # the same top examples (ranked by CI-gated |activation|) however the data is batched
        assert [p for _, p in parts.features.examples(c)] == [p for _, p in whole.features.examples(c)]
    index, jaccard = parts.most_coactive(3)
    n = fire.sum(0)
    expected = (fire.T @ fire) / (n[:, None] + n[None, :] - fire.T @ fire)
    assert jaccard[0, 0] == pytest.approx(float(expected[0, index[0, 0]]), rel=1e-6) and index[0, 0] != 0


def test_signed_histogram_rescales_without_losing_counts():
    h = SignedHistogram(1)
    h.update(torch.tensor([[0.5], [-0.25]]), torch.ones(2, 1, dtype=torch.bool))
    h.update(torch.tensor([[3.9]]), torch.ones(1, 1, dtype=torch.bool))
    centres, counts, width = h.bins(0)
    assert sum(counts) == 3 and h.range[0] == 4.0 and width == 4.0 / SIGNED_BINS
    assert counts[SIGNED_BINS + int(3.9 / width)] == 1 and counts[SIGNED_BINS - 2] == 1  # 3.9; −0.25 in [−0.5, −0.25)


def test_pages_show_every_live_component(lm, tmp_path):
    model, dec = lm
    pages = build_dashboards(dec, TOKENS, tmp_path / "dash", config=DashboardConfig(n_examples=4, batch_size=5),
                             progress=False)
    index = store.read_json(tmp_path / "dash" / "dashboard.json")
    assert set(pages) == set(TARGETS) and (tmp_path / "dash" / "index.html").is_file()
    for site, page in pages.items():
        html = page.read_text()
        live = live_components(dec, site)
        sections = re.findall(r'<section class="card component" id="c(\d+)"', html)
        assert sorted(map(int, sections)) == live == sorted(index["components"][site])
        assert index["sites"][site]["live"] == len(live) and index["sites"][site]["positions"] == TOKENS.numel()
        assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html  # self-contained
        assert html.count('src="data:image/png;base64,') == 2 * len(live)
        npj = json.loads((tmp_path / "dash" / f"{site}.neuronpedia.json").read_text())
        assert [f["feature_index"] for f in npj["features"]] == [int(s) for s in sections]
        assert all(0 < len(f["activations"]) <= 4 and f["frac_nonzero"] > 0 for f in npj["features"])
        assert ("promotes" in html) == (site.endswith("c_proj"))  # only the residual writer reaches the logits


def test_logit_effects_go_through_the_final_layer_norm(lm):
    model, dec = lm
    U = dec.cm.component("transformer.h.0.mlp.c_proj").U.detach()
    centred = (U - U.mean(-1, keepdim=True)) * model.transformer.ln_f.weight.detach()
    expected = centred @ model.lm_head.weight.detach().T
    assert torch.allclose(logit_effects(dec, "transformer.h.0.mlp.c_proj"), expected, atol=1e-5)
    assert logit_effects(dec, "transformer.h.0.mlp.c_fc") is None


def test_component_selection_and_bad_input(lm, tmp_path):
    _, dec = lm
    site = "transformer.h.0.mlp.c_fc"
    live = live_components(dec, site)
    pages = build_dashboards(dec, TOKENS, tmp_path / "one", sites=site, components=[live[0]], progress=False)
    assert re.findall(r'id="c(\d+)"', pages[site].read_text()) == [str(live[0])]
    with pytest.raises(DashboardError, match="out of range"):
        build_dashboards(dec, TOKENS, tmp_path / "bad", sites=site, components=[99], progress=False)
    with pytest.raises(DashboardError, match="token ids"):
        build_dashboards(dec, TOKENS.float(), tmp_path / "bad", progress=False)
    with pytest.raises(DashboardError, match="not empty"):
        build_dashboards(dec, TOKENS, tmp_path / "one", progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def lm_run(lm, tmp_path_factory):
    model, dec = lm
    root = tmp_path_factory.mktemp("lm_run")
    model.save_pretrained(root / "model")
    dec.save(root / "run" / "decomposition")
    store.write_tensors(root / "tokens.safetensors", {"tokens": TOKENS})
    return root


def test_dashboard_command(lm_run, tmp_path):
    out = tmp_path / "dash"
    args = ["dashboard", str(lm_run / "run"), "--model", str(lm_run / "model"), "--data",
            str(lm_run / "tokens.safetensors"), "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 page(s)" in result.output and (out / "transformer.h.0.mlp.c_proj.html").is_file()
    refused = CliRunner().invoke(main, args[:-1] + ["--force", "--components", "0,99"])
    assert refused.exit_code == 2 and "out of range" in refused.output
    help_text = CliRunner().invoke(main, ["dashboard", "--help"]).output
    for option in ("--data", "--sites", "--components", "--engine", "--out", "Examples"):
        assert option in help_text


def test_sae_dashboard_engine_renders_components_as_transcoders(tmp_path):
    pytest.importorskip("sae_dashboard")
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from decomp_hooks.assets import gpt2_tokenizer
    from decomp_hooks.dashboard.sae_dashboard import render_with_sae_dashboard, residual_view

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(d_model=32, d_head=8, n_heads=4, n_layers=1, n_ctx=32, d_vocab=50257, d_mlp=64,
                                      act_fn="gelu_new", normalization_type="LN", seed=0, device="cpu")
        model = HookedSAETransformer(cfg, tokenizer=gpt2_tokenizer())
        tokens = torch.randint(0, 50257, (24, 32), generator=torch.Generator().manual_seed(0))
        dec = dh.decompose(model, tokens, targets={"blocks.0.mlp.W_out": 4}, config=CONFIG, progress=False)
        page = render_with_sae_dashboard(dec, "blocks.0.mlp.W_out", tokens, tmp_path / "sd.html", features=[0, 1, 4, 5])
        from sae_lens import SAE

        saes = dec.export(tmp_path / "export", sites="blocks.0.mlp.W_out")
        sae = SAE.load_from_disk(str(saes["blocks.0.mlp.W_out"]))
    html = page.read_text()
    assert page.stat().st_size > 50_000 and "DASHBOARD_DATA" in html
    view = residual_view(sae, model, "blocks.0.mlp.W_out")  # what sae-dashboard maps through W_out is exactly U
    assert torch.allclose(view.W_dec @ model.W_out[0], sae.W_dec, atol=1e-5)
    x = torch.randn(5, 64)
    assert torch.allclose(view.encode(x), sae.encode(x), atol=1e-6)
