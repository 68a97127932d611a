"""Harvest: counts, co-firing, top contexts and token PMI equal a brute-force computation over the same data; the
bounded token summaries keep their error bound; accumulator sizes do not depend on the tokens; a stopped harvest
resumes bit for bit; SIGKILL at any point leaves the output whole (a checkpoint) or absent; bad directories are
refused naming the file; dashboards and the commands read it."""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from click.testing import CliRunner  # noqa: E402

import decomp_hooks as dh  # noqa: E402
from decomp_hooks import store  # noqa: E402
from decomp_hooks.activations import site_batches  # noqa: E402
from decomp_hooks.cli import main  # noqa: E402
from decomp_hooks.dashboard import DashboardConfig, DashboardError, build_dashboards  # noqa: E402
from decomp_hooks.dashboard.statistics import add_cofiring  # noqa: E402
from decomp_hooks.harvest import HarvestConfig, HarvestError  # noqa: E402
from decomp_hooks.harvest.accumulate import PAD, DenseCounts, FrequentCounts, TokenPMI  # noqa: E402
from faults import kill_when  # noqa: E402

CONFIG = {
    "ci": {"type": "mlp", "hidden": [4]},
    "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3}],
    "output_loss": "kl", "ci_alive_threshold": 0.1,
    "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 10, "eval_every": 1000, "checkpoint_every": 1000,
              "faithfulness_warmup_steps": 0, "eval_pgd_steps": 0},
}
TARGETS = {"transformer.h.0.mlp.c_fc": 6, "transformer.h.0.mlp.c_proj": 5}
VOCAB = 23  # small, so tokens repeat and PMI has counts to rank
TOKENS = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(3))
SMALL = HarvestConfig(batch_size=5, top_k=4, window=3, pmi_top=6, checkpoint_every=1)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = dh.decompose(model, TOKENS, targets=TARGETS, config=CONFIG, progress=False)
    return model, dec


@pytest.fixture(scope="module")
def harvested(lm, tmp_path_factory):
    _, dec = lm
    return dh.harvest(dec, TOKENS, None, tmp_path_factory.mktemp("h") / "h", SMALL, progress=False)


def brute_force(dec, batch_size):
    """CI and activations `[positions, N]` of every component in harvest order, from the same batches."""
    names = dec.site_names
    parts = [site_batches(dec, names, b) for b in TOKENS.split(batch_size)]
    return [torch.cat([torch.cat([p[n].ci if f == "ci" else p[n].acts for n in names], 1) for p in parts])
            for f in ("ci", "acts")]


def direct_pmi(fire, tokens):
    """PMI `[N, V]` of each token with each component's firing, counted directly (−inf where never together)."""
    onehot = torch.nn.functional.one_hot(tokens, VOCAB).double()
    joint, n_c, n_t = fire.double().T @ onehot, fire.double().sum(0), onehot.sum(0)
    pmi = (joint * len(tokens) / (n_c[:, None] * n_t[None, :])).log()
    return torch.where(joint > 0, pmi, float("-inf"))


def test_counts_top_contexts_and_pmi_equal_brute_force(lm, harvested):
    _, dec = lm
    ci, acts = brute_force(dec, SMALL.batch_size)
    fire = ci > 0.1
    h = harvested
    assert h.tokens == TOKENS.numel() and h.meta["token_counts"] == "dense"
    assert torch.equal(h.count, fire.double().sum(0)) and torch.equal(h.coact, fire.double().T @ fire.double())
    assert torch.equal(h.density, fire.double().mean(0))
    assert h.components == [(n, c) for n in TARGETS for c in range(TARGETS[n])]
    key = torch.where(fire, (ci * acts).abs(), float("-inf"))
    expected = key.topk(SMALL.top_k, dim=0)
    for i, (site, c) in enumerate(h.components):
        examples = h.top_examples(site, c)
        n_fire = int(fire[:, i].sum())
        assert len(examples) == min(n_fire, SMALL.top_k)
        assert [e["rank"] for e in examples] == expected.values[:len(examples), i].tolist()
        positions = [e["position"] for e in examples]  # distinct positions, each of the rank kept (ties: any of them)
        assert len(set(positions)) == len(positions) and key[positions, i].tolist() == [e["rank"] for e in examples]
        for e in examples:
            seq, t = divmod(e["position"], TOKENS.shape[1])
            lo, hi = max(0, t - SMALL.window), min(TOKENS.shape[1], t + SMALL.window + 1)
            assert e["tokens"] == TOKENS[seq, lo:hi].tolist() and e["q"] == t - lo
            assert e["ci"][e["q"]] == ci[e["position"], i] and e["acts"][e["q"]] == acts[e["position"], i]
    for side, f, toks in (("input", fire, TOKENS.reshape(-1)),
                          ("output", fire.reshape(12, 16, -1)[:, :-1].reshape(-1, fire.shape[1]),
                           TOKENS[:, 1:].reshape(-1))):
        pmi = direct_pmi(f, toks)
        for i, (site, c) in enumerate(h.components):
            top = h.pmi(site, c, side)
            finite = pmi[i][pmi[i] > float("-inf")]
            assert len(top) == min(SMALL.pmi_top, len(finite))
            assert [v for _, v in top] == pytest.approx(finite.sort(descending=True).values[:len(top)].tolist(),
                                                        rel=1e-6)
            assert all(v == pytest.approx(float(pmi[i, t]), rel=1e-6) for t, v in top)


def test_pmi_on_a_tiny_case_and_bounded_summaries():
    fire = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0], [0, 1]], dtype=torch.bool)
    tokens = torch.tensor([2, 2, 0, 1, 2])  # 5 positions: token 2 three times, 0 and 1 once
    for kind in ("dense", "frequent"):
        acc = TokenPMI(2, 3, kind, 3)
        acc.update(fire[:2], tokens[:2])
        acc.update(fire[2:], tokens[2:])
        top, values = acc.top(3)
        # component 0 fires 3 times, at tokens 2, 2, 1: PMI(1) = log(1·5 / (3·1)), PMI(2) = log(2·5 / (3·3))
        assert top[0].tolist() == [1, 2, PAD] and values[0, :2].tolist() == pytest.approx([math.log(5 / 3),
                                                                                           math.log(10 / 9)])
        assert top[1].tolist() == [0, 2, PAD]  # fires at tokens 2, 0, 2
    g = torch.Generator().manual_seed(0)
    component = torch.randint(0, 3, (4000,), generator=g)
    token = (torch.rand(4000, generator=g) ** 3 * 50).long()  # skewed: a few frequent tokens, a long tail
    dense, exact, small = DenseCounts(3, 50, 0), FrequentCounts(3, 50, 50), FrequentCounts(3, 50, 8)
    for i in range(0, 4000, 300):
        for acc in (dense, exact, small):
            acc.update(component[i:i + 300], token[i:i + 300])
    for acc in (exact, small):
        tokens, counts = acc.candidates()
        estimate = torch.zeros(3, 50, dtype=torch.float64).scatter_add_(1, tokens.clamp_min(0), counts)
        bound = dense.counts.sum(1, keepdim=True) / (acc.size + 1)
        assert torch.all(estimate <= dense.counts) and torch.all(dense.counts - estimate <= bound)
        assert torch.all((estimate > 0) | (dense.counts <= bound))  # every token above n_c/(size+1) is kept
        if acc is exact:  # a summary as large as the vocabulary is exact
            assert torch.equal(estimate, dense.counts)


def test_cofiring_by_pairs_equals_the_dense_product():
    g = torch.Generator().manual_seed(1)
    for density in (0.02, 0.6):  # the pair path and the matmul path
        fire = torch.rand(300, 40, generator=g) < density
        coact = torch.zeros(40, 40, dtype=torch.float64)
        add_cofiring(coact, fire)
        assert torch.equal(coact, fire.double().T @ fire.double())


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return {f"{p.stem}/{k}": v for p in sorted(path.glob("*.safetensors")) for k, v in store.read_tensors(p).items()}


def assert_same_harvest(a: Path, b: Path) -> None:
    """Bit for bit: every tensor, and harvest.json but for the timings."""
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta
                                                                                   if not torch.equal(ta[k], tb[k])]
    untimed = [{k: v for k, v in store.read_json(p / "harvest.json").items() if k not in ("seconds", "tokens_per_s")}
               for p in (a, b)]
    assert untimed[0] == untimed[1]


class Stopping:
    """The rows of TOKENS one batch at a time, raising after `stop` batches (an interrupted run)."""

    def __init__(self, stop: int | None = None):
        self.stop = stop

    def __iter__(self):
        for i, row in enumerate(TOKENS.split(2)):
            if i == self.stop:
                raise KeyboardInterrupt
            yield row


def test_a_stopped_harvest_resumes_bit_for_bit(lm, tmp_path):
    _, dec = lm
    cfg = HarvestConfig(top_k=3, window=2, pmi_top=5, checkpoint_every=2, token_counts="frequent", summary_size=4)
    dh.harvest(dec, Stopping(), 150, tmp_path / "straight", cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        dh.harvest(dec, Stopping(stop=4), 150, tmp_path / "resumed", cfg, progress=False)
    with pytest.raises(store.StoreError, match="unfinished harvest .*64 of 150 tokens.*resume"):
        dh.load_harvest(tmp_path / "resumed")  # the checkpoint after 2 batches (the next was due after 4)
    with pytest.raises(HarvestError, match="unfinished harvest; pass resume=True"):
        dh.harvest(dec, Stopping(), 150, tmp_path / "resumed", cfg, progress=False)
    with pytest.raises(HarvestError, match="its config differs"):
        dh.harvest(dec, Stopping(), 150, tmp_path / "resumed", HarvestConfig(checkpoint_every=2), resume=True,
                   progress=False)
    h = dh.harvest(dec, Stopping(), 150, tmp_path / "resumed", cfg, resume=True, progress=False)
    assert h.tokens == 160 and h.meta["batches"] == 5  # 150 tokens rounded up to 10 sequences of 16
    assert_same_harvest(tmp_path / "straight", tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        dh.harvest(dec, Stopping(stop=4), 150, tmp_path / "other", cfg, progress=False)
    with pytest.raises(HarvestError, match="batch 1 of the data differs"):
        dh.harvest(dec, TOKENS.roll(1, 0).split(2), 150, tmp_path / "other", cfg, resume=True, progress=False)


def test_memory_does_not_grow_with_the_tokens(lm, tmp_path):
    _, dec = lm
    shapes = []
    for n in (32, 192):
        dh.harvest(dec, TOKENS, n, tmp_path / str(n), SMALL, progress=False)
        shapes.append({k: v.shape for k, v in tensors_of(tmp_path / str(n)).items()})
    assert shapes[0] == shapes[1] and shapes[0]["cofiring/coact"] == (11, 11)
    assert store.read_json(tmp_path / "32" / "harvest.json")["tokens"] == 32


def test_bad_directories_are_refused_naming_the_file(harvested, tmp_path):
    import shutil

    for case in ("missing", "truncated", "foreign"):
        bad = tmp_path / case
        shutil.copytree(harvested.path, bad)
        (bad / store.MARKER).unlink()  # no manifest: the loader's own checks must catch each case
        if case == "missing":
            (bad / "examples.safetensors").unlink()
            match = "missing file .*examples.safetensors"
        elif case == "truncated":
            data = (bad / "cofiring.safetensors").read_bytes()
            (bad / "cofiring.safetensors").write_bytes(data[:len(data) // 2])
            match = "cofiring.safetensors.*truncated"
        else:
            meta = json.loads((bad / "harvest.json").read_text())
            (bad / "harvest.json").write_text(json.dumps({**meta, "format": "something-else"}))
            match = "harvest.json.*not a decomp-hooks harvest"
        with pytest.raises(store.StoreError, match=match):
            dh.load_harvest(bad)
    other = tmp_path / "shapes"
    shutil.copytree(harvested.path, other)
    (other / store.MARKER).unlink()
    meta = json.loads((other / "harvest.json").read_text())
    (other / "harvest.json").write_text(json.dumps({**meta, "config": {**meta["config"], "top_k": 9}}))
    with pytest.raises(store.StoreError, match=r"examples.safetensors.*\['acts', 'ci', 'position', 'rank', 'tokens'\]"):
        dh.load_harvest(other)
    with pytest.raises(store.StoreError, match="missing file .*harvest.json"):
        dh.load_harvest(tmp_path)


def test_dashboards_read_the_harvest(lm, harvested, tmp_path):
    _, dec = lm
    pages = build_dashboards(dec, None, tmp_path / "dash", harvest=harvested.path, progress=False)
    for site, page in pages.items():
        html = page.read_text()
        sections = [int(c) for c in re.findall(r'<section class="card component" id="c(\d+)"', html)]
        span = harvested.span(site)
        assert sorted(sections) == torch.nonzero(harvested.count[span] > 0).flatten().tolist()
        assert html.count("input tokens (PMI, nats)") == len(sections) and f"{TOKENS.numel()} tokens" in html
        npj = store.read_json(tmp_path / "dash" / f"{site}.neuronpedia.json")
        for feature in npj["features"]:
            expected = harvested.top_examples(site, feature["feature_index"])
            assert [a["qualifying_token_index"] for a in feature["activations"]] == [e["q"] for e in expected]
    scanned = build_dashboards(dec, TOKENS, tmp_path / "scan", progress=False,
                               config=DashboardConfig(batch_size=SMALL.batch_size, n_examples=4))
    for site, page in scanned.items():  # the same components and firing figures as the dashboards' own pass
        assert re.findall(r'id="c(\d+)"', page.read_text()) == re.findall(r'id="c(\d+)"', pages[site].read_text())
    other = dh.decompose(lm[0], TOKENS, targets={"transformer.h.0.mlp.c_fc": 3}, config=CONFIG, progress=False)
    with pytest.raises(DashboardError, match="another decomposition"):
        build_dashboards(other, None, tmp_path / "bad", harvest=harvested, progress=False)


def test_compare_reads_the_harvest(lm, harvested, tmp_path):
    from decomp_hooks.dashboard import CompareConfig, compare_with_sae

    _, dec = lm
    site = "transformer.h.0.mlp.c_fc"
    sae = dec.export(tmp_path / "sae", sites=site)[site]
    cfg = CompareConfig(batch_size=SMALL.batch_size, n_examples=4)
    scanned = compare_with_sae(dec, site, sae, TOKENS, config=cfg, progress=False)
    read = compare_with_sae(dec, site, sae, TOKENS, out=tmp_path / "cmp", config=cfg, progress=False,
                            harvest=harvested.path)
    assert torch.equal(read.comp_freq, harvested.density[harvested.span(site)].float())
    assert torch.allclose(read.comp_freq, scanned.comp_freq) and read.summary() == scanned.summary()
    assert (tmp_path / "cmp" / "compare.html").is_file()
    other = dh.decompose(lm[0], TOKENS, targets={"transformer.h.0.mlp.c_fc": 3}, config=CONFIG, progress=False)
    with pytest.raises(DashboardError, match="another decomposition"):
        compare_with_sae(other, site, sae, TOKENS, progress=False, harvest=harvested)


@pytest.fixture(scope="module")
def lm_run(lm, tmp_path_factory):
    model, dec = lm
    root = tmp_path_factory.mktemp("lm_run")
    model.save_pretrained(root / "model")
    dec.save(root / "run" / "decomposition")
    store.write_tensors(root / "tokens.safetensors", {"tokens": TOKENS})
    return root


def harvest_args(lm_run: Path, out: Path) -> list[str]:
    return ["harvest", str(lm_run / "run"), "--model", str(lm_run / "model"), "--data",
            str(lm_run / "tokens.safetensors"), "--out", str(out), "--batch-size", "3", "--checkpoint-every", "1",
            "--top-k", "4", "--window", "3", "--no-progress"]


def test_harvest_and_dashboard_commands(lm_run, tmp_path):
    out = tmp_path / "h"
    result = CliRunner().invoke(main, harvest_args(lm_run, out) + ["--tokens", "100"])
    assert result.exit_code == 0, result.output
    assert re.search(r"harvested 112 tokens \(7 sequences of 16\) over 11 components at [\d,]+ tokens/s", result.output)
    again = CliRunner().invoke(main, harvest_args(lm_run, out) + ["--tokens", "100"])
    assert again.exit_code == 1 and "not empty" in again.output and "--force" in again.output
    dash = ["dashboard", str(lm_run / "run"), "--model", str(lm_run / "model"), "--out", str(tmp_path / "d"),
            "--no-progress"]
    assert CliRunner().invoke(main, dash).exit_code == 2  # neither --data nor --harvest
    shown = CliRunner().invoke(main, dash + ["--harvest", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "PMI" in (tmp_path / "d" / "transformer.h.0.mlp.c_fc.html").read_text()


def batches_in(out: Path) -> int:
    """Batches read by the checkpoint in `out` (every file of it checked against its manifest), −1 if none."""
    if not out.exists():
        return -1
    for rel in store.read_json(out / store.MARKER)["files"]:
        store.verify(out / rel)
    return store.read_json(out / "harvest.json")["batches"]


def test_sigkill_never_leaves_a_half_written_harvest(lm_run, tmp_path):
    out = tmp_path / "h"
    args = harvest_args(lm_run, out)
    half = lambda tmps, _: any((t / "cofiring.safetensors").is_file() for t in tmps)  # noqa: E731
    kill_when(args, out, half)  # in the first checkpoint, half written
    assert not out.exists()
    kill_when(args + ["--resume"], out, lambda tmps, o: batches_in(o) >= 2 and half(tmps, o))  # replacing a checkpoint
    assert batches_in(out) >= 2
    with pytest.raises(store.StoreError, match="unfinished"):
        dh.load_harvest(out)
    final = lambda tmps, _: any('"complete": true' in (t / "harvest.json").read_text()  # noqa: E731
                                for t in tmps if (t / "harvest.json").is_file())
    kill_when(args + ["--resume"], out, final)  # written in full, not yet in place
    assert batches_in(out) == 3  # the last checkpoint, whole
    assert CliRunner().invoke(main, args + ["--resume"]).exit_code == 0
    assert CliRunner().invoke(main, harvest_args(lm_run, tmp_path / "straight")).exit_code == 0
    assert_same_harvest(tmp_path / "straight", out)
