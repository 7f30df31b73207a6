import re

import pytest
import yaml

from dearli.cli import main
from dearli.config import Config, from_dict, list_presets, load_config, save_config, to_dict
from dearli.errors import ConfigError


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert from_dict(Config, to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "config.yaml")
    assert from_dict(Config, yaml.safe_load(path.read_text())) == cfg


def test_presets_differ_where_the_paper_says():
    assert set(list_presets()) >= {"tiny", "base", "large"}
    assert load_config("base").model.backbone.clip_model == "convnext_base_w"
    assert load_config("large").model.backbone.clip_model == "convnext_large_d_320"
    assert load_config("base").model.transformer_decoder.num_queries == 200
    assert load_config("tiny").model.backbone.pretrained == ""


def test_overrides_apply_and_parse_types():
    assert load_config("tiny", ["optim.lr=1e-4"]).optim.lr == 1e-4
    cfg = load_config("tiny", ["optim.lr=0.001", "train.max_steps=7", "model.ensemble.alpha_clip=0.25",
                               "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 0.001 and cfg.train.max_steps == 7
    assert cfg.model.ensemble.alpha_clip == 0.25 and cfg.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim: unknown key(s) lrr"),
    ("train.max_steps=abc", "train.max_steps: expected int"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("train.amp=3", "train.amp: expected bool"),
    ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
    ("model.ensemble.alpha_clip=1.5", "model.ensemble.alpha_clip: must lie in [0, 1]"),
    ("data.crop_size=100", "data.crop_size: must be a multiple of 32"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("nonsense", "expected key.sub=value"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override])


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))


def test_save_config_never_replaces_a_different_one(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config("tiny"), path)
    save_config(load_config("tiny"), path)  # identical: fine
    with pytest.raises(ConfigError, match="different configuration"):
        save_config(load_config("tiny", ["optim.lr=0.5"]), path)


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: dearli" in capsys.readouterr().out
