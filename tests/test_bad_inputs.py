"""Bad input, table-driven: each case raises its exact error class with a message naming the bad value, before any
work is done, and leaves no run directory behind."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import decomp_hooks as dh
from decomp_hooks.cli import main
from decomp_hooks.config import ConfigError
from decomp_hooks.data import DataError
from decomp_hooks.sites import SiteError
from decomp_hooks.store import MARKER, StoreError

BASE = {
    "targets": {"0": 4},
    "losses": [{"type": "stochastic_recon"}, {"type": "importance_minimality", "coeff": 1e-3}],
    "train": {"steps": 3, "batch_size": 8, "log_every": 1, "eval_every": 3, "eval_pgd_steps": 0},
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 5))


def embedder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11))


def sample(n: int) -> torch.Tensor:
    return torch.rand(n, 5)


def cfg(**changes) -> dict:
    out = {**BASE, **changes}
    out["train"] = {**BASE["train"], **changes.get("train", {})}
    return out


def one_shot():
    return iter([torch.rand(8, 5)])


def nan_model() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[2].bias.fill_(math.nan)
    return model


def nan_site_model() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(math.nan)
    return nn.Sequential(model, nn.Linear(5, 5))


# (id, kwargs for decompose, error class, regex the message must match)
API_CASES = [
    ("glob matches nothing", dict(targets={"blocks.*": 4}), SiteError, r"'blocks\.\*' matches no module.*Candidates: 0, 1, 2"),
    ("unsupported module", dict(targets={"1": 4}), SiteError, r"'1' is a ReLU, which cannot be decomposed"),
    ("module matched twice", dict(targets={"*": 4, "0": 2}), SiteError, r"'0' is matched by both"),
    ("C zero", dict(targets={"0": 0}), ConfigError, r"targets\['0'\]=0: C must be a positive integer"),
    ("C not an int", dict(config=cfg(targets={"0": "four"})), ConfigError, r"config.targets.0: expected int, got 'four'"),
    ("unknown top-level key", dict(config=cfg(stesp=3)), ConfigError, r"unknown key 'stesp'"),
    ("unknown train key", dict(config=cfg(train={"btach_size": 8})), ConfigError, r"unknown key 'btach_size'. Did you mean 'batch_size'"),
    ("negative lr", dict(config=cfg(train={"lr": -0.1})), ConfigError, r"train.lr=-0.1: must be finite and > 0"),
    ("zero batch", dict(config=cfg(train={"batch_size": 0})), ConfigError, r"train.batch_size=0: must be > 0"),
    ("negative steps", dict(steps=-5), ConfigError, r"train.steps=-5: must be ≥ 0"),
    ("bad schedule", dict(config=cfg(train={"schedule": {"fn": "exp"}})), ConfigError, r"train.schedule.fn='exp'"),
    ("warmup over 1", dict(config=cfg(train={"schedule": {"warmup_pct": 1.5}})), ConfigError, r"warmup_pct=1.5: must be in \[0, 1\]"),
    ("unknown loss", dict(config=cfg(losses=[{"type": "stochastic_recn"}])), ConfigError, r"'stochastic_recn' is unknown. Did you mean 'stochastic_recon'"),
    ("loss twice", dict(config=cfg(losses=[{"type": "stochastic_recon"}] * 2)), ConfigError, r"each type may appear once"),
    ("no losses", dict(config=cfg(losses=[])), ConfigError, r"no loss terms"),
    ("zero threads", dict(config=cfg(train={"threads": 0})), ConfigError, r"train.threads=0: must be an integer ≥ 1"),
    ("alive threshold NaN", dict(config=cfg(ci_alive_threshold=math.nan)), ConfigError, r"ci_alive_threshold=nan: must be in \[0, 1\)"),
    ("alive threshold 2", dict(config=cfg(ci_alive_threshold=2.0)), ConfigError, r"ci_alive_threshold=2.0: must be in \[0, 1\)"),
    ("component clip -1", dict(config=cfg(train={"grad_clip_components": -1.0})), ConfigError, r"train.grad_clip_components=-1.0: must be finite and > 0"),
    ("CI clip inf", dict(config=cfg(train={"grad_clip_ci_fns": math.inf})), ConfigError, r"train.grad_clip_ci_fns=inf: must be finite"),
    ("final_val_frac -5", dict(config=cfg(train={"schedule": {"final_val_frac": -5.0}})), ConfigError, r"final_val_frac=-5.0: must be in \[0, 1\]"),
    ("p_anneal_final_p -1", dict(config=cfg(losses=[{"type": "importance_minimality", "p_anneal_final_p": -1.0}])), ConfigError, r"p_anneal_final_p=-1.0: must be finite and > 0"),
    ("p_anneal_start_frac 2", dict(config=cfg(losses=[{"type": "importance_minimality", "p_anneal_start_frac": 2.0}])), ConfigError, r"p_anneal_start_frac=2.0: must be in \[0, 1\]"),
    ("routing_p 7", dict(config=cfg(losses=[{"type": "stochastic_recon_subset", "routing_p": 7.0}])), ConfigError, r"routing_p=7.0: must be in \[0, 1\]"),
    ("coeff inf", dict(config=cfg(losses=[{"type": "stochastic_recon", "coeff": math.inf}])), ConfigError, r"coeff=inf: must be finite"),
    ("beta -1", dict(config=cfg(losses=[{"type": "importance_minimality", "beta": -1.0}])), ConfigError, r"beta=-1.0: must be finite and ≥ 0"),
    ("beta_anneal_final -1", dict(config=cfg(losses=[{"type": "importance_minimality", "beta_anneal_final": -1.0}])), ConfigError, r"beta_anneal_final=-1.0: must be finite and ≥ 0"),
    ("beta_anneal_end_frac 2", dict(config=cfg(losses=[{"type": "importance_minimality", "beta_anneal_end_frac": 2.0}])), ConfigError, r"beta_anneal_end_frac=2.0: must be in \[0, 1\]"),
    ("beta_anneal_final on frequency", dict(config=cfg(losses=[{"type": "frequency_minimality", "beta_anneal_final": 0.5}])), ConfigError, r"only importance_minimality has a β"),
    ("eps 0", dict(config=cfg(losses=[{"type": "importance_minimality", "eps": 0.0}])), ConfigError, r"eps=0.0: must be in \(0, 1\)"),
    ("pgd step size 0", dict(config=cfg(losses=[{"type": "pgd_recon", "step_size": 0.0}])), ConfigError, r"step_size=0.0: must be finite and > 0"),
    ("eval_pgd_steps -1", dict(config=cfg(train={"eval_pgd_steps": -1})), ConfigError, r"train.eval_pgd_steps=-1: must be ≥ 0"),
    ("seed 2**70", dict(seed=2**70), ConfigError, r"seed=1180591620717411303424: must be an integer in \[0, 2³²\)"),
    ("seed -1", dict(config=cfg(seed=-1)), ConfigError, r"seed=-1: must be an integer"),
    ("lr inf", dict(config=cfg(train={"lr": math.inf})), ConfigError, r"train.lr=inf: must be finite"),
    ("faithfulness warmup -1", dict(config=cfg(train={"faithfulness_warmup_steps": -1})), ConfigError, r"faithfulness_warmup_steps=-1: must be ≥ 0"),
    ("faithfulness lr 0", dict(config=cfg(train={"faithfulness_warmup_lr": 0.0})), ConfigError, r"faithfulness_warmup_lr=0.0: must be finite and > 0"),
    ("faithfulness decay -1", dict(config=cfg(train={"faithfulness_warmup_weight_decay": -1.0})), ConfigError, r"faithfulness_warmup_weight_decay=-1.0"),
    ("rope base 0", dict(config=cfg(ci={"rope_base": 0.0})), ConfigError, r"ci.rope_base=0.0: must be > 1"),
    ("c_scale inf", dict(config=cfg(c_scale=math.inf)), ConfigError, r"c_scale=inf: must be finite"),
    ("shipped config name typo", dict(config="tms_5_2"), ConfigError, r"'tms_5_2' does not exist.*Did you mean 'tms_5-2'"),
    ("no data, no tokenizer", dict(data=None), ConfigError, r"data=None but the model carries no tokenizer"),
    ("bad CI type", dict(config=cfg(ci={"type": "transformer"})), ConfigError, r"ci.type='transformer'"),
    ("bad sigmoid", dict(config=cfg(ci={"sigmoid": "tanh"})), ConfigError, r"ci.sigmoid='tanh'"),
    ("bad pgd init", dict(config=cfg(losses=[{"type": "pgd_recon", "init": "gauss"}])), ConfigError, r"init='gauss'"),
    ("bad output loss", dict(config=cfg(output_loss="l1")), ConfigError, r"output_loss='l1'"),
    ("missing config file", dict(config="no/such/config.yaml"), ConfigError, r"'no/such/config.yaml' does not exist"),
    ("cuda without cuda", dict(device="cuda"), ConfigError, r"device='cuda' but CUDA is not available"),
    ("unknown method", dict(method="lib"), ConfigError, r"method='lib' is not supported"),
    ("tie to a non-site", dict(config=cfg(tied=[["0", "9"]])), SiteError, r"tied=\['0', '9'\]: each entry is \[source_site, tied_site\]"),
    ("NaN in a tensor", dict(data=torch.full((16, 5), math.nan)), DataError, r"contains NaN or Inf"),
    ("Inf from a sampler", dict(data=lambda n: torch.full((n, 5), math.inf)), DataError, r"step 0 contains NaN or Inf"),
    ("empty tensor", dict(data=torch.zeros(0, 5)), DataError, r"the data tensor is empty"),
    ("empty list", dict(data=[]), DataError, r"yields no batches; it is empty"),
    ("iterator runs out", dict(data=one_shot()), DataError, r"holds 1 batches but the run draws 5"),
    ("data of the wrong kind", dict(data="some text"), DataError, r"cannot draw batches from a str"),
    ("float64 data", dict(data=torch.rand(16, 5, dtype=torch.float64)), DataError, r"torch.float64 tensor of shape \[8, 5\]"),
    ("wrong width", dict(data=torch.rand(16, 7)), DataError, r"float32 tensor of shape \[8, 7\].*mat1 and mat2"),
    ("floats into an embedding", dict(model=embedder(), data=torch.rand(16, 6)), DataError, r"cannot run on the data: a batch is a torch.float32 tensor"),
    ("token ids beyond the vocabulary", dict(model=embedder(), data=torch.randint(0, 40, (16, 6))), DataError, r"\[0, 3\d\] but the model's vocabulary has 11 entries"),
    ("embedding CI type", dict(model=embedder(), data=torch.randint(0, 11, (16, 6)), config=cfg(ci={"type": "vector_mlp"})), ValueError, r"ci.type='vector_mlp' cannot read an embedding site's token ids"),
    ("identity before embedding", dict(model=embedder(), identity_targets={"0": 3}), SiteError, r"identity insertion before embedding '0'"),
    ("not a model", dict(model="gpt2"), TypeError, r"cannot decompose a builtins.str"),
    ("NaN loss", dict(model=nan_model()), FloatingPointError, r"step 0: loss term 'stochastic_recon' is nan .*the model output is not"),
    ("NaN inside a site", dict(model=nan_site_model(), targets={"1": 4}), FloatingPointError,
     r"step 0: loss term .* is nan.*input of site '1'"),
]


@pytest.mark.parametrize("case,kwargs,error,match", API_CASES, ids=[c[0] for c in API_CASES])
def test_decompose_refuses(tmp_path, case, kwargs, error, match):
    kwargs = {"model": mlp(), "data": sample, "config": BASE, **kwargs}
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        dh.decompose(out_dir=out, progress=False, **kwargs)
    assert not out.exists(), "a refused run left a directory behind"


def test_resume_without_checkpoint_and_existing_run(tmp_path):
    with pytest.raises(StoreError, match=r"no checkpoint to resume in .*run"):
        dh.decompose(mlp(), sample, config=BASE, out_dir=tmp_path / "run", resume=True, progress=False)
    dh.decompose(mlp(), sample, config=BASE, out_dir=tmp_path / "done", progress=False)
    with pytest.raises(StoreError, match=r"already holds a run; pass resume=True"):
        dh.decompose(mlp(), sample, config=BASE, out_dir=tmp_path / "done", progress=False)


def test_resume_refuses_another_model(tmp_path):
    dh.decompose(mlp(), sample, config=BASE, out_dir=tmp_path / "run", progress=False)
    other = mlp()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    with pytest.raises(dh.FingerprintError, match=r"site '0': the model's weight differs from the one the run in .*run"):
        dh.decompose(other, sample, config=BASE, out_dir=tmp_path / "run", resume=True, progress=False)
    resumed = dh.decompose(mlp(), sample, config=BASE, out_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.step == BASE["train"]["steps"]  # the same model resumes (here: a finished run, to its end at once)


def test_load_and_masks_refuse(tmp_path):
    with pytest.raises(StoreError, match=r"missing file .*nowhere/decomposition.json"):
        dh.load(tmp_path / "nowhere", model=mlp())
    dec = dh.decompose(mlp(), sample, config=BASE, progress=False)
    dec.save(tmp_path / "dec")
    other = mlp()
    with torch.no_grad():
        other[0].weight.mul_(2)
    with pytest.raises(dh.FingerprintError, match=r"site '0': the model's weight differs"):
        dh.load(tmp_path / "dec", model=other)
    with pytest.raises(SiteError, match=r"keep\['7'\]: not a decomposed site"):
        dec.site_masks(keep={"7": [0]})
    with pytest.raises(SiteError, match=r"ablate\['0'\]: component indices \[4\] are out of range; it has C=4"):
        dec.site_masks(ablate={"0": [4]})
    with pytest.raises(StoreError, match="already exists"):
        dec.save(tmp_path / "dec")


CLI_CASES = [
    ("no target section", "targets: {linear1: 4}\nlosses: [{type: stochastic_recon}]\n", 2, "names no model.*toy `target:`"),
    ("typo in a key", "target: {toy: tms_5-2}\ntrain: {stpes: 3}\n", 2, "Did you mean 'steps'"),
    ("unknown toy", "target: {toy: tms_9-9}\ntargets: {linear1: 4}\nlosses: [{type: stochastic_recon}]\n", 1, "unknown toy 'tms_9-9'"),
    ("pattern matches nothing", "target: {toy: tms_5-2, steps: 10}\ntargets: {lin*3: 4}\nlosses: [{type: stochastic_recon}]\n", 1,
     "'lin\\*3' matches no module"),
]


@pytest.mark.parametrize("case,yaml_text,code,match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(tmp_path, case, yaml_text, code, match):
    import re

    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    result = CliRunner().invoke(main, ["decompose", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == code, result.output
    assert re.search(match, result.output), result.output
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "decomposition").exists()


# (id, edit of a saved decomposition.json, error class, regex the message must match): refused before allocating
SAVED_CASES = [
    ("C of 1e9", lambda m: m["sites"][0].update(C=10**9), StoreError, r"C=1000000000 in decomposition.json but 4"),
    ("C zero", lambda m: m["sites"][0].update(C=0), StoreError, r"has C=0 in decomposition.json; C must be a positive"),
    ("C a bool", lambda m: m["sites"][0].update(C=True), StoreError, r"has C=True in decomposition.json"),
    ("unknown CI type", lambda m: m["config"]["ci"].update(type="evil"), ConfigError, r"ci.type='evil'"),
    ("negative lr", lambda m: m["config"]["train"].update(lr=-1.0), ConfigError, r"train.lr=-1.0: must be finite and > 0"),
]


@pytest.mark.parametrize("case, edit, error, match", SAVED_CASES, ids=[c[0] for c in SAVED_CASES])
def test_load_validates_saved_fields_before_allocating(tmp_path, case, edit, error, match):
    import json

    dh.decompose(mlp(), sample, config=BASE, progress=False).save(tmp_path / "dec")
    meta_path = tmp_path / "dec" / "decomposition.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"decomposition.json' does not match the SHA-256 recorded"):
        dh.load(tmp_path / "dec", model=mlp())
    (tmp_path / "dec" / MARKER).unlink()  # as if hand-made: the field checks answer
    with pytest.raises(error, match=match):
        dh.load(tmp_path / "dec", model=mlp())


def test_load_toy_checks_its_json_against_the_weights_before_allocating(tmp_path):
    import json

    from decomp_hooks.toy import load_toy, make_toy, save_toy

    save_toy(make_toy("tms_5-2", steps=10, progress=False)[0], tmp_path / "toy")
    meta = json.loads((tmp_path / "toy" / "toy.json").read_text())
    meta["config"]["n_features"] = 10**12  # 8 TB if built for real
    (tmp_path / "toy" / "toy.json").write_text(json.dumps(meta))
    (tmp_path / "toy" / MARKER).unlink()  # as if hand-made: the shape check answers
    with pytest.raises(StoreError, match=r"describes tensors .*1000000000000.* but model.safetensors holds"):
        load_toy(tmp_path / "toy")
    meta["config"].update(n_features=5, colour="blue")
    (tmp_path / "toy" / "toy.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"cannot build a tms toy .*'colour'"):
        load_toy(tmp_path / "toy")


# (id, command line, the option and value the usage error must name): refused before anything is read or written
CLI_RANGE_CASES = [
    ("export batch size 0", ["export", "RUN", "OUT", "--batch-size", "0"], "'--batch-size': 0"),
    ("export samples -1", ["export", "RUN", "OUT", "--samples", "-1"], "'--samples': -1"),
    ("compare min-cosine -2", ["compare", "--min-cosine", "-2", "RUN", "SAE", "--data", "D", "--out", "O"], "'--min-cosine': -2"),
    ("dashboard n-examples -3", ["dashboard", "RUN", "--data", "D", "--out", "O", "--n-examples", "-3"], "'--n-examples': -3"),
    ("dashboard context 0", ["dashboard", "RUN", "--data", "D", "--out", "O", "--context-length", "0"], "'--context-length': 0"),
    ("compare min-cosine nan", ["compare", "--min-cosine", "nan", "RUN", "SAE", "--data", "D", "--out", "O"], "'--min-cosine': 'nan' is not a number"),
    ("compare min-corr 2", ["compare", "--min-corr", "2", "RUN", "SAE", "--data", "D", "--out", "O"], "'--min-corr': 2"),
    ("compare top-k 0", ["compare", "--top-k", "0", "RUN", "SAE", "--data", "D", "--out", "O"], "'--top-k': 0"),
    ("decompose steps -1", ["decompose", "tms_5-2", "--steps", "-1"], "'--steps': -1"),
    ("decompose seed 2**70", ["decompose", "tms_5-2", "--seed", str(2**70)], f"'--seed': {2**70}"),
    ("toy seed -1", ["toy", "train", "tms_5-2", "--out", "O", "--seed", "-1"], "'--seed': -1"),
]


@pytest.mark.parametrize("case, args, named", CLI_RANGE_CASES, ids=[c[0] for c in CLI_RANGE_CASES])
def test_cli_refuses_out_of_range_values(tmp_path, monkeypatch, case, args, named):
    monkeypatch.chdir(tmp_path)
    for name in ("RUN", "SAE", "D"):
        (tmp_path / name).mkdir()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert named in " ".join(result.output.split()).replace("Invalid value for ", ""), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "RUN", "SAE"]  # nothing written
