"""Attribution graphs: ground truth on TMS 5-2 and ResidMLP 1L, direct paths across positions only through attention,
the same graph through Hugging Face / nnsight and TransformerLens, pruning, the JSON against Neuronpedia's schema, the
HTML page in headless Chromium, the CLI, and clear refusals of bad input.

The toy decompositions are built exactly from ground truth (components set from the target's weights, causal
importance `g = clamp(k·|a|)` from a per-component MLP), not trained, so the tests are fast and exact."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from click.testing import CliRunner

import decomp_hooks as dh
from decomp_hooks.cli import main
from decomp_hooks.graph import GraphError, attribution_graph
from decomp_hooks.graph.html import script_json
from decomp_hooks.graph.prune import prune, prune_keeping
from decomp_hooks.toy import make_toy, save_toy
from faults import kill_when
from graph_schema import errors, schema, schema_errors

CONFIG = {"ci": {"type": "mlp", "hidden": [2]}, "losses": [{"type": "stochastic_recon", "coeff": 1.0}],
          "train": {"steps": 1, "batch_size": 4, "log_every": 10, "eval_every": 1000, "checkpoint_every": 1000,
                    "eval_pgd_steps": 0}}
MATRICES = {"self_attn.q_proj": "attn.W_Q", "self_attn.k_proj": "attn.W_K", "self_attn.v_proj": "attn.W_V",
            "self_attn.o_proj": "attn.W_O", "mlp.c_fc": "mlp.W_in", "mlp.down_proj": "mlp.W_out"}


def exact(model, data, targets: dict[str, int], factors: dict | None = None, k: float = 100.0):
    """A decomposition set, not trained: per site `factors[site] = (V, U)` (default V = I, U = W: one component per
    input direction, no delta), and causal importance `g = clamp(gelu(k a) + gelu(−k a)) ≈ clamp(k |a|)`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = dh.decompose(model, data, targets=targets, config=CONFIG, progress=False)
    with torch.no_grad():
        for name, comps in dec.components.items():
            V, U = (factors or {}).get(name, (torch.eye(comps.d_in), comps.target_weight))
            comps.V_param.copy_(V)
            comps.U_param.copy_(U)
            fn = dec.cm.ci_fns[name.replace(".", "-")]
            fn.weights[0].copy_(torch.tensor([k, -k]))
            fn.biases[0].zero_()
            fn.w_out.fill_(1.0)
            fn.b_out.zero_()
    return dec


def one_hot(n: int, i: int) -> torch.Tensor:
    x = torch.zeros(n)
    x[i] = 1.0
    return x


@pytest.fixture(scope="module")
def tms_dec(tms52):
    W = tms52.linear1.weight.detach()  # [2, 5]: column i is feature i
    factors = {"linear1": (torch.eye(5), W.T.clone()), "linear2": (W.clone(), torch.eye(5))}
    return exact(tms52, torch.rand(8, 5), {"linear1": 5, "linear2": 5}, factors)


@pytest.fixture(scope="module")
def small_lm():
    from decomp_hooks.toy.lm import SimpleLlamaForCausalLM, SmallLMConfig

    torch.manual_seed(0)
    cfg = SmallLMConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_mlp=32, n_ctx=16)
    return SimpleLlamaForCausalLM(cfg.hf_config()).eval()


@pytest.fixture(scope="module")
def lm_dec(small_lm):
    tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    return exact(small_lm, tokens, {"model.layers.*.self_attn.*_proj": 16, "model.layers.*.mlp.c_fc": 16,
                                    "model.layers.*.mlp.down_proj": 32}, k=1e4)


@pytest.fixture(scope="module")
def gpt2_dec(tokenizer):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    model.tokenizer = tokenizer
    tokens = torch.randint(0, 50257, (4, 8), generator=torch.Generator().manual_seed(0))
    return exact(model, tokens, {"transformer.h.0.mlp.c_fc": 16, "transformer.h.0.attn.c_proj": 16})


def test_tms_5_2_feature_feeds_the_same_feature(tms_dec, tms52):
    """Ground truth: on a one-hot input of feature i, linear1's component i feeds linear2's component i by the
    strongest edge, with the exact weight (W_i·W_c)·x_i·g_i, and linear2's component i is the output's source."""
    W = tms52.linear1.weight.detach()
    for i in range(5):
        graph = tms_dec.attribution_graph(one_hot(5, i), threshold=0.0)
        assert graph.targets[0].index == i
        src = graph.find("component", "linear1")
        assert [n.index for n in src] == [i]
        outgoing = [(t, float(graph.adjacency[graph.nodes.index(t), graph.nodes.index(src[0])]))
                    for t in graph.find("component", "linear2")]
        assert len(outgoing) >= 2  # interference: several linear2 components are active
        strongest = max(outgoing, key=lambda e: abs(e[1]))
        assert strongest[0].index == i
        for t, w in outgoing:
            assert w == pytest.approx(float(W[:, i] @ W[:, t.index]), rel=1e-5)
        logit = graph.find("logit")[0]
        assert graph.incoming(logit)[0][0] == graph.find("component", "linear2", index=i)[0]


def test_resid_mlp_1l_one_hot_feature_has_its_mlp_in_component_as_strongest_source():
    """Ground truth: components of mlp_in read the feature directions (V = W_Eᵀ), mlp_out's the neurons; for a one-hot
    input of feature i, mlp_in's component i carries the most influence on output i (all 100 features)."""
    model, sampler = make_toy("resid_mlp1", seed=0, progress=False, steps=100)
    E, block = model.W_E, model.layers[0]
    factors = {"layers.0.mlp_in": (E.T.clone(), E @ block.mlp_in.weight.detach().T),
               "layers.0.mlp_out": (torch.eye(50), block.mlp_out.weight.detach().T.clone())}
    dec = exact(model, sampler(8), {"layers.0.mlp_in": 100, "layers.0.mlp_out": 50}, factors)
    margins = []
    for i in range(100):
        graph = attribution_graph(dec, one_hot(100, i), threshold=0.0)
        influence = {n.index: float(graph.pruned.influence[graph.nodes.index(n)])
                     for n in graph.find("component", "layers.0.mlp_in")}
        assert len(influence) > 10 and graph.targets[0].index == i  # the other features leak in a little
        ranked = sorted(influence, key=influence.get, reverse=True)
        assert ranked[0] == i
        margins.append(influence[ranked[0]] / influence[ranked[1]])
    assert min(margins) > 3


def test_across_positions_only_key_and_value_components_feed_the_output_projection(lm_dec):
    """With exact components (no delta), a direct path crosses positions only inside attention: every edge between
    positions runs from a k/v component at an earlier position to the same layer's o component."""
    graph = lm_dec.attribution_graph([3, 17, 42, 5, 9], threshold=0.0)
    dst, src = graph.adjacency.nonzero(as_tuple=True)
    crossing = [(graph.nodes[s], graph.nodes[d]) for s, d in zip(src.tolist(), dst.tolist())
                if graph.nodes[s].pos != graph.nodes[d].pos]
    assert len(crossing) > 50
    for s, d in crossing:
        assert s.pos < d.pos and s.kind == d.kind == "component", (s, d)
        assert s.site.rsplit(".", 1)[1] in ("k_proj", "v_proj") and d.site == s.site.rsplit(".", 1)[0] + ".o_proj"
    kv = {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("k_proj", "v_proj")}
    assert {s.site for s, _ in crossing} == kv


def test_nnsight_and_transformer_lens_give_the_same_graph(small_lm):
    """The same model held through nnsight and as a TransformerLens HookedTransformer, with the same exact
    components: the same nodes and the same edge weights."""
    nnsight = pytest.importorskip("nnsight")
    pytest.importorskip("transformer_lens")
    from decomp_hooks.toy.lm import to_hooked_transformer

    tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    sizes = {"self_attn.q_proj": 16, "self_attn.k_proj": 16, "self_attn.v_proj": 16, "self_attn.o_proj": 16,
             "mlp.c_fc": 16, "mlp.down_proj": 32}
    via_nnsight = exact(nnsight.NNsight(small_lm), tokens, {f"model.layers.*.{m}": c for m, c in sizes.items()}, k=1e4)
    via_tl = exact(to_hooked_transformer(small_lm), tokens, {f"blocks.*.{MATRICES[m]}": c for m, c in sizes.items()},
                   k=1e4)
    prompt = [3, 17, 42, 5]
    graphs = [d.attribution_graph(prompt, target=[7, 11], threshold=0.0) for d in (via_nnsight, via_tl)]
    rename = {f"model.layers.{i}.{m}": f"blocks.{i}.{t}" for i in (0, 1) for m, t in MATRICES.items()}

    def key(n, to_tl: bool):
        return n.kind, rename.get(n.site, n.site) if to_tl else n.site, n.pos, n.index

    order = {key(n, False): i for i, n in enumerate(graphs[1].nodes)}
    perm = torch.tensor([order[key(n, True)] for n in graphs[0].nodes])
    assert len(graphs[0].nodes) == len(graphs[1].nodes) > 300
    A_nn, A_tl = graphs[0].adjacency, graphs[1].adjacency[perm][:, perm]
    torch.testing.assert_close(A_tl, A_nn, rtol=1e-3, atol=1e-5 * float(A_nn.abs().max()))
    assert graphs[0].pruned.influence_kept == pytest.approx(graphs[1].pruned.influence_kept, abs=1e-3)


def test_pruning_keeps_the_influential_nodes_and_raises_thresholds_to_keep_the_influence():
    """A hand-made graph: features f0, f1, an error node, an input, a logit; A[logit] = (3, 1), both features read the
    input. Node influence is (0.75, 0.25, 0, 1, 0); at node threshold 0.8 f1 goes and 75 % of the influence stays."""
    A = torch.zeros(5, 5)
    A[4, 0], A[4, 1], A[0, 3], A[1, 3] = 3.0, -1.0, 1.0, 2.0
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    pruned = prune(A, w, n_features=2, n_fixed=2, node_threshold=0.8, edge_threshold=0.98)
    torch.testing.assert_close(pruned.influence, torch.tensor([0.75, 0.25, 0.0, 1.0, 0.0]))
    assert pruned.node_mask.tolist() == [True, False, False, True, True]
    assert pruned.edge_mask.nonzero().tolist() == [[0, 3], [4, 0]]
    assert pruned.influence_kept == pytest.approx(0.75) and pruned.node_influence_kept == pytest.approx(0.875)
    kept = prune_keeping(A, w, 2, 2, 0.8, 0.98, min_influence_kept=0.8)
    assert kept.influence_kept == pytest.approx(1.0) and kept.node_threshold == pytest.approx(0.9)


def test_graph_json_follows_the_neuronpedia_schema_and_saves_atomically(gpt2_dec, tmp_path):
    """The document validates against Neuronpedia's graph schema (tests/data/), has circuit-tracer's node fields,
    unique node ids, links between listed nodes, and graph-metadata.json lists it."""
    assert errors({"metadata": {}, "nodes": [{"node_id": 3}], "links": []}, schema())  # the validator is not vacuous
    graph = gpt2_dec.attribution_graph("The cat sat on the", threshold=0.0, slug="cat")
    doc = graph.to_json()
    assert schema_errors(doc) == []
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids)) == graph.n_kept_nodes
    assert all({l["source"], l["target"]} <= set(ids) for l in doc["links"]) and len(doc["links"]) == graph.n_kept_edges
    types = {n["feature_type"] for n in doc["nodes"]}
    assert {"cross layer transcoder", "embedding", "logit"} <= types
    circuit_tracer = {"token_prob", "is_target_logit", "run_idx", "reverse_ctx_idx", "influence", "activation"}
    assert all(circuit_tracer <= set(n) for n in doc["nodes"])
    logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
    assert logit["is_target_logit"] and "(p=" in logit["clerp"]
    meta = doc["metadata"]
    assert meta["prompt_tokens"] == ["The", " cat", " sat", " on", " the"] and meta["prompt"] == "The cat sat on the"
    extra = meta["decomp_hooks"]
    assert extra["influence_kept"] >= 0.8 and extra["counts"]["kept_nodes"] == len(ids)
    assert [layer["site"] for layer in extra["layers"]] == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    paths = graph.save(tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(doc))
    listed = json.loads((tmp_path / "out" / "graph-metadata.json").read_text())["graphs"]
    assert [g["slug"] for g in listed] == ["cat"] and paths["html"].is_file()
    with pytest.raises(GraphError, match="already exists"):
        graph.save(tmp_path / "out")
    assert graph.save(tmp_path / "out", overwrite=True)["json"].is_file()


def test_html_view_opens_cleanly_in_headless_chromium(gpt2_dec, tmp_path):
    """The page: no console error, no request beyond the file, one shape per node and one path per link, the target
    logit selected with its inputs listed, and hostile prompt text shown as text, not markup."""
    pytest.importorskip("websocket")
    from browser import check_page, chromium_path

    if chromium_path() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    prompt = 'a </script><b>bold</b> & "quote"'
    graph = gpt2_dec.attribution_graph(prompt, threshold=0.0, slug="hostile")
    assert "</script><b>" not in script_json(graph.to_json())
    page = graph.save(tmp_path / "g")["html"]
    checks = {"nodes": "document.querySelectorAll('.node').length",
              "edges": "document.querySelectorAll('path.edge').length",
              "bold": "document.querySelectorAll('b').length",
              "prompt": "document.getElementById('prompt').textContent",
              "inputs": "document.getElementById('panel-inputs').children.length",
              "clicked": "document.querySelector('circle.node').dispatchEvent(new MouseEvent('click')), "
                         "document.getElementById('panel-title').textContent"}
    report = check_page(page, checks)
    doc = graph.to_json()
    assert report.errors == [] and report.external_requests == [], report
    assert report.values["nodes"] == len(doc["nodes"]) and report.values["edges"] == len(doc["links"]) > 0
    assert report.values["bold"] == 0 and report.values["prompt"] == prompt
    assert report.values["inputs"] > 0 and report.values["clicked"].startswith("transformer.h.0.")


def test_cli_writes_a_graph_for_a_toy_run(tms_dec, tms52, tmp_path):
    run = tmp_path / "run"
    tms_dec.save(run / "decomposition")
    save_toy(tms52, run / "target")
    out = tmp_path / "graph"
    result = CliRunner().invoke(main, ["graph", str(run), "--prompt", "0,0,1,0,0", "--threshold", "0",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "influence kept" in result.output and (out / "x-2-1-the-other-4-of-5-entries-0.html").is_file()
    doc = json.loads((out / "x-2-1-the-other-4-of-5-entries-0.json").read_text())
    assert schema_errors(doc) == [] and doc["metadata"]["decomp_hooks"]["targets"][0]["index"] == 2
    bad = CliRunner().invoke(main, ["graph", str(run), "--prompt", "a,b", "--out", str(tmp_path / "g2")])
    assert bad.exit_code == 2 and "give its entries separated by commas" in bad.output
    bad = CliRunner().invoke(main, ["graph", str(run), "--prompt", "1,0,0,0,0", "--target", "7", "--out",
                                    str(tmp_path / "g3")])
    assert bad.exit_code == 2 and "target=7 is not an output of the model" in bad.output
    again = CliRunner().invoke(main, ["graph", str(run), "--prompt", "1,0,0,0,0", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_graph_killed_while_writing_leaves_no_half_written_output(tms_dec, tms52, tmp_path):
    run, out = tmp_path / "run", tmp_path / "graph"
    tms_dec.save(run / "decomposition")
    save_toy(tms52, run / "target")
    args = ["graph", str(run), "--prompt", "0,0,1,0,0", "--threshold", "0", "--out", str(out), "--device", "cpu"]
    first_file = lambda tmps, _: any(any(t.glob("*.json")) for t in tmps)  # noqa: E731
    kill_when(args, out, first_file)  # the graph JSON written, the page and the index not
    assert not out.exists()
    assert CliRunner().invoke(main, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    kill_when([*args, "--force"], out, lambda tmps, o: any((t / "graph-metadata.json").is_file() for t in tmps))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # killed while replacing: the old graph, whole


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": ""}, "prompt='' is empty"),
    ({"prompt": "   "}, "prompt='   ' is empty"),
    ({"prompt": "word " * 40}, "prompt 'word word .*…' is 41 tokens, longer than the model's context of 32"),
    ({"prompt": [1, 2, 50257]}, r"range over \[1, 50257\], outside the vocabulary"),
    ({"prompt": torch.rand(4)}, "the model reads token ids"),
    ({"target": " big dog"}, r"target=' big dog' is 2 tokens \[' big', ' dog'\]"),
    ({"target": 60000}, r"target=60000 is not an output of the model; give a token or an index in \[0, 50256\]"),
    ({"target": []}, "target=\\[\\] names no output"),
    ({"threshold": 1.0}, r"threshold=1.0 is out of range; give a number in \[0.0, 1.0\)"),
    ({"threshold": -0.1}, "threshold=-0.1 is out of range"),
    ({"threshold": math.nan}, "threshold=nan is out of range"),
    ({"node_threshold": 1.5}, "node_threshold=1.5 is out of range"),
    ({"min_influence_kept": "high"}, "min_influence_kept='high' is out of range"),
    ({"max_nodes": 0}, "max_nodes=0: must be an integer ≥ 1"),
    ({"slug": "../up"}, "slug='../up': use 1-100 letters"),
])
def test_bad_input_is_refused_naming_the_value(gpt2_dec, kwargs, match):
    args = {"prompt": "The cat sat", **kwargs}
    with pytest.raises(GraphError, match=match):
        gpt2_dec.attribution_graph(args.pop("prompt"), **args)


def test_bad_toy_input_is_refused_naming_the_value(tms_dec):
    with pytest.raises(GraphError, match="NaN or Inf"):
        tms_dec.attribution_graph(torch.tensor([1.0, math.nan, 0, 0, 0]))
    with pytest.raises(GraphError, match="the model has no vocabulary"):
        tms_dec.attribution_graph([1, 2])
    with pytest.raises(GraphError, match="is text, but there is no tokenizer"):
        tms_dec.attribution_graph(one_hot(5, 0), target="x")
