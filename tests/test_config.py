"""Typed configs from YAML/dicts: strict keys with a did-you-mean, type and range errors, shipped examples load."""
from __future__ import annotations


import pytest

from decomp_hooks.config import ConfigError, DecomposeConfig, config_path, load_config
from decomp_hooks.configs import CONFIG_DIR, config_names

@pytest.mark.parametrize("name", config_names())
def test_shipped_configs_load_by_name_from_anywhere(name, tmp_path, monkeypatch):
    """Decomposition configs load as DecomposeConfig, LIB configs (`lib_*`) as the LIB run config, by name from any
    working directory.

    A decomposition config is a CLI run (a toy target and its sites, or a `model:` section), or settings applied
    from Python that name neither (`lm_tiny`: the examples pass their own model and targets).
    """
    monkeypatch.chdir(tmp_path)
    if name.startswith("lib_"):
        from decomp_hooks.lib.config import load_lib_run_config

        cfg = load_lib_run_config(name)
        assert cfg.lib.layers and cfg.target.toy
        return
    cfg = load_config(name)
    assert cfg == load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.losses or cfg.method == "apd"
    toy = cfg.targets and cfg.target is not None and cfg.target.toy
    lm = cfg.model is not None and cfg.model.source and cfg.data is not None
    assert toy or lm or (not cfg.targets and cfg.target is None and cfg.model is None)


def test_config_names_resolve_stems_and_report_typos():
    assert config_path("small_vpd") == CONFIG_DIR / "lm" / "small_vpd.yaml" == config_path("lm/small_vpd.yaml")
    with pytest.raises(ConfigError, match="Did you mean 'tms_5-2'"):
        load_config("tms_5_2")


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config({"targets": {"fc": 8}, "losses": [{"type": "stochastic_recon"}]})
    assert cfg.ci.type == "mlp" and cfg.train.lr == 1e-3 and cfg.use_delta_component
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("data,match", [
    ({"tagrets": {}}, "unknown key 'tagrets'. Did you mean 'targets'"),
    ({"train": {"stpes": 3}}, "config.train: unknown key 'stpes'. Did you mean 'steps'"),
    ({"train": {"steps": "many"}}, r"config.train.steps: expected int, got 'many'"),
    ({"train": {"lr": -1.0}}, r"train.lr=-1.0: must be finite and > 0"),
    ({"ci": {"type": "transformer"}}, "ci.type='transformer'"),
    ({"losses": [{"type": "stochastic_recn"}]}, "Did you mean 'stochastic_recon'"),
    ({"losses": [{"type": "importance_minimality", "pnorm": 0}]}, r"pnorm=0.0: must be finite and > 0"),
    ({"targets": {"fc": 0}}, r"targets\['fc'\]=0: C must be a positive integer"),
    ({"output_loss": "l1"}, "output_loss='l1'"),
    ({"losses": [{"type": "importance_minimality", "site_coeffs": {"fc": -1}}]}, r"site_coeffs\['fc'\]=-1.0: must be ≥ 0"),
    ({"losses": [{"type": "stochastic_recon", "site_coeffs": {"fc": 0.5}}]}, r"only importance_minimality, .*ci_masked_recon_layerwise take"),
])
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_object_is_copied():
    cfg = DecomposeConfig(targets={"a": 2}, losses=[])
    assert load_config(cfg) is not cfg
