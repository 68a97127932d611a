"""VPD: persistent adversarial sources (ascent raises the loss, they survive checkpoints bit for bit, each rank keeps
its own), the frequency-minimality term, and the global CI functions (bidirectional over positions, reading every
site)."""
from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import decomp_hooks as dh
from decomp_hooks.config import CIConfig, ConfigError
from decomp_hooks.global_ci import GLOBAL_CI_FUNCTIONS
from decomp_hooks.methods.spd.terms.importance_minimality import importance_minimality, minimality
from decomp_hooks.methods.vpd.config import VPDConfig
from decomp_hooks.methods.vpd.sources import PersistentSources
from decomp_hooks.toy import make_toy, toy_sampler

VPD_5_2 = {
    "method": "vpd",
    "targets": {"linear1": 6, "linear2": 6},
    "tied": [["linear1", "linear2"]],
    "ci": {"type": "mlp", "hidden": [8]},
    "losses": [{"type": "stochastic_recon_subset", "coeff": 1.0}, {"type": "persistent_pgd_recon", "coeff": 1.0},
               {"type": "importance_minimality", "coeff": 3e-3, "pnorm": 1.0},
               {"type": "frequency_minimality", "coeff": 1e-3, "pnorm": 1.0}],
    "vpd": {"lr": 0.05, "lr_warmup_frac": 0.1},
    "train": {"steps": 12, "batch_size": 64, "lr": 1e-3, "faithfulness_warmup_steps": 5, "eval_pgd_steps": 2,
              "log_every": 3, "eval_every": 6, "checkpoint_every": 6},
}


def weights(dec) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dec.cm.named_parameters() if v.requires_grad}


def test_vpd_trains_and_its_sources_move(tms52):
    dec = dh.decompose(tms52, toy_sampler(tms52), config=VPD_5_2, progress=False)
    logged = [r for r in dec.metrics if "train/persistent_pgd_recon" in r]
    assert logged and all(r["train/frequency_minimality"] > 0 for r in logged)
    assert logged[0]["train/adversary_lr"] == 0.0 and logged[-1]["train/adversary_lr"] == pytest.approx(0.05)
    r = dec.method.adversary.r["linear1"]
    assert r.shape == (64, 7) and r.min() >= 0 and r.max() <= 1  # positions × (C + delta)
    assert dec.method.adversary.t == 12 * 3  # 2 warm-up updates and one after each optimizer step


def test_sources_ascend_the_loss():
    """Adam ascent on a loss that grows with r pushes every source up to the clamp at 1."""
    sources = PersistentSources(VPDConfig(lr=0.1, warmup_updates=1))
    r = sources.ensure({"a": (4, 3)}, torch.device("cpu"))["a"]
    for t in range(1, 31):
        sources.ascend({"a": torch.ones_like(r)}, lr=0.1, t=t)
    assert torch.equal(sources.r["a"], torch.ones(4, 3))
    with pytest.raises(ValueError, match="same shape"):
        sources.ensure({"a": (5, 3)}, torch.device("cpu"))


class Crash(RuntimeError):
    pass


def test_persistent_sources_survive_checkpoint_and_resume_bit_for_bit(tms52, tmp_path):
    whole = dh.decompose(tms52, toy_sampler(tms52), config=VPD_5_2, out_dir=tmp_path / "whole", progress=False,
                         evaluate=lambda dec, step: {})

    def crash_at_6(dec, step):  # after the step-6 checkpoint, before the run ends
        if step == 6:
            raise Crash
        return {}

    with pytest.raises(Crash):
        dh.decompose(tms52, toy_sampler(tms52), config=VPD_5_2, out_dir=tmp_path / "cut", progress=False,
                     evaluate=crash_at_6)
    state = load_file(str(tmp_path / "cut" / "checkpoints" / "step-00000006" / "state.safetensors"))
    assert {"method.t", "method.r.linear1", "method.m.linear1", "method.v.linear2"} <= set(state)
    resumed = dh.decompose(tms52, toy_sampler(tms52), config=VPD_5_2, out_dir=tmp_path / "cut", resume=True,
                           progress=False, evaluate=lambda dec, step: {})
    for k, v in weights(whole).items():
        assert torch.equal(weights(resumed)[k], v), k
    for name in ("linear1", "linear2"):
        for part in ("r", "m", "v"):
            assert torch.equal(getattr(resumed.method.adversary, part)[name], getattr(whole.method.adversary, part)[name])
    assert resumed.method.adversary.t == whole.method.adversary.t


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_source_gradient_from_the_main_backward_is_the_adversarial_loss_gradient(tms52, micro_batches):
    """The sources' gradient read after the step's one backward (divided by the term's weight: coefficient over
    micro-batches) equals ∂(adversarial loss)/∂r taken alone, as the ascent needs it."""
    cfg = {**VPD_5_2, "losses": [{**lc, "coeff": 3.0} if lc["type"] == "persistent_pgd_recon" else lc
                                 for lc in VPD_5_2["losses"]],
           "train": {**VPD_5_2["train"], "steps": 1, "micro_batch_size": 64 // micro_batches}}
    dec = dh.decompose(tms52, toy_sampler(tms52), config=cfg, progress=False)
    vpd, losses = dec.method, []
    recon = vpd.recon
    vpd.recon = lambda ctx, masks: losses.append(recon(ctx, masks)) or losses[-1]
    out = vpd.loss(dec.cm, toy_sampler(tms52)(64 // micro_batches), 0.5)
    leaves, _, _ = vpd.pending[-1]
    alone = torch.autograd.grad(losses[-1], list(leaves.values()), retain_graph=True)  # the adversarial loss's
    (out.total / micro_batches).backward()
    assert vpd.weight_in_total == 3.0 / micro_batches
    for leaf, expected in zip(leaves.values(), alone):
        assert expected.abs().max() > 0
        torch.testing.assert_close(vpd._loss_grad(leaf), expected, rtol=1e-5, atol=1e-7)


def test_frequency_minimality_is_the_beta_part_of_importance_minimality(tms52):
    from decomp_hooks.component_model import CausalImportance

    g = torch.rand(32, 5)
    ci = {"a": CausalImportance(g, g), "b": CausalImportance(g.flip(0) ** 2, g.flip(0) ** 2)}
    both = importance_minimality(ci, 0.7, 1e-12, 0.5, 2)
    split = minimality(ci, 0.7, 1e-12, 1.0, 0.0, 2) + 0.5 * minimality(ci, 0.7, 1e-12, 0.0, 1.0, 2)
    torch.testing.assert_close(both, split)


def test_bad_vpd_values_name_the_key():
    with pytest.raises(ConfigError, match=r"vpd.betas=\[0.5, 1.0\]"):
        dh.load_config({**VPD_5_2, "vpd": {"betas": [0.5, 1.0]}})
    with pytest.raises(ConfigError, match="persistent_pgd_recon"):  # SPD has no adversary to keep
        dh.load_config({**VPD_5_2, "method": "spd"})
    no_adversary = [{**lc, "coeff": 0.0} if lc["type"] == "persistent_pgd_recon" else lc for lc in VPD_5_2["losses"]]
    with pytest.raises(ConfigError, match=r"losses\[1\].coeff=0 for persistent_pgd_recon"):
        dh.load_config({**VPD_5_2, "losses": no_adversary})


# -- global CI functions -----------------------------------------------------------------------------------------

def global_fn(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ci = CIConfig(type=kind, hidden=[8], d_model=16, n_blocks=2, n_heads=2)
    return GLOBAL_CI_FUNCTIONS[kind](ci, {"b": 6, "a": 4}, {"a": 3, "b": 5})


def test_global_transformer_is_bidirectional_and_reads_every_site():
    fn = global_fn("global_shared_transformer")
    x = {"a": torch.randn(2, 5, 4), "b": torch.randn(2, 5, 6)}
    z = fn(x)
    assert z["a"].shape == (2, 5, 3) and z["b"].shape == (2, 5, 5)
    later = {**x, "a": x["a"].clone()}
    later["a"][:, 4] += 1.0  # the last position of one site
    z2 = fn(later)
    assert not torch.allclose(z2["b"][:, 0], z["b"][:, 0])  # reaches the first position, at the other site
    other = {**x, "b": x["b"].clone()}
    other["b"][1] += 1.0  # the second sequence only
    z3 = fn(other)
    assert not torch.allclose(z3["a"][1], z["a"][1]) and torch.allclose(z3["a"][0], z["a"][0])  # sequences apart


def test_global_mlp_reads_every_site_at_each_position_alone():
    fn = global_fn("global_shared_mlp")
    x = {"a": torch.randn(2, 5, 4), "b": torch.randn(2, 5, 6)}
    z = fn(x)
    moved = {**x, "b": x["b"].clone()}
    moved["b"][:, 4] += 1.0
    z2 = fn(moved)
    assert not torch.allclose(z2["a"][:, 4], z["a"][:, 4]) and torch.allclose(z2["a"][:, :4], z["a"][:, :4])


def test_global_ci_trains_on_a_toy_and_refuses_token_sites(tms52):
    cfg = {**VPD_5_2, "ci": {"type": "global_shared_transformer", "d_model": 16, "n_blocks": 1, "n_heads": 2}}
    dec = dh.decompose(tms52, toy_sampler(tms52), config=cfg, steps=4, progress=False)
    ci = dec.causal_importance(toy_sampler(tms52)(8))
    assert ci["linear1"].shape == (8, 6) and list(dec.cm.ci_fns) == ["_global"]
    with pytest.raises(ConfigError, match="multiple of 2"):
        dh.load_config({**cfg, "ci": {"type": "global_shared_transformer", "d_model": 10, "n_heads": 2}})


# -- two ranks ---------------------------------------------------------------------------------------------------

def _rank(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", HF_HUB_OFFLINE="1")
    from decomp_hooks.distributed import shutdown

    model, _ = make_toy("tms_5-2", seed=0, steps=300, progress=False)
    cfg = {**VPD_5_2, "train": {**VPD_5_2["train"], "keep_checkpoints": 3}}
    run = os.path.join(tmp, "run")
    dec = dh.decompose(model, toy_sampler(model), config=cfg, out_dir=run, progress=False)
    save_file({**weights(dec), "r": dec.method.adversary.r["linear1"].clone()}, os.path.join(tmp, f"rank{rank}.safetensors"))
    dist.barrier()
    if rank == 0:  # back to the step-6 checkpoint, as after a crash
        for later in sorted(os.listdir(os.path.join(run, "checkpoints")))[1:]:
            shutil.rmtree(os.path.join(run, "checkpoints", later))
    dist.barrier()
    resumed = dh.decompose(model, toy_sampler(model), config=cfg, out_dir=run, resume=True, progress=False)
    save_file({**weights(resumed), "r": resumed.method.adversary.r["linear1"].clone()},
              os.path.join(tmp, f"resumed{rank}.safetensors"))
    dist.barrier()
    shutdown()
    os._exit(0)


def test_two_ranks_keep_their_own_sources_and_checkpoint_both(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a["r"].shape == (32, 7)  # each rank's half of the global batch
    assert not torch.equal(a["r"], b["r"])  # sources are per rank, not synchronised
    for k in a:
        if k != "r":
            torch.testing.assert_close(a[k], b[k])  # DDP keeps the model in step
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    for rank, r in ((0, a["r"]), (1, b["r"])):  # each rank wrote its own file; no tensor of it passed through rank 0
        assert torch.equal(load_file(str(last / f"rank{rank}.method.safetensors"))["r.linear1"], r)
    assert not any(k.startswith(("method.", "rank")) for k in load_file(str(last / "state.safetensors")) if "rng" not in k)
    assert not list((tmp_path / "run" / "checkpoints").glob(".method-step-*"))  # staging folders are moved in
    for rank, whole in ((0, a), (1, b)):  # each rank resumed its own sources from its file: bit for bit
        resumed = load_file(str(tmp_path / f"resumed{rank}.safetensors"))
        assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_paper_4l_recipe_names_the_papers_components_on_its_architecture():
    """lm/vpd_paper_4l on the paper's 4-layer GELU-MLP Llama shape (vocabulary cut to 64): its 24 matrices with the
    paper's C per matrix, 38,912 in all, and the paper's CI function and coefficients."""
    from decomp_hooks.adapters import resolve
    from decomp_hooks.toy.lm import SimpleLlamaConfig, SimpleLlamaForCausalLM

    cfg = dh.load_config("lm/vpd_paper_4l")
    shape = SimpleLlamaConfig(vocab_size=64, hidden_size=768, num_hidden_layers=4, num_attention_heads=6,
                              intermediate_size=3072, max_position_embeddings=512)
    with torch.device("meta"):
        model = SimpleLlamaForCausalLM(shape)
    _, sites, cs = resolve(model, cfg.targets)
    assert len(sites) == 24 and sum(cs.values()) == 38_912
    assert {n.rsplit(".", 1)[-1]: c for n, c in cs.items()} == {
        "q_proj": 512, "k_proj": 512, "v_proj": 1024, "o_proj": 1024, "c_fc": 3072, "down_proj": 3584}
    assert (cfg.ci.type, cfg.ci.d_model, cfg.ci.n_blocks, cfg.ci.n_heads, cfg.ci.d_ffn) == (
        "global_shared_transformer", 2048, 8, 16, 8192)
    assert {lc.type: lc.coeff for lc in cfg.losses} == {
        "faithfulness": 1e7, "stochastic_recon_subset": 0.5, "persistent_pgd_recon": 0.5, "importance_minimality": 2e-4}
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.context_length) == (400_000, 64, 512)
