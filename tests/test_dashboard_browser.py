"""The dashboard page in headless Chromium: no console errors, no network request, one rendered section per live
component, histograms decoded, the colour toggle works, and a full-page screenshot that is not blank."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("websocket")
transformers = pytest.importorskip("transformers")

import decomp_hooks as dh  # noqa: E402
from decomp_hooks.dashboard import build_dashboards  # noqa: E402
from browser import check_page, chromium_path  # noqa: E402

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (apt-get install chromium)")

CONFIG = {"ci": {"type": "mlp", "hidden": [4]}, "ci_alive_threshold": 0.0,
          "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3}],
          "output_loss": "kl", "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 10, "eval_every": 1000,
                                         "checkpoint_every": 1000, "eval_pgd_steps": 0}}
SITE = "transformer.h.0.mlp.c_fc"
CHECKS = {
    "sections": "document.querySelectorAll('section.component').length",
    "rendered": "[...document.querySelectorAll('section.component')]"
                ".filter(s => s.getBoundingClientRect().height > 100).length",
    "images": "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length",
    "ci_view": "[...document.querySelectorAll('.mode-ci')].filter(e => e.offsetHeight > 0).length",
    "act_view_after_toggle": "document.getElementById('mode-act').click(), "
                             "[...document.querySelectorAll('.mode-act')].filter(e => e.offsetHeight > 0).length",
}


def test_dashboard_opens_cleanly_in_headless_chromium(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                                                 vocab_size=97)).eval()
    tokens = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = dh.decompose(model, tokens, targets={SITE: 6}, config=CONFIG, progress=False)
    page = build_dashboards(dec, tokens, tmp_path / "dash", progress=False)[SITE]
    live = int((dec.causal_importance(tokens)[SITE].reshape(-1, 6) > 0.0).any(0).sum())
    report = check_page(page, CHECKS, screenshot=tmp_path / "dashboard.png")
    print(f"\nchromium check of {page.name}: live components {live}, {report.values}, console errors {report.errors}, "
          f"warnings {report.warnings}, requests {report.requests}")
    assert live > 0 and report.errors == [] and report.external_requests == []
    assert report.values["sections"] == report.values["rendered"] == live
    assert report.values["images"] == 2 * live and report.values["ci_view"] == live
    assert report.values["act_view_after_toggle"] == live
    shot = Image.open(report.screenshot).convert("RGB")
    assert shot.width >= 1000 and shot.height > 300 * live  # the full page, every section laid out
    assert len(shot.getcolors(maxcolors=1 << 20)) > 50  # text, histograms and token colours, not a blank page
