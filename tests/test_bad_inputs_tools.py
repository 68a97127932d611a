"""Bad input to the tools around a decomposition, table-driven: export, dashboards, comparison and reading exports back,
from Python and from the command line. Each case raises its exact error class (or exits 1 or 2 without a traceback)
with a message naming the bad value, and writes nothing. Also: site names that sanitise alike or are too long for a
file name, export indexes whose `dir` points outside the export, and `export` and `dashboard` killed with SIGKILL
while they write."""
from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from click.testing import CliRunner  # noqa: E402

import decomp_hooks as dh  # noqa: E402
from decomp_hooks import store  # noqa: E402
from decomp_hooks.cli import main  # noqa: E402
from decomp_hooks.dashboard import CompareConfig, DashboardConfig, DashboardError, build_dashboards  # noqa: E402
from decomp_hooks.dashboard import compare_with_sae  # noqa: E402
from decomp_hooks.export import ExportError, load_export  # noqa: E402
from decomp_hooks.export.format import MAX_NAME, dir_name, dir_names  # noqa: E402
from decomp_hooks.store import StoreError  # noqa: E402
from faults import kill_when, temporary_dirs  # noqa: E402

CONFIG = {"ci": {"type": "mlp", "hidden": [4]},
          "losses": [{"type": "stochastic_recon"}, {"type": "importance_minimality", "coeff": 1e-3}],
          "train": {"steps": 2, "batch_size": 4, "eval_every": 1000, "checkpoint_every": 1000, "eval_pgd_steps": 0,
                    "faithfulness_warmup_steps": 0}}
LONG = "k" * 300  # a module name whose site name is too long for a file name
KEYS = ["a/b", "a_b", "A_b", LONG]  # "a/b" sanitises to "a_b"; "a_b" and "A_b" are one name on a case-blind disk
SITES = [f"layers.{k}" for k in KEYS]
IDS = torch.randint(0, 11, (8, 6), generator=torch.Generator().manual_seed(0))


class Named(nn.Module):
    """Token ids through an embedding, one linear layer per key of a ModuleDict (any string is a legal module name),
    and an unembedding: sites named `layers.<key>`."""

    def __init__(self, keys: list[str]):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.layers = nn.ModuleDict({k: nn.Linear(4, 4) for k in keys})
        self.out = nn.Linear(4, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers.values():
            x = layer(x)
        return self.out(x)


def quiet_decompose(model, data, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dh.decompose(model, data, targets=targets, config=CONFIG, progress=False)


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """The Named model decomposed at every site, and its export (with statistics) in a module folder."""
    torch.manual_seed(0)
    dec = quiet_decompose(Named(KEYS), IDS, {s: 3 for s in SITES})
    root = tmp_path_factory.mktemp("named")
    dec.export(root / "export", data=IDS)
    torch.manual_seed(0)
    mlp = quiet_decompose(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 5)), torch.rand(16, 5), {"0": 3})
    sae = root / "export" / dir_names(SITES)[SITES[1]]  # one site's SAE-Lens directory
    return SimpleNamespace(dec=dec, mlp=mlp, export=root / "export", sae=sae)


# -- site names -----------------------------------------------------------------------------------------------------

def test_file_names_of_sites_are_unique_stable_and_short():
    assert dir_name("blocks.0.mlp.W_in") == "blocks.0.mlp.W_in"  # safe names are kept as they are
    names = dir_names(SITES + ["..", ".hidden"])
    assert len(set(names.values())) == len(names) == 6
    assert len({n.lower() for n in names.values()}) == 6  # distinct on case-insensitive file systems too
    assert names == dir_names(SITES + ["..", ".hidden"]) and dir_name("layers.a/b") == names["layers.a/b"]  # stable
    assert all(0 < len(n) <= MAX_NAME and not n.startswith(".") and "/" not in n for n in names.values())
    assert names[f"layers.{LONG}"].startswith("layers.kkkk")  # a readable prefix, then the hash


def test_sites_that_sanitise_alike_or_are_too_long_get_their_own_directory_and_page(named, tmp_path):
    saes = load_export(named.export)
    assert sorted(saes) == sorted(SITES) and all(saes[s].metadata["site"] == s for s in SITES)
    index = store.read_json(named.export / "export.json")
    assert len({e["dir"] for e in index["sites"].values()}) == len(SITES)
    pages = build_dashboards(named.dec, IDS, tmp_path / "dash", config=DashboardConfig(batch_size=4), progress=False)
    assert sorted(pages) == sorted(SITES) and len({p.name for p in pages.values()}) == len(SITES)
    links = re.findall(r'<a href="([^"]+\.html)">([^<]+)</a>', (tmp_path / "dash" / "index.html").read_text())
    assert sorted(links) == sorted((p.name, s) for s, p in pages.items())  # every page reachable from the index
    for site, page in pages.items():
        assert page.is_file() and page.with_name(page.name[:-5] + ".neuronpedia.json").is_file()
        assert len(page.name) < 255 and site in page.read_text()


# -- an export index that points outside the export -----------------------------------------------------------------

def forged_export(named, root: Path, edit) -> Path:
    """A copy of the export with its export.json edited and no decomp-hooks manifest (an export from elsewhere)."""
    out = root / "forged"
    shutil.copytree(named.export, out)
    (out / store.MARKER).unlink()
    index = json.loads((out / "export.json").read_text())
    edit(index)
    (out / "export.json").write_text(json.dumps(index))
    return out


def site_dir(site: str, value):
    return lambda index: index["sites"][site].update(dir=value)


INDEX_CASES = [
    ("dir climbs out", site_dir(SITES[1], "../../etc"), r"site 'layers\.a_b' has dir '\.\./\.\./etc', which is not a directory inside"),
    ("dir absolute", site_dir(SITES[2], "/etc"), r"site 'layers\.A_b' has dir '/etc'"),
    ("dir is the parent", site_dir(SITES[0], ".."), r"site 'layers\.a/b' has dir '\.\.'"),
    ("dir empty", site_dir(SITES[0], ""), r"site 'layers\.a/b' has dir ''"),
    ("dir not a string", site_dir(SITES[0], 7), r"site 'layers\.a/b' has dir 7"),
    ("entry not a table", lambda index: index["sites"].update({SITES[0]: "x"}), r"site 'layers\.a/b' has dir None"),
    ("index of another tool", lambda index: index.update(format="other-tool/v2"), r"format 'other-tool/v2', expected 'decomp-hooks/sae-lens-export'"),
    ("sites not a table", lambda index: index.update(sites=[1, 2]), r"not a decomp-hooks SAE-Lens export index"),
]


@pytest.mark.parametrize("case, edit, match", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_load_export_refuses_a_forged_index_before_reading(named, tmp_path, monkeypatch, case, edit, match):
    from decomp_hooks.export import read

    forged = forged_export(named, tmp_path, edit)
    read_dirs = []
    monkeypatch.setattr(read, "load_sae", lambda path: read_dirs.append(path))
    with pytest.raises(StoreError, match=match):
        load_export(forged)
    assert read_dirs == []  # refused before any site directory was read


def test_load_export_refuses_a_site_directory_that_links_outside(named, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(named.sae, outside)
    forged = forged_export(named, tmp_path, site_dir(SITES[1], "link"))
    (forged / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match=r"site 'layers\.a_b' has dir 'link', which is not a directory inside"):
        load_export(forged)


# -- Python: each case is (id, call(named, out), error class, regex the message must match) ---------------------

def broken_sae(named, out: Path, edit) -> Path:
    """A copy of one exported site directory with one file replaced by `edit(directory)`, outside any manifest."""
    sae = out.parent / "sae"
    shutil.copytree(named.sae, sae)
    edit(sae)
    return sae


def compare(named, out, sae=None, config=None, data=IDS):
    return compare_with_sae(named.dec, SITES[1], sae or named.sae, data, out=out,
                            config=config, progress=False)


def dashboards(named, out, data=IDS, **kw):
    return build_dashboards(named.dec, data, out, progress=False, **kw)


API_CASES = [
    ("export float token ids", lambda n, o: n.dec.export(o, data=IDS.float()), ExportError,
     r"torch\.float32 tensor of shape \[8, 6\].*reads token ids \(a vocabulary of 11\).*integer token ids"),
    ("export ids beyond the vocabulary", lambda n, o: n.dec.export(o, data=IDS + 20), ExportError,
     r"token ids range over \[2\d, \d\d\] but the model's vocabulary has 11 entries"),
    ("export empty tensor", lambda n, o: n.dec.export(o, data=IDS[:0]), ExportError, r"shape \[0, 6\] .*with no rows"),
    ("export NaN inputs", lambda n, o: n.mlp.export(o, data=torch.full((4, 5), math.nan)), ExportError,
     r"holds 20 NaN or Inf values"),
    ("export inputs of the wrong width", lambda n, o: n.mlp.export(o, data=torch.rand(4, 7)), ExportError,
     r"cannot run on the data: a batch is a torch\.float32 tensor of shape \[4, 7\].*mat1 and mat2"),
    ("export 0-d data", lambda n, o: n.mlp.export(o, data=torch.tensor(1.0)), ExportError, r"shape \[\] .*with no rows"),
    ("export batch size 0", lambda n, o: n.dec.export(o, data=IDS, batch_size=0), ExportError, r"batch_size=0: must be an integer ≥ 1"),
    ("export n_examples -1", lambda n, o: n.dec.export(o, data=IDS, n_examples=-1), ExportError, r"n_examples=-1: must be an integer ≥ 0"),
    ("export sites an int", lambda n, o: n.dec.export(o, sites=5), ExportError, r"sites=5: pass fnmatch patterns"),
    ("export sites empty", lambda n, o: n.dec.export(o, sites=[]), ExportError, r"sites=\[\]: pass fnmatch patterns"),
    ("dashboard negative ids", lambda n, o: dashboards(n, o, IDS - 5), DashboardError,
     r"token ids range over \[-5, \d\] but the model's vocabulary has 11 entries"),
    ("dashboard float ids", lambda n, o: dashboards(n, o, IDS.double()), DashboardError, r"torch\.float64 tensor of shape \[8, 6\]"),
    ("dashboard components a string", lambda n, o: dashboards(n, o, components="0,1"), DashboardError,
     r"components='0,1': give a list of integer component indices"),
    ("dashboard config a dict", lambda n, o: dashboards(n, o, config={"n_examples": 3}), DashboardError,
     r"config is a dict; pass a DashboardConfig"),
    ("dashboard batch size 0", lambda n, o: dashboards(n, o, config=DashboardConfig(batch_size=0)), DashboardError,
     r"DashboardConfig\.batch_size=0: must be an integer ≥ 1"),
    ("compare min_cosine NaN", lambda n, o: compare(n, o, config=CompareConfig(min_cosine=math.nan)), DashboardError,
     r"CompareConfig\.min_cosine=nan: must be a number in \[-1, 1\]"),
    ("compare top_k 0", lambda n, o: compare(n, o, config=CompareConfig(top_k=0)), DashboardError, r"CompareConfig\.top_k=0"),
    ("compare ids beyond the vocabulary", lambda n, o: compare(n, o, data=IDS + 11), DashboardError,
     r"token ids range over \[1\d, \d\d\] but the model's vocabulary has 11"),
    ("compare cfg.json a list", lambda n, o: compare(n, o, broken_sae(n, o, lambda d: (d / "cfg.json").write_text("[1]"))),
     StoreError, r"cfg\.json' holds a JSON list, not an SAE-Lens config"),
    ("compare cfg.json truncated", lambda n, o: compare(n, o, broken_sae(n, o, lambda d: (d / "cfg.json").write_text('{"d_in"'))),
     StoreError, r"cfg\.json' is not valid JSON"),
    ("compare weights truncated", lambda n, o: compare(n, o, broken_sae(n, o, lambda d: (d / "sae_weights.safetensors").write_bytes(b"\x10"))),
     StoreError, r"sae_weights\.safetensors' is not a readable safetensors file"),
    ("compare weights of clashing shapes", lambda n, o: compare(n, o, broken_sae(n, o, lambda d: store.write_tensors(
        d / "sae_weights.safetensors", {"W_enc": torch.zeros(4, 6), "W_dec": torch.zeros(5, 4), "b_dec": torch.zeros(4)}))),
     StoreError, r"holds \{'W_dec': \[5, 4\], 'W_enc': \[4, 6\], 'b_dec': \[4\]\}; an SAE-Lens weights file has"),
    ("compare an export root", lambda n, o: compare(n, o, n.export), StoreError, r"no cfg\.json\. It is an export root; use load_export"),
    ("compare a missing directory", lambda n, o: compare(n, o, o.parent / "nowhere"), StoreError, r"nowhere' is not an SAE-Lens directory: it does not exist"),
    ("load_export of one SAE directory", lambda n, o: load_export(n.sae), StoreError,
     r"is one SAE-Lens directory, not an export root \(no export\.json\); read it with load_sae"),
]


@pytest.mark.parametrize("case, call, error, match", API_CASES, ids=[c[0] for c in API_CASES])
def test_tools_refuse(named, tmp_path, case, call, error, match):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(named, out)
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "a refused call wrote output"


# -- the command line: each case is (id, arguments, exit code, regex the output must match) ------------------------

@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny GPT-2 (vocabulary 97) saved as a model directory, a run that decomposes one matrix, its export, and
    --data files of bad token ids."""
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                                                 vocab_size=97)).eval()
    tokens = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = dh.decompose(model, tokens, targets={"transformer.h.0.mlp.c_fc": 4},
                           config={**CONFIG, "output_loss": "kl"}, out_dir=root / "run", progress=False)
        model.save_pretrained(root / "model")
    dec.export(root / "export")
    sae = root / "export" / "transformer.h.0.mlp.c_fc"
    shutil.copytree(sae, root / "sae-list")
    (root / "sae-list" / "cfg.json").write_text("[1, 2]")
    files = {"tokens": tokens, "big": tokens + 200, "neg": tokens - 50, "float": tokens.float(), "flat": tokens[0],
             "nan": torch.full((4, 16), math.nan), "empty": tokens[:0], "scalar": torch.tensor(3)}
    for name, t in files.items():
        store.write_tensors(root / f"{name}.safetensors", {"tokens": t})
    (root / "garbage.safetensors").write_bytes(b"\xff" * 12)
    return root


DASH = ["dashboard", "RUN", "--model", "MODEL", "--out", "OUT", "--no-progress", "--data"]
EXPORT = ["export", "RUN", "OUT", "--model", "MODEL", "--data"]
COMPARE = ["compare", "RUN", "SAE", "--model", "MODEL", "--out", "OUT", "--no-progress", "--data"]
CLI_CASES = [
    ("dashboard ids beyond the vocabulary", DASH + ["big"], 2, r"--data: '.*big\.safetensors': token ids range over \[2\d\d, 296\] but the model's vocabulary has 97 entries"),
    ("dashboard negative ids", DASH + ["neg"], 2, r"neg\.safetensors': token ids range over \[-\d\d, 46\]"),
    ("dashboard float ids", DASH + ["float"], 2, r"float\.safetensors': the data is a torch\.float32 tensor of shape \[8, 16\]"),
    ("dashboard empty data", DASH + ["empty"], 2, r"empty\.safetensors': the data is a torch\.int64 tensor of shape \[0, 16\] .*no rows"),
    ("dashboard 0-d data", DASH + ["scalar"], 2, r"scalar\.safetensors': the data is a torch\.int64 tensor of shape \[\]"),
    ("dashboard components not integers", DASH + ["tokens", "--components", "0,x"], 2, r"--components: \('0,x',\): give component indices as integers"),
    ("dashboard one sequence", DASH + ["flat"], 1, r"cannot run on the data: a batch is a torch\.int64 tensor of shape \[16\]"),
    ("export float ids", EXPORT + ["float"], 2, r"float\.safetensors': the data is a torch\.float32 tensor .*integer token ids \(torch\.int64\)"),
    ("export ids beyond the vocabulary", EXPORT + ["big"], 2, r"big\.safetensors': token ids range over \[2\d\d, 296\]"),
    ("export NaN data", EXPORT + ["nan"], 2, r"nan\.safetensors': the data \(torch\.float32 tensor of shape \[4, 16\] .*\) holds 64 NaN"),
    ("export unreadable data file", EXPORT + ["garbage"], 2, r"garbage\.safetensors' is not a readable safetensors file"),
    ("compare ids beyond the vocabulary", COMPARE + ["big"], 2, r"big\.safetensors': token ids range over \[2\d\d, 296\]"),
    ("compare SAE cfg.json a list", [a.replace("SAE", "SAE_LIST") for a in COMPARE] + ["tokens"], 2, r"SAE_DIR: '.*cfg\.json' holds a JSON list"),
    ("compare an export root", [a.replace("SAE", "EXPORT") for a in COMPARE] + ["tokens"], 2, r"It is an export root; use load_export"),
]


@pytest.mark.parametrize("case, args, code, match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_commands_refuse(lm_run, tmp_path, case, args, code, match):
    places = {"RUN": lm_run / "run", "MODEL": lm_run / "model", "OUT": tmp_path / "out", "SAE": lm_run / "export" /
              "transformer.h.0.mlp.c_fc", "SAE_LIST": lm_run / "sae-list", "EXPORT": lm_run / "export"}
    args = [str(places.get(a, lm_run / f"{a}.safetensors" if before == "--data" else a))
            for before, a in zip([None] + args, args)]
    result = CliRunner().invoke(main, args)
    output = " ".join(result.output.split())
    assert result.exit_code == code, output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert re.search(match, output.replace('"', "'")), output
    assert list(tmp_path.iterdir()) == [], "a refused command wrote output"


# -- faults: a command killed with SIGKILL while it writes leaves its output whole or absent -------------------------

def written(name: str):
    """A kill point: the file `name` is in a new temporary output directory."""
    return lambda tmps, _: any((t / name).is_file() for t in tmps)


def test_export_killed_while_writing_leaves_no_half_written_output(lm_run, tmp_path):
    out = tmp_path / "out"
    site = "transformer.h.0.mlp.c_fc"
    args = ["export", str(lm_run / "run"), str(out), "--model", str(lm_run / "model")]
    kill_when(args, out, written(f"{site}/sae_weights.safetensors"))  # a site half written
    assert not out.exists()
    kill_when(args, out, written("export.json"))  # everything written but not yet renamed
    assert not out.exists() and len(temporary_dirs(out)) == 2  # the strays are left beside, in nobody's way
    assert CliRunner().invoke(main, args).exit_code == 0
    old = (out / site / "sae_weights.safetensors").read_bytes()
    kill_when(args + ["--force"], out, written("export.json"))  # killed while replacing
    assert set(load_export(out)) == {site} and (out / site / "sae_weights.safetensors").read_bytes() == old


def test_dashboard_killed_while_writing_leaves_no_half_written_output(lm_run, tmp_path):
    out = tmp_path / "dash"
    args = ["dashboard", str(lm_run / "run"), "--model", str(lm_run / "model"), "--data",
            str(lm_run / "tokens.safetensors"), "--out", str(out), "--no-progress"]
    kill_when(args, out, lambda tmps, _: any(any(t.glob("*.html")) for t in tmps))  # a page, not the index
    assert not out.exists()
    assert CliRunner().invoke(main, args).exit_code == 0 and (out / "index.html").is_file()
