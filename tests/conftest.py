"""Shared fixtures: offline hub, one torch thread for tiny models, subprocesses that end with their test, a quickly
trained TMS 5-2 target, the GPT-2 tokenizer."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPD_5_2 = {
    "targets": {"linear1": 20, "linear2": 20},
    "tied": [["linear1", "linear2"]],
    "ci": {"type": "mlp", "hidden": [16]},
    "losses": [
        {"type": "stochastic_recon", "coeff": 1.0},
        {"type": "stochastic_recon_layerwise", "coeff": 1.0},
        {"type": "importance_minimality", "coeff": 3e-3, "pnorm": 1.0},
    ],
    "train": {"steps": 20, "batch_size": 256, "lr": 1e-3, "log_every": 5, "eval_every": 10, "checkpoint_every": 10},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: one thread avoids intra-op sync costs on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spawn():
    """`subprocess.Popen` for a test: whatever is still running when the test ends (a failed assertion included) is
    killed, so no run outlives its test and slows the next ones."""
    procs: list[subprocess.Popen] = []

    def start(*args, **kwargs) -> subprocess.Popen:
        procs.append(subprocess.Popen(*args, **kwargs))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tms52():
    from decomp_hooks.toy import make_toy

    model, _ = make_toy("tms_5-2", seed=0, progress=False)
    return model


@pytest.fixture
def spd_config():
    import copy

    return copy.deepcopy(SPD_5_2)


@pytest.fixture(scope="session")
def tokenizer():
    """The GPT-2 BPE tokenizer from an installed package (offline); tests skip where the package is missing."""
    from decomp_hooks.assets import gpt2_tokenizer

    try:
        return gpt2_tokenizer()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
