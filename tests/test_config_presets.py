"""The shipped presets hold DEARLi's recipe (official configs + paper), value by value, so an edit cannot drift."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest

from dearli.config import load_config, supervised_config
from dearli.config_io import list_presets
from dearli.config_model import PROJECT_CLIP
from dearli.model.backbone import register_dearli_clip_configs

BACKBONES = {
    "base": ("convnext_base_w_320", "laion_aesthetic_s13b_b82k_augreg"),
    "large": ("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup"),
}
# Per dataset: training crop, short sides (detectron2 "choice"), long-side cap, test short side / cap, DeWa
# steps (the paper: 80k ADE20K, 160k COCO), the supervised baselines' steps per partition (the supplement:
# 10k at the smallest partition, +10k per larger one).
ADE20K = {"crop": 640, "short_sides": tuple(range(320, 1281, 64)), "max_size": 2560, "test": (640, 2560),
          "warmup_steps": 80_000, "partitions": ("1_128", "1_64", "1_32", "1_16", "1_8")}
COCO = {"crop": 512, "short_sides": tuple(int(0.1 * k * 512) for k in range(5, 21)), "max_size": 2048,
        "test": (512, 2048), "warmup_steps": 160_000, "partitions": ("1_512", "1_256", "1_128", "1_64", "1_32")}
DATASETS = {"ade20k": ADE20K, "coco": COCO, "coco-objects": COCO}
DATASET_PRESETS = [(f"{name}-{size}", name, size) for name in DATASETS for size in BACKBONES]


def test_every_shipped_preset_is_covered():
    assert set(list_presets()) == {p for p, _, _ in DATASET_PRESETS} | set(BACKBONES) | {"tiny", "synth", "synth-quick"}


@pytest.mark.parametrize("preset,dataset,size", DATASET_PRESETS, ids=[p for p, _, _ in DATASET_PRESETS])
def test_dataset_preset_holds_the_paper_recipe(preset, dataset, size):
    cfg, want = load_config(preset), DATASETS[dataset]
    model = cfg.model
    assert (model.backbone.clip_model, model.backbone.pretrained) == BACKBONES[size]
    assert model.transformer_decoder.num_queries == 200
    assert (model.transformer_decoder.hidden_dim, model.transformer_decoder.num_layers) == (256, 9)
    assert model.ensemble.alpha_clip == 0.4 and model.ensemble.schedule == "constant"
    assert model.inference.object_mask_threshold == 0.0 and model.inference.overlap_threshold == 0.8
    assert (model.inference.test_short_side, model.inference.test_max_size) == want["test"]
    assert (model.loss.class_weight, model.loss.mask_weight, model.loss.dice_weight) == (2.0, 5.0, 5.0)
    assert model.loss.num_points == 12544 and model.loss.no_object_weight == 0.1
    data = cfg.data
    assert data.crop_size == want["crop"] and data.short_sides == want["short_sides"]
    assert data.max_size == want["max_size"]
    assert data.flip and data.color_aug and data.hue_delta == 18
    optim = cfg.optim
    assert (optim.lr, optim.weight_decay, optim.poly_power, optim.clip_grad) == (1e-4, 0.05, 0.9, 0.01)
    # Mean Teacher: 80k iterations of 8 labeled + 8 unlabeled images, in fp32 as upstream.
    assert cfg.train.max_steps == 80_000
    assert (cfg.ssl.labeled_batch_size, cfg.ssl.unlabeled_batch_size) == (8, 8)
    assert cfg.ssl.precision == "fp32" and cfg.ssl.ema_decay == 0.999 and cfg.ssl.cutmix_prob == 0.5
    assert not cfg.ssl.truth_stats  # the teacher reads no annotation of the unlabeled images
    assert (cfg.warmup.batch_size, cfg.warmup.max_steps) == (16, want["warmup_steps"])
    # Supervised-only baselines: batch 8; 10k, 20k, ... from the smallest partition up.
    assert cfg.train.batch_size == 8
    steps = {name: supervised_config(dataclasses.replace(cfg, data=dataclasses.replace(data, partition=name)))
             .train.max_steps for name in want["partitions"]}
    assert steps == {name: 10_000 * (i + 1) for i, name in enumerate(want["partitions"])}
    assert supervised_config(cfg).train.max_steps == 80_000  # no partition named: unchanged


@pytest.mark.parametrize("size", BACKBONES)
def test_coco_objects_presets_equal_coco_presets(size):
    """The official COCO-Objects configs differ from COCO's only in the dataset (and so its classes)."""
    assert load_config(f"coco-objects-{size}") == load_config(f"coco-{size}")


@pytest.mark.parametrize("size", BACKBONES)
def test_model_presets_are_the_dataset_presets_model(size):
    """``base`` / ``large`` are the dataset-independent part: the dataset presets only add sizes and schedules."""
    model_only = load_config(size)
    for dataset in DATASETS:
        cfg = load_config(f"{dataset}-{size}")
        inference = dataclasses.replace(model_only.model.inference, test_short_side=cfg.model.inference.test_short_side,
                                        test_max_size=cfg.model.inference.test_max_size)
        assert dataclasses.replace(model_only.model, inference=inference) == cfg.model
        assert (cfg.optim, cfg.ssl) == (model_only.optim, model_only.ssl)


@pytest.mark.parametrize("size", BACKBONES)
def test_backbone_weights_are_known_to_open_clip(size):
    clip_model, tag = BACKBONES[size]
    register_dearli_clip_configs()
    assert tag in open_clip.list_pretrained_tags_by_model(clip_model)
    assert open_clip.get_model_config(clip_model)["vision_cfg"]["timm_model_name"].startswith("convnext_")


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_keeps_every_non_void_query(preset):
    """Every preset can run the Mean-Teacher stage, whose teacher (as upstream's) keeps all non-void queries."""
    assert load_config(preset).model.inference.object_mask_threshold == 0.0


def test_tiny_preset_for_the_synthetic_world():
    cfg = load_config("tiny")
    assert cfg.data.crop_size == 128 and cfg.data.short_sides == (96, 112, 128, 144, 160)
    assert cfg.data.color_aug and cfg.data.hue_delta == 0  # colour names the synthetic classes
    assert cfg.model.backbone.pretrained == "" and cfg.model.ensemble.alpha_clip == 0.0
    assert cfg.train.supervised_steps == {}
    assert cfg.ssl.truth_stats and load_config("synth").ssl.truth_stats  # the world's truth scores the labels
    assert not load_config("base").ssl.truth_stats and not load_config("large").ssl.truth_stats


def test_synth_preset_is_tiny_on_the_project_clip_with_the_ensemble_on():
    cfg, tiny = load_config("synth"), load_config("tiny")
    assert cfg.model.backbone.pretrained == PROJECT_CLIP and cfg.model.ensemble.alpha_clip > 0
    assert cfg.model.transformer_decoder == tiny.model.transformer_decoder and cfg.data == tiny.data


def test_the_quick_preset_is_synth_on_a_shorter_schedule():
    quick, synth = load_config("synth-quick"), load_config("synth")
    assert quick.model == synth.model and quick.data == synth.data
    assert (quick.train.max_steps, quick.warmup.max_steps, quick.ssl.burn_in_steps) == (1600, 200, 100)
    assert quick.ssl.ema_decay == 0.98 and synth.train.max_steps == 3000
    from dearli.stages.pipeline import PipelineOptions

    assert PipelineOptions().preset == "synth"  # the main job keeps the schedule whose gain is clear
