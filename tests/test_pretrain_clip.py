"""Small-CLIP pre-training: pairs of the pretrain stream, the checkpoint format, the content cache, the CLI."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import pytest
import torch
from _reference import make_pair

from dearli.cli import main
from dearli.config import load_config
from dearli.config_model import BackboneConfig
from dearli.data.synth.captions import plural
from dearli.data.synth.classes import CLASSES, THING_CLASSES
from dearli.data.synth.world import SynthWorld
from dearli.errors import ConfigError, DataError
from dearli.model.backbone import build_backbone
from dearli.model.m2f_lang import build_m2f_lang
from dearli.pretrain.checkpoint import (
    cached_path,
    content_key,
    ensure_pretrained_clip,
    read_metadata,
    shipped_checkpoint,
    write_checkpoint,
)
from dearli.pretrain.clip import PretrainOptions, create_clip
from dearli.pretrain.pairs import GROUP_SIZE, PairOptions, make_batch, make_group, pick_instance
from dearli.pretrain.resolve import resolve_clip

TINY = PretrainOptions(steps=2, batch_size=4, warmup=1, pairs=PairOptions(image_size=64))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache holding the checkpoint of TINY; ``trained`` lists the steps the training loop logged."""
    root = tmp_path_factory.mktemp("clip_cache")
    trained: list[int] = []
    path = ensure_pretrained_clip(root, options=TINY, log=lambda step, metrics: trained.append(step))
    return root, path, trained


def _names_in(caption: str) -> set[int]:
    return {c.id for c in CLASSES if any(n in caption or plural(n) in caption for n in c.names)}


def test_crop_pairs_caption_what_is_visible():
    world = SynthWorld(3)
    options = PairOptions(image_size=64, paste_prob=0.0, crop_prob=1.0, focus_prob=0.0, synonym_prob=0.0,
                          prefix_prob=0.0)
    sizes = []
    for index in range(40):
        image, caption = make_pair(world, index, options)
        assert image.shape == (3, 64, 64) and 0 <= float(image.min()) and float(image.max()) <= 255
        named = _names_in(caption)
        assert named and named <= world.sample(index // GROUP_SIZE, "pretrain").category_ids, caption
        sizes.append(len(caption))
    assert np.mean(sizes) < np.mean([len(world.sample(i, "pretrain").caption) for i in range(40)])


def test_crop_targets_balance_the_long_tail():
    world = SynthWorld(3)
    scenes = [world.sample(i, "pretrain") for i in range(400)]
    rng = np.random.default_rng(0)
    targets = Counter(pick_instance(rng, s, PairOptions().balance)["category_id"] for s in scenes)
    instances = Counter(seg["category_id"] for s in scenes for seg in s.segments if seg["category_id"] in targets)
    counts = [targets[c.id] for c in THING_CLASSES]
    raw = [instances[c.id] for c in THING_CLASSES]
    # The stream itself is Zipfian (head ~10x the tail); balanced targets stay within a small factor.
    assert max(raw) >= 6 * min(raw) and max(counts) <= 2.5 * min(counts), (raw, counts)


def test_pairs_are_deterministic_and_reworded():
    world = SynthWorld(0)
    options = PairOptions(image_size=64, synonym_prob=1.0, prefix_prob=1.0)
    images, captions = make_batch(world, 10, 3, options)
    again = make_pair(world, 11, options)
    assert torch.equal(images[1], again[0]) and captions[1] == again[1]
    assert all(c.split()[0] in {"a", "an", "there", "this"} for c in captions)
    synonyms = {n for c in CLASSES for n in c.names[1:]}
    assert any(s in c for c in captions for s in synonyms)


def test_minimal_pairs_differ_in_one_object_of_one_attribute():
    world = SynthWorld(1)
    options = PairOptions(image_size=64, paste_prob=1.0, synonym_prob=0.0, prefix_prob=0.0, focus_prob=1.0)
    for group in range(6):
        (first, caption_a), (second, caption_b) = make_group(world, group, options)
        same = (first == second).all(dim=0).float().mean()
        assert 0.3 < same < 1.0, group  # one object differs, the scene around it does not
        (a,), (b,) = _names_in(caption_a), _names_in(caption_b)
        assert a != b and CLASSES[a].isthing and CLASSES[b].isthing
        same_colour = CLASSES[a].name.split()[0] == CLASSES[b].name.split()[0]
        assert same_colour != (CLASSES[a].kind == CLASSES[b].kind), (caption_a, caption_b)


def test_checkpoint_loads_as_the_backbone_weights(cache):
    _, path, trained = cache
    assert trained == [TINY.steps]
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    loaded = build_backbone(BackboneConfig(clip_model=TINY.model, pretrained=str(path)))
    for name, tensor in loaded.clip.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    torch.manual_seed(TINY.seed)  # the init the training started from
    random = build_backbone(BackboneConfig(clip_model=TINY.model, pretrained=""))
    changed = [n for n, t in random.clip.state_dict().items() if not torch.equal(t, saved[n])]
    assert "visual.trunk.stem.0.weight" in changed and "token_embedding.weight" in changed
    assert read_metadata(path)["options"]["steps"] == TINY.steps


def test_model_config_override_loads_the_checkpoint(cache):
    _, path, _ = cache
    cfg = load_config("tiny", [f"model.backbone.pretrained={path}"]).model
    model = build_m2f_lang(cfg, [list(c.names) for c in CLASSES])
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.backbone.clip.visual.head.proj.weight, saved["visual.head.proj.weight"])
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_cache_returns_the_same_file_without_training(cache):
    root, path, trained = cache
    stat = path.stat()
    again: list[int] = []
    assert ensure_pretrained_clip(root, options=TINY, log=lambda step, metrics: again.append(step)) == path
    assert again == [] and path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino
    assert cached_path(root, dataclasses.replace(TINY, seed=1)) != path
    assert cached_path(root, dataclasses.replace(TINY, steps=3)) != path
    assert cached_path(root, dataclasses.replace(TINY, pairs=PairOptions(image_size=96))) != path
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_cache_never_overwrites_a_foreign_file(cache, tmp_path):
    _, path, _ = cache
    foreign = cached_path(tmp_path, dataclasses.replace(TINY, seed=5))
    foreign.write_bytes(path.read_bytes())  # a checkpoint of other settings under this name
    with pytest.raises(DataError, match="other pre-training settings"):
        ensure_pretrained_clip(tmp_path, options=dataclasses.replace(TINY, seed=5))
    assert foreign.read_bytes() == path.read_bytes()


def test_cli_writes_a_new_file_and_refuses_an_existing_one(tmp_path, capsys):
    out = tmp_path / "clip.pt"
    argv = ["pretrain-clip", "--out", str(out), "--steps", "1", "--batch-size", "2", "--image-size", "64",
            "--seed", "4"]
    assert main(argv + ["--eval-images", "2"]) == 0
    meta = read_metadata(out)
    assert meta["options"]["seed"] == 4 and meta["options"]["pairs"]["image_size"] == 64
    printed = capsys.readouterr().out
    assert "checkpoint:" in printed
    figures = re.search(r"things ([\d.]+)%, stuff ([\d.]+)%, thing crops ([\d.]+)%, chance 5.0%", printed)
    assert figures and all(0.0 <= float(v) <= 100.0 for v in figures.groups()), printed
    before = out.read_bytes()
    assert main(argv) == 1
    assert "exists already" in capsys.readouterr().err and out.read_bytes() == before
    assert np.isfinite(torch.load(out, weights_only=True)["state_dict"]["logit_scale"].item())


def test_the_synth_preset_resolves_to_the_cached_project_clip(tmp_path):
    cfg = load_config("synth")
    with pytest.raises(ConfigError, match="model.backbone.pretrained: 'dearli-synth' must be resolved"):
        build_backbone(cfg.model.backbone)
    assert resolve_clip(load_config("tiny"), tmp_path) == load_config("tiny")  # nothing to resolve
    expected = cached_path(tmp_path, PretrainOptions())
    planned = resolve_clip(cfg, tmp_path, train=False)  # a dry run: the path only, nothing trained
    assert planned.model.backbone.pretrained == str(expected) and not expected.exists()
    # a checkpoint of the default options in the cache is used as it is, without training
    torch.manual_seed(3)
    write_checkpoint(create_clip(PretrainOptions().model), PretrainOptions(), expected)
    lines: list[str] = []
    resolved = resolve_clip(cfg, tmp_path, log=lines.append)
    assert lines == [] and resolved.model.backbone.pretrained == str(expected)
    assert resolved.model.ensemble == cfg.model.ensemble and resolved.data == cfg.data
    saved = torch.load(expected, map_location="cpu", weights_only=True)["state_dict"]
    backbone = build_backbone(resolved.model.backbone)
    assert torch.equal(backbone.clip.state_dict()["visual.trunk.stem.0.weight"], saved["visual.trunk.stem.0.weight"])


def test_the_package_ships_the_default_clip_and_an_empty_cache_copies_it(tmp_path, monkeypatch):
    shipped = shipped_checkpoint(PretrainOptions())
    assert shipped is not None, "the package ships no CLIP of the default options: run 'dearli pretrain-clip "
    "--cache-dir DIR' and put the file in dearli/pretrain/weights"
    assert read_metadata(shipped)["key"] == content_key(PretrainOptions())  # the file matches today's settings
    assert shipped_checkpoint(TINY) is None  # other options train as before

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the package ships the checkpoint")

    monkeypatch.setattr("dearli.pretrain.checkpoint.train_clip", no_training)
    lines: list[str] = []
    resolved = resolve_clip(load_config("synth"), tmp_path, log=lines.append)
    path = cached_path(tmp_path, PretrainOptions())
    assert resolved.model.backbone.pretrained == str(path) and path.read_bytes() == shipped.read_bytes()
    assert len(lines) == 1 and "comes with the package" in lines[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
