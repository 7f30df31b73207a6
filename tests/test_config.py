import re

import pytest
import yaml

from dearli.cli import main
from dearli.config import Config, load_config, save_config
from dearli.config_io import from_dict, list_presets, to_dict
from dearli.errors import ConfigError


@pytest.mark.parametrize("preset", list_presets())
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert from_dict(Config, to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "config.yaml")
    assert from_dict(Config, yaml.safe_load(path.read_text())) == cfg


def test_presets_differ_where_the_paper_says():
    assert set(list_presets()) >= {"tiny", "base", "large"}
    assert load_config("base").model.backbone.clip_model == "convnext_base_w_320"
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
    ("data.short_sides=[]", "data.short_sides: must be a non-empty list"),
    ("data.short_sides=[512, x]", "data.short_sides[1]: expected int"),
    ("data.short_sides=640", "data.short_sides: expected a list"),
    ("data.max_size=100", "data.max_size: must be >= the largest of data.short_sides (160)"),
    ("data.hue_delta=91", "data.hue_delta: must lie in [0, 90]"),
    ("ssl.precision=bf16", "ssl.precision: must be one of fp32, amp"),
    ("train.supervised_steps={1_8: 100}", "train.supervised_steps: expected str, got int 18 (quote it"),
    ("train.supervised_steps.1_8=0", "train.supervised_steps.1_8: must be positive"),
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
    # Saved by an older version, before a field with a default existed: the same run, continued as it is.
    older = "\n".join(line for line in path.read_text().splitlines() if "on_valid_mask" not in line) + "\n"
    path.write_text(older)
    save_config(load_config("tiny"), path)
    assert path.read_text() == older
    with pytest.raises(ConfigError, match="different configuration"):
        save_config(load_config("tiny", ["model.ensemble.on_valid_mask=true"]), path)


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: dearli" in capsys.readouterr().out


def test_preset_files_extend_presets_and_files(tmp_path):
    (tmp_path / "parent.yaml").write_text("extends: tiny\noptim:\n  lr: 0.5\ntrain:\n  max_steps: 9\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\ntrain:\n  max_steps: 3\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    # child over parent (relative to the child's folder) over the shipped tiny preset over the defaults
    assert cfg.train.max_steps == 3 and cfg.optim.lr == 0.5
    assert cfg.model.backbone.clip_model == load_config("tiny").model.backbone.clip_model
    (tmp_path / "loop_a.yaml").write_text("extends: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("extends: loop_a.yaml\n")
    with pytest.raises(ConfigError, match="forms a cycle"):
        load_config(str(tmp_path / "loop_a.yaml"))
    (tmp_path / "orphan.yaml").write_text("extends: nope\n")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(str(tmp_path / "orphan.yaml"))
    (tmp_path / "bad.yaml").write_text("extends: [tiny]\n")
    with pytest.raises(ConfigError, match="'extends' must name a preset or a YAML file"):
        load_config(str(tmp_path / "bad.yaml"))
    assert "extends" not in to_dict(cfg)


def test_a_file_written_before_a_field_was_removed_still_reads():
    values = to_dict(load_config("tiny"))
    values["model"]["backbone"]["input_size"] = 0  # BackboneConfig.input_size, removed (it was never read)
    assert from_dict(Config, values) == load_config("tiny")
    values["model"]["backbone"]["input_sise"] = 0  # a typo is still refused
    with pytest.raises(ConfigError, match=r"model\.backbone: unknown key\(s\) input_sise"):
        from_dict(Config, values)
