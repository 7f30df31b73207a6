"""Frozen CLIP backbone: the shipped tiny config builds offline, feature shapes, freezing, text tower."""

import open_clip
import pytest
import torch
from torch import nn

from dearli.config_model import BackboneConfig
from dearli.errors import ConfigError, DataError
from dearli.model.backbone import FrozenClipBackbone, build_backbone, register_dearli_clip_configs

TINY = "dearli-convnext-atto"


def test_tiny_config_is_shipped_and_registered():
    assert TINY in register_dearli_clip_configs()
    assert TINY in open_clip.list_models()
    cfg = open_clip.get_model_config(TINY)
    assert cfg["vision_cfg"]["timm_model_name"] == "convnext_atto"
    assert cfg["vision_cfg"]["timm_model_pretrained"] is False
    assert cfg["text_cfg"]["layers"] == 2


def test_feature_shapes_and_strides(backbone):
    images = torch.rand(2, 3, 64, 96) * 255
    out = backbone(images)
    assert set(out) == {"res2", "res3", "res4", "res5", "clip_vis_dense"}
    for name, (channels, stride) in backbone.output_shape.items():
        assert out[name].shape == (2, channels, 64 // stride, 96 // stride), name
    assert [backbone.output_shape[f"res{i}"][1] for i in range(2, 6)] == [4, 8, 16, 32]
    assert backbone.output_shape["clip_vis_dense"] == backbone.output_shape["res5"]
    assert backbone.embed_dim == 128


def test_pixel_statistics_are_clip_in_0_255_scale(backbone):
    expected = [255 * m for m in open_clip.OPENAI_DATASET_MEAN]
    assert backbone.pixel_mean == pytest.approx(expected)
    assert backbone.pixel_std == pytest.approx([255 * s for s in open_clip.OPENAI_DATASET_STD])


def test_frozen_no_grad_and_stays_eval(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    parent = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(4, 4)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in backbone.clip.modules())

    images = (torch.rand(1, 3, 64, 64) * 255).requires_grad_(True)
    out = backbone(images)
    assert not any(v.requires_grad for v in out.values())

    head = nn.Linear(backbone.embed_dim, 1)
    pooled = out["clip_vis_dense"].mean((2, 3)).requires_grad_(True)
    head(backbone.visual_prediction(pooled)).sum().backward()
    assert pooled.grad is not None and head.weight.grad is not None
    assert all(p.grad is None for p in backbone.parameters())


def test_visual_prediction_matches_clip_image_head(backbone):
    # Pooling the whole dense map and running visual_prediction is CLIP's own image encoder.
    images = torch.rand(2, 3, 64, 64) * 255
    dense = backbone(images)["clip_vis_dense"]
    ours = backbone.visual_prediction(dense.mean((2, 3))[:, None])[:, 0]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        normalised = (images / 255 - mean) / std
        theirs = backbone.clip.encode_image(normalised)
    assert ours.shape == (2, backbone.embed_dim)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_encode_text_and_logit_scale(backbone):
    emb = backbone.encode_text(["a photo of a cat.", "a photo of a dog.", "a photo of a cat."])
    assert emb.shape == (3, backbone.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])
    assert not emb.requires_grad
    assert backbone.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init


def test_local_checkpoint_loads_offline(backbone, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(backbone.clip.state_dict(), path)
    loaded = build_backbone(BackboneConfig(clip_model=TINY, pretrained=str(path)))
    for (name, a), b in zip(backbone.clip.state_dict().items(), loaded.clip.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.pretrained == str(path)


def test_bad_model_or_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_backbone(BackboneConfig(clip_model="no-such-clip", pretrained=""))
    with pytest.raises(DataError, match="not found"):
        build_backbone(BackboneConfig(clip_model=TINY, pretrained=str(tmp_path / "missing.pt")))


def test_non_convnext_tower_is_rejected():
    fake = nn.Module()
    fake.visual = nn.Module()
    fake.visual.trunk = nn.Identity()
    with pytest.raises(ConfigError, match="ConvNeXt"):
        FrozenClipBackbone(fake, "fake")
