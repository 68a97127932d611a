"""The CUDA paths on a GPU (skipped without one): the same run on CPU and GPU, bf16 autocast, TF32, torch.compile,
save on the GPU and load on the CPU, bit-for-bit resume with the CUDA RNG, toys, APD, LIB and the CLI on `cuda`.

CPU and GPU runs start from the same parameters (components and CI functions are initialised on the CPU, then moved)
and, with deterministic loss terms, follow the same trajectory up to float rounding.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import decomp_hooks as dh

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: loss terms without random masks, so two devices can follow one trajectory
DETERMINISTIC = [{"type": "faithfulness", "coeff": 1.0}, {"type": "ci_masked_recon", "coeff": 1.0},
                 {"type": "ci_masked_recon_layerwise", "coeff": 1.0},
                 {"type": "importance_minimality", "coeff": 3e-3, "pnorm": 1.0}]


def deterministic(spd_config: dict, **train) -> dict:
    cfg = copy.deepcopy(spd_config)
    cfg["losses"] = DETERMINISTIC
    cfg["train"] = {**cfg["train"], "faithfulness_warmup_steps": 0, "eval_pgd_steps": 0, **train}
    return cfg


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(4096, 5, generator=g) * (torch.rand(4096, 5, generator=g) < 0.1)


def trained(dec) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in dec.cm.named_parameters() if v.requires_grad}


def last_train_loss(dec) -> float:
    return [r["train/total"] for r in dec.metrics if "train/total" in r][-1]


def test_fp32_run_on_cuda_follows_the_cpu_run(tms52, spd_config):
    cfg = deterministic(spd_config, autocast_bf16=False, tf32=False)
    cpu = dh.decompose(copy.deepcopy(tms52), data(), config=cfg, device="cpu", progress=False)
    gpu = dh.decompose(copy.deepcopy(tms52), data(), config=cfg, device="cuda", progress=False)
    assert gpu.device.type == "cuda" and all(p.is_cuda for p in gpu.cm.parameters())
    want, got = trained(cpu), trained(gpu)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert last_train_loss(gpu) == pytest.approx(last_train_loss(cpu), rel=1e-4)
    assert gpu.provenance["device"].startswith("cuda") and gpu.provenance["autocast_bf16"] is False


@pytest.mark.parametrize("train", [{"autocast_bf16": True}, {"autocast_bf16": False, "tf32": True},
                                   {"autocast_bf16": True, "compile": True}], ids=["bf16", "tf32", "bf16+compile"])
def test_reduced_precision_changes_rounding_not_the_run(tms52, spd_config, train):
    """bf16 autocast / TF32 really run (the trajectory is not the fp32 one bit for bit) and stay close to fp32;
    parameters, optimizer state and saved tensors stay float32."""
    exact = dh.decompose(copy.deepcopy(tms52), data(), device="cuda", progress=False,
                         config=deterministic(spd_config, autocast_bf16=False, tf32=False))
    fast = dh.decompose(copy.deepcopy(tms52), data(), device="cuda", progress=False, config=deterministic(spd_config, **train))
    a, b = trained(exact), trained(fast)
    assert any(not torch.equal(a[k], b[k]) for k in a), "reduced precision did not change any arithmetic"
    # Adam's sign-like steps let near-zero-gradient entries (fresh biases) drift by ~lr per step, so compare the
    # whole parameter vector and the losses, not entry by entry
    theta_a, theta_b = torch.cat([v.flatten() for v in a.values()]), torch.cat([b[k].flatten() for k in a])
    assert (theta_b - theta_a).norm() / theta_a.norm() < 1e-2
    assert last_train_loss(fast) == pytest.approx(last_train_loss(exact), rel=5e-2)
    assert all(p.dtype == torch.float32 for p in fast.cm.parameters())
    record = [r for r in fast.metrics if "peak_memory_mb" in r][-1]
    assert 0 < record["peak_memory_mb"] < 1024  # CUDA max-allocated, not the process RSS


def test_saved_on_cuda_loads_on_cpu_with_the_same_ci(tms52, spd_config, tmp_path):
    dec = dh.decompose(copy.deepcopy(tms52), data(), config=deterministic(spd_config), device="cuda",
                       out_dir=tmp_path / "run", progress=False)
    batch = data()[:256]
    with torch.no_grad():
        on_gpu = {k: v.cpu() for k, v in dec.causal_importance(batch.cuda()).items()}
        out_gpu = dec.cm(batch.cuda())[0].cpu()
    back = dh.load(tmp_path / "run" / "decomposition", model=copy.deepcopy(tms52), device="cpu")
    assert back.device.type == "cpu"
    with torch.no_grad():
        on_cpu = back.causal_importance(batch)
        out_cpu = back.cm(batch)[0]
    for k in on_gpu:
        torch.testing.assert_close(on_cpu[k], on_gpu[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_cpu, out_gpu, rtol=1e-4, atol=1e-5)
    for name in dec.site_names:
        assert torch.equal(back.components[name].V, dec.components[name].V.cpu())


def test_resume_on_cuda_is_bit_for_bit(tms52, spd_config, tmp_path):
    """Stochastic masks drawn on the GPU: the checkpoint carries the CUDA RNG state, so the resumed run repeats the
    uninterrupted one exactly."""
    cfg = copy.deepcopy(spd_config)
    cfg["train"].update(steps=30, checkpoint_every=10, keep_checkpoints=3)
    full = dh.decompose(copy.deepcopy(tms52), data(), config=cfg, device="cuda", out_dir=tmp_path / "run", progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(ckpts) >= 2
    from decomp_hooks.store import read_tensors

    assert any(k.startswith("rng.cuda.") for k in read_tensors(ckpts[0] / "state.safetensors"))
    for later in ckpts[1:]:
        shutil.rmtree(later)
    resumed = dh.decompose(copy.deepcopy(tms52), data(), config=cfg, device="cuda", out_dir=tmp_path / "run",
                           resume=True, progress=False)
    a, b = trained(full), trained(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_toy_training_apd_and_lib_on_cuda():
    from decomp_hooks.toy import make_toy

    model, sample = make_toy("tms_5-2", seed=0, device="cuda", progress=False, steps=200)
    assert next(model.parameters()).is_cuda and sample(8).is_cuda
    apd = dh.decompose(model, sample, method="apd", device="cuda", progress=False,
                       config={"method": "apd", "targets": {"linear1": 5, "linear2": 5},
                               "train": {"steps": 20, "batch_size": 256, "log_every": 5, "eval_every": 10}})
    assert apd.device.type == "cuda" and torch.isfinite(torch.tensor(last_train_loss(apd)))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(1))
    kw = dict(layers=["1", "output"], progress=False, batch_size=128)
    cpu = dh.local_interaction_basis(net, x, device="cpu", **kw)
    gpu = dh.local_interaction_basis(copy.deepcopy(net).cuda(), x, device="cuda", **kw)
    for name in cpu.layers:
        torch.testing.assert_close(gpu.eigenvalues[name].cpu(), cpu.eigenvalues[name], rtol=1e-6, atol=1e-9)


def test_cli_decompose_on_cuda(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "decomp_hooks.cli", "decompose", "tms_5-2", "--steps", "50",
                           "--device", "cuda", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "decomposition" / "decomposition.json").read_text())
    assert meta["provenance"]["device"].startswith("cuda") and meta["step"] == 50


LM_CONFIG = {"ci": {"type": "vector_mlp", "hidden": [8]},
             "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0}],
             "output_loss": "kl", "ci_alive_threshold": 0.0,
             "train": {"steps": 20, "batch_size": 4, "lr": 3e-3, "log_every": 10, "eval_every": 20, "checkpoint_every": 1000}}
TOKENS = torch.randint(0, 50, (64, 12), generator=torch.Generator().manual_seed(2))


def test_transformer_lens_model_on_cuda():
    """A HookedTransformer built on the GPU: bf16-autocast SPD on a TL-named site, then the decomposition spliced in."""
    transformer_lens = pytest.importorskip("transformer_lens")
    model = transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(
        d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=16, d_vocab=50, d_mlp=64, act_fn="gelu_new",
        normalization_type="LN", seed=0, device="cuda"))
    dec = dh.decompose(model, TOKENS, targets={"blocks.0.mlp.W_in": 16}, config=LM_CONFIG, device="cuda", progress=False)
    assert dec.device.type == "cuda" and dec.components["blocks.0.mlp.W_in"].V.is_cuda
    final = dec.final_metrics()
    assert final["eval/kl_zero_masked"] > final["eval/kl_unmasked"]
    keep = {"blocks.0.mlp.W_in": list(range(16))}
    with torch.no_grad():
        kept = dec.run(TOKENS[:4].cuda(), masks=dec.site_masks(keep=keep))
        torch.testing.assert_close(kept, model(TOKENS[:4].cuda()), rtol=1e-4, atol=1e-4)


def test_nnsight_model_on_cuda():
    """An HF GPT-2 (Conv1D sites) on the GPU wrapped by nnsight: SPD, then reading and editing components in a trace."""
    nnsight = pytest.importorskip("nnsight")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=50))
    model = nnsight.NNsight(gpt2.eval().cuda())
    dec = dh.decompose(model, TOKENS, targets={"transformer.h.*.mlp.c_fc": 12}, config=LM_CONFIG, device="cuda", progress=False)
    assert dec.components["transformer.h.1.mlp.c_fc"].U.is_cuda
    tokens, edit = TOKENS[:4].cuda(), {"transformer.h.0.mlp.c_fc": [0, 3, 5]}
    with model.trace(tokens):
        readout = dec.intervene(model, ablate=edit)
        logits = model.output.logits.save()
    with torch.no_grad():
        by_hand = dec.run(tokens, masks=dec.site_masks(ablate=edit))
    torch.testing.assert_close(logits, by_hand, rtol=1e-4, atol=1e-4)
    assert readout["transformer.h.0.mlp.c_fc"]["ci"].is_cuda
