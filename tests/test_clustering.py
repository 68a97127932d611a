"""The MDL merge of components by co-firing: exact OR semantics after merges, ΔL against a brute-force L, recovery of
ground-truth groups, determinism, the streaming pass over a decomposition, harvest input, clusters.json, the cluster
page and the CLI."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

import decomp_hooks as dh
from decomp_hooks.clustering import (ClusterConfig, ClusterError, as_words, description_length,
                                     firing_from_decomposition, firing_from_matrix, merge_costs, pack_bits, popcount,
                                     popcount_swar, read_clusters)
from decomp_hooks.dashboard.clusters import write_cluster_page


def planted(sizes: list[int], tokens: int = 3000, p: float = 0.08, seed: int = 0) -> tuple[torch.Tensor, list[set]]:
    """A firing matrix `[T, N]` of groups whose members always fire together, the groups firing independently;
    columns shuffled. Returns it and the groups as sets of column indices."""
    g = torch.Generator().manual_seed(seed)
    group_fires = torch.rand(tokens, len(sizes), generator=g) < p
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    order = torch.randperm(len(owner), generator=g)
    owner = owner[order]
    groups = [set((owner == i).nonzero().flatten().tolist()) for i in range(len(sizes))]
    return group_fires[:, owner], groups


def brute_L(fired: torch.Tensor, groups: list[list[int]], alpha: float) -> float:
    """L = Σ_g s_g (log2 k + α r_g) with s_g the OR-firing count of group g, straight from the definition."""
    k = len(groups)
    return sum(float(fired[:, g].any(1).sum()) * (math.log2(k) + alpha * len(g)) for g in groups)


def test_packed_bits_and_popcount_count_exactly():
    fired = torch.rand(137, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    bits = as_words(pack_bits(fired))  # [N, ⌈T/64⌉] int64
    assert bits.shape == (5, 3) and bits.dtype == torch.int64
    torch.testing.assert_close(popcount(bits), fired.sum(0))
    torch.testing.assert_close(popcount(bits[:, None] & bits[None]), (fired.T.float() @ fired.float()).long())
    words = torch.tensor([[-1, -2**63, 2**63 - 1, 0, 0x0F0F]], dtype=torch.int64)
    assert popcount(words).tolist() == popcount_swar(words).tolist() == [64 + 1 + 63 + 8]
    random = torch.randint(-2**63, 2**63 - 1, (50, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(popcount_swar(random), popcount(random))


def test_merge_cost_matches_brute_force_description_length():
    fired = torch.rand(400, 9, generator=torch.Generator().manual_seed(1)) < torch.linspace(0.05, 0.5, 9)
    groups = [[0, 3], [1], [2, 5, 8], [4], [6, 7]]
    alpha = 2.5
    s = torch.stack([fired[:, g].any(1).sum() for g in groups])
    r = torch.tensor([len(g) for g in groups])
    union = torch.stack([fired[:, g].any(1) for g in groups], 1).float()
    coact = (union.T @ union).long()
    before = brute_L(fired, groups, alpha)
    assert description_length(s, r, alpha) == pytest.approx(before, rel=1e-12)
    costs = merge_costs(s, r, coact, len(groups), alpha)
    k, (si, sj), (ri, rj) = len(groups), (s[:, None].double(), s[None].double()), (r[:, None], r[None])
    union = si + sj - coact
    as_written = ((s.sum() - si - sj) * math.log2((k - 1) / k) + union * math.log2(k - 1) - (si + sj) * math.log2(k)
                  + alpha * (union * (ri + rj) - si * ri - sj * rj))  # vpd.md §6, term by term
    torch.testing.assert_close(costs, as_written, rtol=1e-12, atol=1e-9)
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            merged = [g for n, g in enumerate(groups) if n not in (i, j)] + [groups[i] + groups[j]]
            assert float(costs[i, j]) == pytest.approx(brute_L(fired, merged, alpha) - before, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("rank_decay", [0.2, math.inf])
def test_every_merge_step_is_exact_under_or_semantics(rank_decay):
    """Each recorded merge: its group fires on the OR of its members' tokens, ΔL is the brute-force change of L."""
    fired = torch.rand(300, 14, generator=torch.Generator().manual_seed(2)) < torch.linspace(0.02, 0.3, 14)
    clusters = dh.cluster(firing_from_matrix(fired), alpha=1.0, rank_decay=rank_decay, seed=3, progress=False)
    assert len(clusters.merges) == 13 and len(clusters.cost) == 14
    for step in range(len(clusters.merges)):
        before, after = [m for m, _ in clusters.groups(step)], [m for m, _ in clusters.groups(step + 1)]
        a, b = clusters.merges[step]
        merged = next(m for m in after if a in m)
        assert b in merged and clusters.merged_firing[step] == int(fired[:, merged].any(1).sum())
        assert clusters.delta[step] == pytest.approx(brute_L(fired, after, 1.0) - brute_L(fired, before, 1.0),
                                                     rel=1e-9, abs=1e-6)
    assert clusters.cost[-1] == pytest.approx(brute_L(fired, [list(range(14))], 1.0), rel=1e-9)


@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_planted_groups_are_recovered_exactly(alpha):
    fired, truth = planted([4, 3, 1, 5, 2, 3])
    clusters = dh.cluster(firing_from_matrix(fired), alpha=alpha, rank_decay=math.inf, progress=False)
    found = [set(m) for m, _ in clusters.groups()]
    assert sorted(map(sorted, found)) == sorted(map(sorted, truth))
    assert clusters.chosen_step == 18 - 6
    assert all(d < 0 for d in clusters.delta[:clusters.chosen_step]) and clusters.delta[clusters.chosen_step] > 0
    assert clusters.chosen_step == min(range(len(clusters.cost)), key=clusters.cost.__getitem__)


def test_same_seed_same_merges_other_seed_other_merges():
    fired = torch.rand(500, 24, generator=torch.Generator().manual_seed(4)) < 0.15
    firing = firing_from_matrix(fired)
    runs = [dh.cluster(firing, seed=s, progress=False).to_dict() for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0]["merges"] != runs[2]["merges"]


def test_components_that_never_fire_are_left_out():
    fired = torch.zeros(64, 5, dtype=torch.bool)
    fired[:20, 1] = fired[10:30, 3] = True
    clusters = dh.cluster(firing_from_matrix(fired, [("s", i) for i in range(5)]), progress=False)
    assert clusters.components == [("s", 1), ("s", 3)] and clusters.dead == [("s", 0), ("s", 2), ("s", 4)]
    with pytest.raises(ClusterError, match="no component fired"):
        dh.cluster(firing_from_matrix(torch.zeros(8, 3, dtype=torch.bool)), progress=False)


@pytest.mark.parametrize("setting,value", [("threshold", float("nan")), ("threshold", 1.0), ("alpha", -1.0),
                                           ("rank_decay", 0.0), ("seed", -1), ("max_tokens", 0), ("batch_size", True)])
def test_bad_settings_are_refused_naming_them(setting, value):
    with pytest.raises(ClusterError, match=rf"{setting}={value!r}: must be"):
        ClusterConfig(**{setting: value})


# -- a decomposition: the streaming pass --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def net_dec():
    from test_editing import Net, decomposition

    return decomposition(Net(), {"embed": 4, "fc": 5, "out": 3})


TOKENS = torch.randint(0, 11, (9, 5), generator=torch.Generator().manual_seed(5))


def test_streaming_pass_keeps_the_firing_of_the_first_tokens(net_dec):
    cfg = ClusterConfig(threshold=0.3, max_tokens=37, batch_size=2)
    firing = firing_from_decomposition(net_dec, TOKENS, cfg, progress=False)
    ci = net_dec.causal_importance(TOKENS)
    fired = torch.cat([ci[n].reshape(-1, ci[n].shape[-1]) for n in net_dec.site_names], 1)[:37] > 0.3
    assert firing.tokens == 37 and firing.components[:5] == [("embed", 0), ("embed", 1), ("embed", 2), ("embed", 3),
                                                             ("fc", 0)]
    assert torch.equal(firing.count, fired.sum(0))
    assert torch.equal(firing.coact, (fired.T.float() @ fired.float()).long())
    assert torch.equal(firing.bits, as_words(pack_bits(fired)))


def test_clusters_json_and_page(net_dec, tmp_path):
    clusters = dh.cluster(net_dec, TOKENS, tmp_path / "out", threshold=0.3, alpha=0.5, progress=False)
    data = read_clusters(tmp_path / "out")
    assert data == json.loads(json.dumps(clusters.to_dict()))
    assert data["config"] == {"threshold": 0.3, "alpha": 0.5, "rank_decay": 0.2, "seed": 0, "max_tokens": 500_000,
                              "batch_size": 16, "source": "decomposition", "exact": True}
    assert data["tokens"] == TOKENS.numel() and len(data["cost"]) == len(data["merges"]) + 1
    members = sorted(tuple(m) for g in data["clusters"] for m in g["members"])
    assert members == sorted(map(tuple, data["components"]))
    html = (tmp_path / "out" / "clusters.html").read_text()
    assert "<polyline" in html and "http" not in html.replace("http-equiv", "")
    with pytest.raises(ClusterError, match="already exists"):
        clusters.save(tmp_path / "out" / "clusters.json")
    clusters.save(tmp_path / "c.json")
    assert read_clusters(tmp_path / "c.json") == data


def test_dashboards_link_the_cluster_page(net_dec, tmp_path):
    from decomp_hooks.dashboard import build_dashboards

    dh.cluster(net_dec, TOKENS, tmp_path / "out", threshold=0.3, alpha=0.5, progress=False)
    pages = build_dashboards(net_dec, TOKENS, tmp_path / "dash", clusters=tmp_path / "out", progress=False)
    assert 'href="clusters.html"' in (tmp_path / "dash" / "index.html").read_text()
    links = re.findall(r'href="([^"#]+)#c\d+"', (tmp_path / "dash" / "clusters.html").read_text())
    assert links and set(links) <= {page.name for page in pages.values()}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ClusterError, match="not a decomp-hooks clusters file"):
        build_dashboards(net_dec, TOKENS, tmp_path / "dash2", clusters=tmp_path / "bad.json", progress=False)
    assert not (tmp_path / "dash2").exists()


def test_cluster_page_escapes_everything_and_links_members(tmp_path):
    fired, _ = planted([2, 1], tokens=200, p=0.3)
    evil = '<script>alert("x")</script>'
    clusters = dh.cluster(firing_from_matrix(fired, [(evil, 0), (evil, 1), ("a&b", 2)]), rank_decay=math.inf,
                          progress=False)
    page = write_cluster_page(clusters, tmp_path / "c.html", pages={evil: "site page.html", "a&b": "ab.html"})
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "a&amp;b" in html
    assert 'href="site%20page.html#c0"' in html and 'href="ab.html#c2"' in html
    assert write_cluster_page(clusters.to_dict(), tmp_path / "d.html").read_text().count("<tr") == \
        html.count("<tr")


def test_harvest_counts_are_clustered_approximately(net_dec, tmp_path):
    dh.harvest(net_dec, TOKENS, None, tmp_path / "harvest", progress=False)
    clusters = dh.cluster(tmp_path / "harvest", alpha=0.5, progress=False)
    assert clusters.config["source"] == "harvest" and clusters.config["exact"] is False
    assert clusters.tokens == TOKENS.numel()
    with pytest.raises(ClusterError, match="holds its own counts"):
        dh.cluster(tmp_path / "harvest", TOKENS, progress=False)
    from decomp_hooks.cli import main

    result = CliRunner().invoke(main, ["cluster", str(tmp_path / "harvest"), "--out", str(tmp_path / "c.json"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert read_clusters(tmp_path / "c.json")["config"]["source"] == "harvest"


def test_harvest_bound_is_exact_for_groups_that_always_fire_together(tmp_path):
    """From pairwise counts alone the planted groups still come out: within a group the bound is the OR count."""
    fired, truth = planted([3, 2, 4], tokens=2000)
    firing = firing_from_matrix(fired)
    firing.bits = None  # what a harvest gives: counts and co-firing, no bits
    clusters = dh.cluster(firing, rank_decay=math.inf, progress=False)
    assert sorted(map(sorted, (m for m, _ in clusters.groups()))) == sorted(map(sorted, truth))
    assert clusters.config["exact"] is False


def test_cli_clusters_a_toy_run(tmp_path):
    from decomp_hooks.adapters import resolve
    from decomp_hooks.cli import main
    from decomp_hooks.component_model import ComponentModel
    from decomp_hooks.toy import make_toy, save_toy

    model, _ = make_toy("tms_5-2", steps=10, progress=False)
    save_toy(model, tmp_path / "run" / "target")
    config = dh.DecomposeConfig()
    cm = ComponentModel.from_config(*resolve(model, {"linear1": 6, "linear2": 6}), config)
    dh.Decomposition(cm, config).save(tmp_path / "run" / "decomposition")
    out = tmp_path / "clusters"
    result = CliRunner().invoke(main, ["cluster", str(tmp_path / "run"), "--max-tokens", "500", "--out", str(out),
                                       "--no-progress", "--device", "cpu", "--rank-decay", "inf"])
    assert result.exit_code == 0, result.output
    assert "clustered" in result.output and (out / "clusters.html").is_file()
    assert read_clusters(out)["tokens"] == 500
    again = CliRunner().invoke(main, ["cluster", str(tmp_path / "run"), "--out", str(out), "--no-progress"])
    assert again.exit_code != 0 and "not empty" in again.output


def test_cluster_page_opens_cleanly_in_headless_chromium(tmp_path):
    pytest.importorskip("websocket")
    from browser import check_page, chromium_path

    if chromium_path() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    fired, truth = planted([4, 3, 1, 5, 2, 3])
    clusters = dh.cluster(firing_from_matrix(fired, [(f"blocks.{i % 2}.mlp.W_in", i) for i in range(18)]),
                          out=tmp_path / "clusters", alpha=1.0, rank_decay=math.inf, progress=False)
    checks = {"rows": "document.querySelectorAll('tr[id^=cluster]').length",
              "curve": "document.querySelector('polyline').getBoundingClientRect().width",
              "singles": "document.querySelector('details summary').textContent"}
    report = check_page(tmp_path / "clusters" / "clusters.html", checks, screenshot=tmp_path / "clusters.png")
    assert not report.errors and not report.external_requests
    assert report.values["rows"] == sum(len(g) > 1 for g in truth) == 5
    assert report.values["curve"] > 500 and report.values["singles"] == "1 components on their own"
    assert clusters.chosen_step == 12
