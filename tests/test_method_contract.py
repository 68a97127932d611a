"""The Method contract: a third method defined here, in a few lines, trains, logs, saves and loads through the
registry without any other file knowing it; the built-in methods report importances through the same contract."""
from __future__ import annotations

import json

import pytest
import torch

import decomp_hooks as dh
from decomp_hooks.components import SiteMask
from decomp_hooks.config import ConfigError
from decomp_hooks.methods import Layout, Method, StepOutput, get_method, method_names, register
from decomp_hooks.metrics import mse
from decomp_hooks.toy import toy_sampler


class AllOn(Method):
    """Every component always on: fit the components to the weights and the output, no importances to learn."""

    name = "all_on_test"

    @classmethod
    def layout(cls, sites, C, cfg):
        return Layout(dict(C), {s.name: 1 for s in sites}, None)

    def terms(self, cm, batch):
        with torch.no_grad():
            target, _ = cm(batch)
        out, _ = cm(batch, masks={n: SiteMask(torch.ones(cm.component(n).C)) for n in cm.site_names})
        return {"unmasked_recon": mse(out, target), "faithfulness": cm.faithfulness()}

    def loss(self, cm, batch, frac):
        terms = self.terms(cm, batch)
        ones = {n: torch.ones(cm.component(n).C) for n in cm.site_names}
        return StepOutput(sum(terms.values()), {k: v.detach() for k, v in terms.items()}, ones)

    def evaluate(self, cm, batch):
        return {k: v.item() for k, v in self.terms(cm, batch).items()}

    def importances(self, cm, batch, inputs=None):
        if inputs is None:
            _, inputs = cm(batch, cache=True)
        return {n: torch.ones(*x.shape[:-1], cm.component(n).C) for n, x in inputs.items()}


CONFIG = {"method": "all_on_test", "targets": {"linear1": 5, "linear2": 5},
          "train": {"steps": 40, "batch_size": 128, "lr": 1e-2, "faithfulness_warmup_steps": 0, "log_every": 10,
                    "eval_every": 20, "checkpoint_every": 20}}


def test_a_method_defined_in_a_test_trains_saves_and_loads(tms52, tmp_path):
    register(AllOn)
    assert "all_on_test" in method_names() and get_method("all_on_test") is AllOn
    dec = dh.decompose(tms52, toy_sampler(tms52), config=CONFIG, out_dir=tmp_path, progress=False)
    assert isinstance(dec.method, AllOn) and dec.provenance["method"] == "all_on_test"
    evals = [r for r in dec.metrics if "eval/unmasked_recon" in r]
    assert evals[-1]["eval/unmasked_recon"] < evals[0]["eval/unmasked_recon"]
    trains = [r for r in dec.metrics if "train/total" in r]
    assert trains and all(r["train/l0/total"] == 10 for r in trains)  # 5 always-on components at each of 2 sites
    assert not dec.cm.ci_fns
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 40
    again = dh.load(tmp_path / "decomposition", model=tms52)
    assert isinstance(again.method, AllOn) and again.config == dec.config
    x = toy_sampler(tms52)(16)
    torch.testing.assert_close(again.run(x, again.site_masks()), dec.run(x, dec.site_masks()))
    assert again.causal_importance(x)["linear1"].shape == (16, 5)


def test_unknown_methods_are_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"method='spdd' is not supported; use one of \[.*'apd'.*'spd'"):
        dh.load_config({"method": "spdd", "targets": {"a": 2}})


def test_builtin_methods_come_from_the_registry():
    spd, apd = get_method("spd"), get_method("apd")
    assert spd.name == "spd" and spd.importance_kind == "ci" and spd.section is None
    assert apd.name == "apd" and apd.importance_kind == "topk" and apd.section == "apd"
    assert issubclass(spd, Method) and issubclass(apd, Method)


def test_apd_reports_its_topk_selection_not_fake_causal_importance(tms52):
    cfg = {"method": "apd", "targets": {"linear1": 5, "linear2": 5}, "tied": [["linear1", "linear2"]],
           "apd": {"topk": 1.0, "rank": 1}, "train": {"steps": 0, "faithfulness_warmup_steps": 0, "eval_pgd_steps": 0}}
    dec = dh.decompose(tms52, toy_sampler(tms52), config=cfg, progress=False)
    x = toy_sampler(tms52)(64)
    importances = dec.causal_importance(x)
    chosen = importances["linear1"]
    assert chosen.shape == (64, 5) and set(chosen.unique().tolist()) <= {0.0, 1.0}
    assert chosen.sum() == 64  # batch top-k with k = 1: one component per input on average
    torch.testing.assert_close(importances["linear2"], chosen)  # APD components span both sites
    with pytest.raises(ValueError, match="no causal-importance functions"):
        dec.cm.causal_importances({"linear1": x})
