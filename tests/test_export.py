"""SAE-Lens export: exact round trips through `SAE.load_from_disk` on TransformerLens and HF (nnsight, Conv1D) sites,
spliced `HookedSAETransformer` logits, sparsity and Neuronpedia JSON, the generic basis path, loading back, the
explicit registration of the signed architecture, bad input and the `decomp-hooks export` command."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import warnings

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
transformers = pytest.importorskip("transformers")
nnsight = pytest.importorskip("nnsight")
pytest.importorskip("transformer_lens")

from click.testing import CliRunner  # noqa: E402
from sae_lens import SAE, HookedSAETransformer  # noqa: E402

import decomp_hooks as dh  # noqa: E402
from decomp_hooks import store  # noqa: E402
from decomp_hooks.cli import main  # noqa: E402
from decomp_hooks.components import SiteMask  # noqa: E402
from decomp_hooks.export import (  # noqa: E402
    SIGNED,
    ExportError,
    export_basis,
    load_export,
    load_sae,
    register,
)
from decomp_hooks.export.format import SAEFiles  # noqa: E402

register()  # as a user does before loading signed exports with SAE.load_from_disk

LM_CONFIG = {
    "ci": {"type": "mlp", "hidden": [4]},
    "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0}],
    "output_loss": "kl",
    "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 10, "eval_every": 1000, "checkpoint_every": 1000,
              "faithfulness_warmup_steps": 0, "eval_pgd_steps": 0},
}
TL_SIZES = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=16, d_vocab=50, d_mlp=64)
TL_TOKENS = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
HF_TOKENS = torch.randint(0, 97, (8, 12), generator=torch.Generator().manual_seed(1))
TL_TARGETS = {"blocks.0.mlp.W_in": 6, "blocks.0.mlp.W_out": 5, "blocks.0.attn.W_O": 4, "blocks.1.attn.W_Q": 3,
              "embed.W_E": 3}
HF_TARGETS = {"transformer.h.*.mlp.c_fc": 6, "transformer.h.0.mlp.c_proj": 5, "transformer.h.0.attn.c_proj": 4}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hooked_sae_transformer():
    from transformer_lens import HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(**TL_SIZES, act_fn="gelu_new", normalization_type="LN", seed=0, device="cpu")
        return HookedSAETransformer(cfg)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=97)
    return transformers.GPT2LMHeadModel(cfg).eval()


def decompose(model, tokens, targets, steps=3):
    cfg = {**LM_CONFIG, "train": {**LM_CONFIG["train"], "steps": steps}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dh.decompose(model, tokens, targets=targets, config=cfg, progress=False)


@pytest.fixture(scope="module")
def tl():
    model = hooked_sae_transformer()
    return model, decompose(model, TL_TOKENS, TL_TARGETS)


@pytest.fixture(scope="module")
def hf():
    model = gpt2()
    return model, decompose(nnsight.NNsight(model), HF_TOKENS, HF_TARGETS)


def export(dec, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding site is skipped with a warning
        return dec.export(path, **kw)


def site_input(dec, tokens, name):
    _, inputs = dec.cm(tokens, cache=True)
    return inputs[name]


def components_output(dec, x, name):
    """x V U + b: the site with all components on and no delta component."""
    comps = dec.cm.component(name)
    out = x @ comps.V @ comps.U
    return out if comps.bias is None else out + comps.bias


def sae_input(sae, x):
    """The tensor a hook point would hand the SAE: per-head `hook_z` for the signed architecture."""
    if sae.cfg.reshape_activations == "hook_z" and sae.cfg.architecture() == SIGNED:
        return x.unflatten(-1, (TL_SIZES["n_heads"], -1))
    return x


# -- exactness ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["transcoder", SIGNED])
@pytest.mark.parametrize("which", ["tl", "hf"])
def test_round_trip_decode_encode_is_the_components_output(which, fmt, request, tmp_path):
    model, dec = request.getfixturevalue(which)
    tokens = TL_TOKENS if which == "tl" else HF_TOKENS
    dirs = export(dec, tmp_path / "out", format=fmt)
    assert "embed.W_E" not in dirs and len(dirs) == len([n for n in dec.site_names if n != "embed.W_E"])
    for name, path in dirs.items():
        assert path.name == name and (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file()
        sae = SAE.load_from_disk(path)
        C = dec.cm.component(name).C
        assert type(sae).__name__ == ("Transcoder" if fmt == "transcoder" else "SignedTranscoder")
        assert sae.cfg.d_sae == (2 * C if fmt == "transcoder" else C) and not sae.cfg.apply_b_dec_to_input
        x = site_input(dec, tokens, name)
        out = sae.decode(sae.encode(sae_input(sae, x)))
        assert rel(out, components_output(dec, x, name)) < 1e-5, name
        md = sae.cfg.metadata
        assert md.site == name and md.C == C and md.method == "spd" and md.steps == 3 and md.run_id.startswith("dh-")
        assert md.source_config["targets"] == (TL_TARGETS if which == "tl" else HF_TARGETS)
        assert md.delta_in_export is False and md.sae_lens_version == sae_lens.__version__
        comps = dec.cm.component(name)
        delta = (comps.target_weight - comps.V @ comps.U).norm() / comps.target_weight.norm()
        assert md.delta_weight_rel_norm == pytest.approx(delta.item(), rel=1e-5) and md.delta_weight_rel_norm > 0.1
        if which == "hf":
            assert (md.hf_hook_name, md.hf_hook_name_out) == (name, name)


def test_hook_names(tl, hf, tmp_path):
    _, dec = tl
    export(dec, tmp_path / "tl", format=SIGNED)
    saes = load_export(tmp_path / "tl")
    hooks = {n: (s.hook_name, s.hook_name_out, s.cfg["reshape_activations"]) for n, s in saes.items()}
    assert hooks["blocks.0.mlp.W_in"] == ("blocks.0.mlp.hook_in", "blocks.0.mlp.hook_pre", "none")
    assert hooks["blocks.0.mlp.W_out"] == ("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out", "none")
    assert hooks["blocks.0.attn.W_O"] == ("blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "hook_z")
    assert hooks["blocks.1.attn.W_Q"][:2] == (None, None) and "no single-hook" in saes["blocks.1.attn.W_Q"].metadata["hook_note"]
    _, dec = hf
    export(dec, tmp_path / "hf")
    saes = load_export(tmp_path / "hf")
    s = saes["transformer.h.1.mlp.c_fc"]
    assert (s.hf_hook_name, s.hf_hook_name_out) == ("transformer.h.1.mlp.c_fc",) * 2
    assert (s.hook_name, s.hook_name_out) == ("blocks.1.mlp.hook_in", "blocks.1.mlp.hook_pre")  # the same GPT-2 in TL
    assert s.metadata["hf_hook_io"] == {"hf_hook_name": "input", "hf_hook_name_out": "output"}
    assert "cannot splice" in saes["transformer.h.0.attn.c_proj"].metadata["hook_note"]  # stock transcoder + hook_z


@pytest.mark.parametrize("fmt", ["transcoder", SIGNED])
def test_spliced_layer_reproduces_the_components_logits(tl, fmt, tmp_path):
    model, dec = tl
    dirs = export(dec, tmp_path / "out", format=fmt, sites="blocks.0.*" if fmt == SIGNED else "blocks.0.mlp.*")
    assert len(dirs) == (3 if fmt == SIGNED else 2)  # stock Transcoders cannot read hook_z, so W_O only in signed
    saes = [SAE.load_from_disk(p) for p in dirs.values()]
    tokens = TL_TOKENS[:4]
    masks = {n: SiteMask(torch.ones(dec.cm.component(n).C), None) for n in dirs}  # all on, no delta
    reference = dec.run(tokens, masks=masks)
    with model.saes(saes=saes, use_error_term=False):
        spliced = model(tokens)
    assert (spliced - reference).abs().max().item() < 1e-4
    assert (model(tokens) - reference).abs().max().item() > 1e-2  # the splice really replaced the sites


def test_hf_gpt2_exports_splice_into_the_same_model_in_transformer_lens(hf, tmp_path):
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    model, dec = hf
    hc = model.config
    cfg = HookedTransformerConfig(d_model=hc.n_embd, d_head=hc.n_embd // hc.n_head, n_heads=hc.n_head, d_mlp=4 * hc.n_embd,
                                  n_layers=hc.n_layer, n_ctx=hc.n_positions, eps=hc.layer_norm_epsilon,
                                  d_vocab=hc.vocab_size, act_fn="gelu_new", normalization_type="LN",
                                  original_architecture="GPT2LMHeadModel", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = HookedSAETransformer(cfg)
        ht.load_and_process_state_dict(convert_gpt2_weights(model, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    dirs = export(dec, tmp_path / "out", format=SIGNED, sites="transformer.h.0.*")
    masks = {n: SiteMask(torch.ones(dec.cm.component(n).C), None) for n in dirs}
    reference = dec.run(HF_TOKENS[:4], masks=masks)
    with ht.saes(saes=[SAE.load_from_disk(p) for p in dirs.values()], use_error_term=False):
        spliced = ht(HF_TOKENS[:4])
    assert (spliced - reference).abs().max().item() < 1e-4


def test_ci_gated_signed_export_gates_by_causal_importance(tl, tmp_path):
    model, dec = tl
    name = "blocks.0.mlp.W_in"
    path = export(dec, tmp_path / "out", format="signed", sites=name, ci_gated=True)[name]
    sae = SAE.load_from_disk(path)
    assert sae.cfg.ci_gated and sae.cfg.ci_type == "mlp" and sae.cfg.metadata.reconstruction.startswith("decode(encode(x)) = ((x V) * g(x))")
    x = site_input(dec, TL_TOKENS, name)
    ci, acts = dec.causal_importance(TL_TOKENS)[name], dec.component_acts(TL_TOKENS)[name]
    torch.testing.assert_close(sae.encode(x), acts * ci, rtol=1e-6, atol=1e-6)
    reference = dec.run(TL_TOKENS, masks={name: SiteMask(ci, None)})  # the CI-masked model, no delta
    with model.saes(saes=[sae], use_error_term=False):
        spliced = model(TL_TOKENS)
    assert (spliced - reference).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="rescale the CI"):
        sae.fold_W_dec_norm()


def test_written_cfg_is_what_sae_lens_writes(tl, tmp_path):
    _, dec = tl
    for fmt in ("transcoder", SIGNED):
        path = export(dec, tmp_path / fmt, format=fmt, sites="blocks.0.mlp.W_in")["blocks.0.mlp.W_in"]
        ours = json.loads((path / "cfg.json").read_text())
        SAE.load_from_disk(path).save_model(tmp_path / f"{fmt}-resaved")
        theirs = json.loads((tmp_path / f"{fmt}-resaved" / "cfg.json").read_text())
        assert ours == theirs
        assert ours["dtype"] == "float32" and ours["metadata"]["sae_lens_version"] == sae_lens.__version__
        assert ours["architecture"] == fmt and ours["d_out"] == TL_SIZES["d_mlp"]


# -- sparsity and Neuronpedia JSON ----------------------------------------------------------------------------------

NP_KEYS = {"activations", "pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero", "freq_hist_data_bar_values",
           "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
           "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
           "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
           "correlated_features_pearson", "decoder_weights_dist", "n_prompts_total", "n_tokens_in_prompt", "dataset"}


@pytest.mark.parametrize("fmt", ["transcoder", SIGNED])
def test_sparsity_and_neuronpedia_json(hf, fmt, tmp_path):
    _, dec = hf
    sites = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    dirs = export(dec, tmp_path / "out", format=fmt, sites=sites, data=HF_TOKENS, batch_size=3, n_examples=5)
    ci_all, acts_all = dec.causal_importance(HF_TOKENS), dec.component_acts(HF_TOKENS)
    tau = dec.config.ci_alive_threshold
    for name in sites:
        path = dirs[name]
        sparsity = store.read_tensors(path / "sparsity.safetensors")["sparsity"]
        fires = ci_all[name] > tau
        if fmt == "transcoder":
            acts = acts_all[name]
            fires = torch.cat([fires & (acts > 0), fires & (acts < 0)], dim=-1)
        freq = fires.float().reshape(-1, fires.shape[-1]).mean(0)
        torch.testing.assert_close(sparsity, torch.log10(freq + 1e-10))
        sae_cfg = json.loads((path / "cfg.json").read_text())
        assert sae_cfg["metadata"]["firing_threshold"] == tau
        batch = json.loads((path / "neuronpedia.json").read_text())
        assert {"model_id", "layer", "sae_set", "sae_id_suffix", "features"} <= set(batch) and batch["layer"] == 0
        assert [f["feature_index"] for f in batch["features"]] == list(range(sae_cfg["d_sae"]))
        examples = 0
        for f in batch["features"]:
            assert NP_KEYS <= set(f) and f["n_prompts_total"] == 8 and f["n_tokens_in_prompt"] == 12
            assert f["frac_nonzero"] == pytest.approx(freq[f["feature_index"]].item(), abs=1e-5)
            assert sum(f["freq_hist_data_bar_heights"]) == pytest.approx(freq[f["feature_index"]].item() * 96)
            # c_proj writes the residual stream: its decoder directions go through the unembedding; c_fc does not
            assert len(f["pos_str"]) == (10 if name.endswith("c_proj") else 0)
            assert len(f["activations"]) == min(5, round(freq[f["feature_index"]].item() * 96))
            for a in f["activations"]:
                examples += 1
                assert a["bin_min"] == -1 and len(a["tokens"]) == len(a["values"]) and a["bin_max"] > tau
                assert a["values"][a["qualifying_token_index"]] == pytest.approx(a["bin_max"], abs=1e-3)
        assert examples > 0 or name.endswith("c_proj")


# -- the generic basis path (LIB) and loading back ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["transcoder", "standard", SIGNED])
def test_basis_with_its_pseudo_inverse_round_trips(fmt, tmp_path):
    g = torch.Generator().manual_seed(0)
    E = torch.randn(8, 12, generator=g)
    D = torch.linalg.pinv(E.double()).float()  # [12, 8]; E D = I on R^8
    b_enc = torch.randn(12, generator=g)
    path = export_basis(tmp_path / "lib", E, D, b_dec=-(b_enc @ D), b_enc=b_enc, format=fmt,
                        hook_name="blocks.1.hook_resid_pre", model_name="toy", metadata={"method": "lib"})
    sae = SAE.load_from_disk(path)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre" and sae.cfg.metadata.method == "lib"
    x = torch.randn(5, 8, generator=g)
    assert rel(sae.decode(sae.encode(x)), x) < 1e-5
    loaded = load_sae(path)
    assert loaded.architecture == fmt and loaded.d_sae == (12 if fmt == SIGNED else 24)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), x, rtol=1e-4, atol=1e-5)
    with pytest.raises(ExportError, match="sparsity has shape"):
        export_basis(tmp_path / "bad", E, D, format=fmt, sparsity=torch.zeros(3))
    with pytest.raises(ExportError, match=r"must be \[d_in, k\] and \[k, d_out\]"):
        export_basis(tmp_path / "bad", E, D.T, format=fmt)
    assert not (tmp_path / "bad").exists()


def test_load_sae_is_a_comparison_object(hf, tmp_path):
    _, dec = hf
    export(dec, tmp_path / "out", data=HF_TOKENS)
    saes = load_export(tmp_path / "out")
    assert set(saes) == set(dec.site_names)
    name = "transformer.h.0.mlp.c_fc"
    s, comps = saes[name], dec.cm.component(name)
    V, U, bias = s.components()
    torch.testing.assert_close(V, comps.V.detach())
    torch.testing.assert_close(U, comps.U.detach())
    torch.testing.assert_close(bias, comps.bias)
    assert s.W_enc.shape == (32, 12) and s.W_dec.shape == (12, 128) and s.b_enc.shape == (12,) and s.b_dec.shape == (128,)
    assert s.cfg["architecture"] == "transcoder" and s.sparsity.shape == (12,)
    x = site_input(dec, HF_TOKENS, name)
    sae = s.to_sae()
    torch.testing.assert_close(s.encode(x), sae.encode(x))
    with pytest.raises(store.StoreError, match="export root; use load_export"):
        load_sae(tmp_path / "out")


def test_importing_decomp_hooks_leaves_sae_lens_alone_and_registration_is_explicit(tmp_path):
    E = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    path = export_basis(tmp_path / "signed", E, E.T, format=SIGNED)
    code = ("import sys\n"
            "before = list(sys.meta_path)\n"
            "import decomp_hooks, decomp_hooks.export\n"
            "assert sys.meta_path == before, 'importing decomp_hooks changed sys.meta_path'\n"
            "assert 'sae_lens' not in sys.modules, 'importing decomp_hooks imported sae_lens'\n"
            "from sae_lens.registry import SAE_CLASS_REGISTRY\n"
            "assert 'decomp_signed_transcoder' not in SAE_CLASS_REGISTRY, 'registered without register()'\n"
            "from decomp_hooks.export import load_sae, register\n"
            f"print(type(load_sae({str(path)!r}).to_sae()).__name__)\n"
            "assert 'decomp_signed_transcoder' in SAE_CLASS_REGISTRY and register()\n"
            "from decomp_hooks.export.signed import SignedTranscoder\n"
            "assert SAE_CLASS_REGISTRY['decomp_signed_transcoder'][0] is SignedTranscoder\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SignedTranscoder"


# -- bad input ---------------------------------------------------------------------------------------------------

def test_bad_input_is_refused_and_nothing_is_half_written(hf, tmp_path, monkeypatch):
    _, dec = hf
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="format='sae'"):
        dec.export(out, format="sae")
    with pytest.raises(ExportError, match=r"site pattern 'transformer.h.9.\*' matches no decomposed site"):
        dec.export(out, sites=["transformer.h.0.*", "transformer.h.9.*"])
    with pytest.raises(ExportError, match="ci_gated=True needs format"):
        dec.export(out, ci_gated=True)
    assert not out.exists()
    out.mkdir()  # an existing empty directory is fine
    dec.export(out, sites="transformer.h.0.mlp.c_fc")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        dec.export(out)
    assert sorted(p.name for p in out.iterdir() if p.name != ".decomp-hooks") == ["export.json", "transformer.h.0.mlp.c_fc"]
    calls = []

    def failing_write(self, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, directory)

    original = SAEFiles.write
    monkeypatch.setattr(SAEFiles, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        dec.export(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name != ".decomp-hooks") == ["export.json", "transformer.h.0.mlp.c_fc"]  # the old export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    monkeypatch.setattr(SAEFiles, "write", original)
    dec.export(out, overwrite=True)
    assert len(load_export(out)) == len(dec.site_names)


# -- the command -------------------------------------------------------------------------------------------------

def test_export_help_documents_every_option_with_an_example():
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0
    text = result.output
    options, examples = text.split("Options:")[1], text.split("Examples:")[1].split("Options:")[0]
    for option in ("--format", "--sites", "--force", "--model", "--model-name", "--data", "--samples", "--ci-gated",
                   "--batch-size"):
        assert f"  {option} " in options and re.search(rf"{option}[ \n]", examples), option
    assert "RUN_DIR" in text and "OUT_DIR" in text and "AutoModelForCausalLM.from_pretrained(DIR)" in text
    assert "Examples:\n    decomp-hooks export runs/tms_5-2-s0 exports/tms\n" in text


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from decomp_hooks.toy import make_toy, save_toy, toy_sampler

    from conftest import SPD_5_2

    run = tmp_path_factory.mktemp("toy") / "run"
    model, _ = make_toy("tms_5-2", seed=0, progress=False, steps=50)
    cfg = {**SPD_5_2, "train": {**SPD_5_2["train"], "steps": 3, "faithfulness_warmup_steps": 0, "eval_pgd_steps": 0}}
    dh.decompose(model, toy_sampler(model), config=cfg, out_dir=run, progress=False)
    save_toy(model, run / "target")
    return run


def test_export_command_on_a_toy_run(toy_run, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(toy_run), str(out), "--samples", "256"])
    assert result.exit_code == 0, result.output
    assert "linear1:" in result.output and "|dW|/|W|=" in result.output and "+sparsity" in result.output
    saes = load_export(out)
    assert set(saes) == {"linear1", "linear2"} and saes["linear1"].sparsity.shape == (40,)
    assert saes["linear1"].metadata["source_path"] == str(toy_run / "decomposition")
    again = CliRunner().invoke(main, ["export", str(toy_run / "decomposition"), str(out), "--format", "signed",
                                      "--sites", "linear2", "--force", "--samples", "0"])
    assert again.exit_code == 0, again.output
    assert set(load_export(out)) == {"linear2"} and load_sae(out / "linear2").architecture == SIGNED


def test_export_command_errors(toy_run, tmp_path):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["export", str(empty), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no decomposition in" in result.output
    result = runner.invoke(main, ["export", str(toy_run), str(tmp_path / "out"), "--sites", "linear9"])
    assert result.exit_code == 2 and "site pattern 'linear9' matches no decomposed site" in result.output
    assert not (tmp_path / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = runner.invoke(main, ["export", str(toy_run), str(busy)])
    assert result.exit_code == 1 and "not empty; choose another output directory or pass overwrite=True (--force)" in result.output
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    result = runner.invoke(main, ["export", str(toy_run), str(tmp_path / "out"), "--ci-gated"])
    assert result.exit_code == 2 and "--ci-gated needs --format" in result.output


def test_export_command_with_a_local_hf_model_and_token_data(tmp_path):
    model = gpt2()
    model.save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = {**LM_CONFIG, "train": {**LM_CONFIG["train"], "steps": 2}}
        dh.decompose(model, HF_TOKENS, targets={"transformer.h.*.mlp.c_fc": 4}, config=cfg, out_dir=run, progress=False)
    store.write_tensors(tmp_path / "tokens.safetensors", {"tokens": HF_TOKENS})
    no_model = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "x")])
    assert no_model.exit_code == 1 and "--model" in no_model.output
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(run), str(out), "--model", str(tmp_path / "model"), "--sites",
                                       "transformer.h.0.*", "--data", str(tmp_path / "tokens.safetensors"),
                                       "--model-name", "tiny-gpt2"])
    assert result.exit_code == 0, result.output
    s = load_sae(out / "transformer.h.0.mlp.c_fc")
    assert s.metadata["model_name"] == "tiny-gpt2" and s.hook_name == "blocks.0.mlp.hook_in"
    assert (out / "transformer.h.0.mlp.c_fc" / "neuronpedia.json").is_file()
