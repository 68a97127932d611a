"""Data parallelism over 2 CPU processes (gloo), against the same run in one process with the same global batch.

Every rank draws the same global batch and keeps its half, and DDP averages the gradients, so with deterministic loss
terms (CI-masked reconstructions, faithfulness, importance minimality) the 2-rank run equals the 1-rank run to float
tolerance, step by step. Stochastic masks come from per-rank seeds `seed·W + rank` (docs/multi-gpu.md#seeds), so they
differ between the ranks and from the 1-rank run: there the reduced loss matches in distribution, not bitwise.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from decomp_hooks.config import config_path

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TRAIN = {"steps": 6, "batch_size": 32, "lr": 1e-2, "log_every": 1, "eval_every": 3, "checkpoint_every": 3,
         "keep_checkpoints": 3, "faithfulness_warmup_steps": 10, "eval_pgd_steps": 0}
DETERMINISTIC = [{"type": "faithfulness", "coeff": 1.0}, {"type": "ci_masked_recon", "coeff": 1.0},
                 {"type": "ci_masked_recon_layerwise", "coeff": 1.0}]
#: PGD with one source shared by the global batch: deterministic init, so ranks agree only if they share the source
#: and ascend along the rank-averaged source gradient
PGD_SHARED = {"type": "pgd_recon", "coeff": 1.0, "init": "zeroes", "n_steps": 2, "step_size": 0.3,
              "mask_scope": "shared_across_batch"}
#: case -> (method, importance-minimality β, data whose two halves are identical, FSDP2 instead of DDP)
CASES = {"split": ("spd", 0.0, False, False), "log_term": ("spd", 0.5, True, False), "fsdp": ("spd", 0.0, False, True),
         "apd": ("apd", 0.0, False, False), "apd_batch_topk": ("apd", 0.0, False, False), "pgd_shared": ("spd", 0.0, False, False)}
N_DRAWS = 200


class Blocks(nn.Module):
    """Two residual MLP blocks in a ModuleList and a head: FSDP2 shards each block, then the rest."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)) for _ in range(2))
        self.head = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def model(blocks: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Blocks() if blocks else nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))


def config(method: str, beta: float, fsdp: bool = False, pgd: bool = False, batch_topk: bool = False) -> dict:
    """SPD with deterministic terms, or APD with per-sample or batch top-k (which ranks the whole global batch)."""
    targets = {"blocks.*.0": 8, "head": 4} if fsdp else {"0": 8, "2": 8}
    if method == "apd":
        return {"method": "apd", "targets": {"0": 4, "2": 4}, "train": TRAIN,
                "apd": {"topk": 1.0, "batch_topk": batch_topk, "unit_norm_matrices": True}}
    imp = {"type": "importance_minimality", "coeff": 1e-2, "pnorm": 1.0, "beta": beta}
    return {"targets": targets, "ci": {"type": "mlp", "hidden": [8]}, "losses": [*DETERMINISTIC, imp, *([PGD_SHARED] if pgd else [])],
            "train": {**TRAIN, "fsdp": fsdp}}


def data(halves: bool) -> torch.Tensor | list[torch.Tensor]:
    """Distinct rows (shuffled by TensorSource), or a list of global batches whose two halves are the same rows,
    so each rank's μ equals the global μ and only the N·W scaling of the log term can tell 2 ranks from 1."""
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    return [torch.cat([h, h]) for h in x.split(16)] if halves else x


def run(case: str, out):
    import decomp_hooks as dh

    method, beta, halves, fsdp = CASES[case]
    return dh.decompose(model(fsdp), data(halves), config=config(method, beta, fsdp, case == "pgd_shared", case == "apd_batch_topk"),
                        out_dir=out, progress=False)


def state(dec) -> dict[str, torch.Tensor]:
    from decomp_hooks.distributed import full

    return {k: full(v).detach().clone().contiguous() for k, v in dec.cm.named_parameters() if v.requires_grad}


def stochastic_draws(dec, world_size: int, rank: int) -> torch.Tensor:
    """N_DRAWS values of the stochastic reconstruction loss on a fixed global batch at the trained parameters,
    each averaged over the ranks (each rank masks its own half)."""
    from decomp_hooks.config import LossConfig
    from decomp_hooks.distributed import slice_batch
    from decomp_hooks.methods.spd.method import SPD

    spd = SPD(dec.config, world_size=world_size)
    batch = slice_batch(data(False)[:32], rank, world_size)
    lc = LossConfig(type="stochastic_recon")
    with torch.no_grad():
        ctx = spd.prepare(dec.cm, batch)
        values = torch.stack([spd.term(lc, ctx, 1.0) for _ in range(N_DRAWS)])
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values


def _worker(rank: int, port: int, tmp: str) -> None:
    """One torchrun-like rank: the environment torchrun sets, then the ordinary decompose() call."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", HF_HUB_OFFLINE="1")
    from decomp_hooks.data import make_source
    from decomp_hooks.distributed import current, shard_source, shutdown

    runs = {case: run(case, os.path.join(tmp, f"ddp-{case}")) for case in CASES}
    for case, done in runs.items():
        save_file(state(done), os.path.join(tmp, f"{case}-rank{rank}.safetensors"))
    dec = runs["log_term"]
    # resume the split run from its step-3 checkpoint (each rank restores its own RNG stream)
    import shutil

    import decomp_hooks as dh

    ckpts = os.path.join(tmp, "ddp-split", "checkpoints")
    dist.barrier()
    if rank == 0:
        for later in sorted(os.listdir(ckpts))[1:]:
            shutil.rmtree(os.path.join(ckpts, later))
    dist.barrier()
    resumed = dh.decompose(model(), data(False), config=config("spd", 0.0), out_dir=os.path.join(tmp, "ddp-split"),
                           resume=True, progress=False)
    save_file(state(resumed), os.path.join(tmp, f"resumed-rank{rank}.safetensors"))
    save_file({"batch": shard_source(make_source(data(False), 32, 0), current()).next()},
              os.path.join(tmp, f"batch-rank{rank}.safetensors"))
    save_file({"draws": stochastic_draws(dec, 2, rank)}, os.path.join(tmp, f"draws-rank{rank}.safetensors"))
    # the two ranks hold the same rows here (identical halves); per-rank seeds still give them different masks
    from decomp_hooks.config import LossConfig
    from decomp_hooks.methods.spd.method import SPD

    spd = SPD(dec.config, world_size=2)
    with torch.no_grad():
        ctx = spd.prepare(dec.cm, data(True)[0][:16])
        mine = spd.term(LossConfig(type="stochastic_recon"), ctx, 1.0)
    both = [torch.zeros(()), torch.zeros(())]
    dist.all_gather(both, mine.reshape(()))
    save_file({"losses": torch.stack(both)}, os.path.join(tmp, f"same-rows-rank{rank}.safetensors"))
    shutdown()
    # Everything is on disk. Skip interpreter teardown: gloo work objects still referenced by the runs' DDP reducers
    # can abort the process while Python finalizes (SIGABRT, "terminate called without an active exception"; seen
    # once on a loaded 2-core machine, after every file above had been written).
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp)), nprocs=2, join=True)
    return tmp


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_ranks, tmp_path, case):
    single = run(case, tmp_path / "single")
    ref = state(single)
    for rank in (0, 1):
        got = load_file(str(two_ranks / f"{case}-rank{rank}.safetensors"))
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"rank {rank}, {k}")
    # rank 0 alone wrote; its logged losses are the mean over ranks, i.e. the global batch's losses
    one, two = metrics(tmp_path / "single"), metrics(two_ranks / f"ddp-{case}")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        for k in ("train/total", "train/importance_minimality", "eval/ci_recon", "eval/faithfulness", "eval/topk_recon"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (k, a["step"])
    ckpt = sorted((two_ranks / f"ddp-{case}" / "checkpoints").glob("step-*"))[-1]
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["world_size"] == 2 and len(meta["rng"]) == 2
    assert json.loads((two_ranks / f"ddp-{case}" / "decomposition" / "decomposition.json").read_text())


def test_two_rank_resume_continues_the_run(two_ranks):
    for rank in (0, 1):
        got = load_file(str(two_ranks / f"resumed-rank{rank}.safetensors"))
        want = load_file(str(two_ranks / f"split-rank{rank}.safetensors"))
        for k in want:
            assert torch.equal(got[k], want[k]), (rank, k)  # bit for bit
    # train records at steps 0-5 and evaluations at 0, 3, 6, none duplicated by the resume
    assert [r["step"] for r in metrics(two_ranks / "ddp-split")] == [0, 0, 1, 2, 3, 3, 4, 5, 6]


def test_each_rank_gets_its_half_of_the_global_batch(two_ranks):
    from decomp_hooks.data import make_source

    whole = make_source(data(False), 32, 0).next()
    halves = [load_file(str(two_ranks / f"batch-rank{r}.safetensors"))["batch"] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole) and not torch.equal(halves[0], halves[1])


def test_log_term_uses_the_world_size(two_ranks, tmp_path):
    """Without the W in log₂(1 + N·W·μ) the 2-rank run (N halved) would leave the 1-rank run; check it would."""
    from decomp_hooks.component_model import CausalImportance
    from decomp_hooks.methods.spd.terms.importance_minimality import importance_minimality

    g = torch.rand(16, 8)
    whole = importance_minimality({"s": CausalImportance(torch.cat([g, g]), torch.cat([g, g]))}, 1.0, 1e-12, 0.5, 1)
    half = {"s": CausalImportance(g, g)}
    assert importance_minimality(half, 1.0, 1e-12, 0.5, 2) == pytest.approx(whole.item(), rel=1e-6)
    assert importance_minimality(half, 1.0, 1e-12, 0.5, 1) != pytest.approx(whole.item(), rel=1e-3)


def test_stochastic_masks_match_in_distribution(two_ranks, tmp_path):
    single = run("log_term", tmp_path / "single")
    one = stochastic_draws(single, 1, 0)
    two = load_file(str(two_ranks / "draws-rank0.safetensors"))["draws"]
    assert torch.equal(two, load_file(str(two_ranks / "draws-rank1.safetensors"))["draws"])  # reduced: same on both
    assert not torch.equal(one, two)  # different mask draws ...
    se = ((one.var() + two.var()) / N_DRAWS).sqrt()
    assert abs(one.mean() - two.mean()) < 5 * se  # ... from the same distribution
    assert 0.6 < (two.std() / one.std()).item() < 1.6
    same_rows = load_file(str(two_ranks / "same-rows-rank0.safetensors"))["losses"]
    assert same_rows[0] != same_rows[1]  # same rows on both ranks, different masks: the seeds differ per rank


def test_cli_nproc_launches_torchrun(tmp_path):
    """`decomp-hooks decompose --nproc 2` relaunches itself under torchrun; rank 0 writes one run directory."""
    from decomp_hooks.toy import make_toy, save_toy

    toy = tmp_path / "toy"
    save_toy(make_toy("tms_5-2", steps=50, progress=False)[0], toy)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_path("tms_5-2").read_text().replace("toy: tms_5-2", f"path: {toy}")
                   .replace("batch_size: 4096", "batch_size: 64"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "decomp_hooks.cli", "decompose", str(cfg), "--nproc", "2", "--steps",
                           "4", "--out", str(out), "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ground truth (") == 1  # only rank 0 reports
    dec = json.loads((out / "decomposition" / "decomposition.json").read_text())
    assert dec["provenance"]["world_size"] == 2
    assert metrics(out)[-1]["step"] == 4
