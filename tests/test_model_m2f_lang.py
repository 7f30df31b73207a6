"""The assembled M2F-Lang model: shapes per preset, gradient flow, frozen backbone, vocabulary, overfitting."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from dearli.bench.step import synthetic_batch
from dearli.config import load_config
from dearli.data.synth.classes import CLASSES
from dearli.losses.criterion import build_criterion, total_loss
from dearli.model.backbone import register_dearli_clip_configs
from dearli.model.m2f_lang import M2FLang, build_m2f_lang
from dearli.training.optim import build_optimizer
from dearli.training.step import make_grad_scaler, move_batch, train_step

SYNONYMS = [list(c.names) for c in CLASSES]
NUM_CLASSES = len(CLASSES)
# Few points keep matching and losses cheap; the gradient paths are the same as with 112² points.
LOSS_OVERRIDES = ["model.loss.num_points=256"]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model() -> M2FLang:
    torch.manual_seed(0)
    return build_m2f_lang(load_config("tiny").model, SYNONYMS)


@pytest.fixture
def model(tiny_model: M2FLang) -> M2FLang:
    """A private copy of the tiny model, free to be trained, nudged or given another vocabulary."""
    return copy.deepcopy(tiny_model)


def _batch(height: int, width: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return move_batch(synthetic_batch(2, (height, width)), CPU)


def _nudge_deformable_attention(model: M2FLang) -> None:
    """Move off the deformable-attention initialisation, as a first optimizer step would.

    Its query->offset and query->weight matrices start at zero, so at initialisation the attention
    output does not depend on the query and the encoder's level embedding gets an exactly zero gradient.
    """
    with torch.no_grad():
        for layer in model.pixel_decoder.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=1e-2)
            layer.self_attn.attention_weights.weight.normal_(std=1e-2)


@pytest.mark.parametrize("preset,height,width", [("tiny", 128, 96), ("tiny", 160, 128)])
def test_output_shapes(preset, height, width, tiny_model):
    cfg = load_config(preset).model
    queries, layers = cfg.transformer_decoder.num_queries, cfg.transformer_decoder.num_layers
    images, _ = _batch(height, width)
    with torch.no_grad():
        out = tiny_model(images)
        zero_shot = tiny_model.zero_shot_logits(out)
    assert out["pred_logits"].shape == (2, queries, NUM_CLASSES + 1)
    assert out["pred_masks"].shape == (2, queries, height // 4, width // 4)
    assert out["query_features"].shape == (2, queries, cfg.transformer_decoder.hidden_dim)
    assert len(out["aux_outputs"]) == layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_masks"].shape == out["pred_masks"].shape
    dense_channels, stride = tiny_model.backbone.output_shape["clip_vis_dense"]
    assert stride == 32
    assert out["clip_vis_dense"].shape == (2, dense_channels, height // 32, width // 32)
    assert zero_shot.shape == (2, queries, NUM_CLASSES + 1)
    # CLIP has no void class: its column must lose every softmax.
    assert (zero_shot[..., -1] < zero_shot[..., :-1].min(-1).values).all()
    for tensor in (out["pred_logits"], out["pred_masks"], out["clip_vis_dense"], zero_shot[..., :-1]):
        assert torch.isfinite(tensor).all()


def test_every_trainable_parameter_learns_and_the_backbone_stays_frozen(model):
    cfg = load_config("tiny", LOSS_OVERRIDES)
    _nudge_deformable_attention(model)
    model.train()
    assert model.pixel_decoder.training and model.transformer_decoder.training
    assert not any(m.training for m in model.backbone.clip.modules()), "backbone must stay in eval mode"
    images, targets = _batch(128, 96)
    out = model(images)
    losses = build_criterion(cfg.model.loss, model.num_classes)(out, targets)
    assert len(losses) == 3 * (1 + cfg.model.transformer_decoder.num_layers)  # final + every aux prediction
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total_loss(losses).backward()
    for name, p in model.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, f"backbone.{name} is not frozen"
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in trainable} == {"pixel_decoder", "transformer_decoder"}
    for name, p in trainable:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_class_weight_zero_gives_the_classifier_zero_gradients(model):
    # The class-agnostic warm-up on SAM masks relies on this: it trains masks, not classes. The class loss is
    # multiplied by 0 (as upstream), so the head gets zero gradients: AdamW then only decays it.
    cfg = load_config("tiny", LOSS_OVERRIDES + ["model.loss.class_weight=0"])
    model.train()
    images, targets = _batch(64, 64)
    losses = build_criterion(cfg.model.loss, model.num_classes)(model(images), targets)
    assert all(value.item() == 0.0 for name, value in losses.items() if name.startswith("loss_ce"))
    total_loss(losses).backward()
    head = dict(model.transformer_decoder.class_head.named_parameters())
    assert head, "the classifier has no parameters to check"
    for name, p in head.items():
        assert p.grad is not None and not p.grad.any(), f"class_head.{name}: expected a zero gradient"
    mask_embed = list(model.transformer_decoder.mask_embed.parameters())
    assert all(p.grad is not None and p.grad.any() for p in mask_embed), "the mask head must still learn"


def test_synonyms_give_one_column_per_class_and_vocabularies_swap(model):
    model.eval()
    images, _ = _batch(64, 64)
    with torch.no_grad():
        queries = model(images)["query_features"]
        model.set_classes([["red disk", "circle"], ["sky"], ["grass"]])  # K = 3 classes, S = 4 synonyms
        assert model.text.embeddings.shape[0] == 4 and model.num_classes == 3
        out = model(images)
        assert out["pred_logits"].shape == (2, 32, 3 + 1)
        assert model.zero_shot_logits(out).shape == (2, 32, 3 + 1)
        merged = model.classifier(queries)
        model.set_classes([["red disk"], ["circle"], ["sky"], ["grass"]])
        split = model.classifier(queries)
        assert split.shape == (2, 32, 4 + 1)
        # A class scores its best synonym; the other classes and void are unchanged.
        torch.testing.assert_close(merged[..., 0], split[..., :2].amax(-1))
        torch.testing.assert_close(merged[..., 1:], split[..., 2:])
        model.set_classes([["sky"], ["sand"]])
        assert model(images)["pred_logits"].shape == (2, 32, 2 + 1)


def test_base_preset_builds_offline_with_random_weights():
    # One test only: building convnext_base_w_320 (~180 M parameters) takes ~10 s on a small CPU.
    cfg = load_config("base", ["model.backbone.pretrained="])
    torch.manual_seed(0)
    model = build_m2f_lang(cfg.model)
    assert model.backbone.model_name == "convnext_base_w_320" and model.backbone.pretrained == ""
    assert model.backbone.embed_dim == 640
    decoder = model.transformer_decoder
    assert decoder.query_feat.weight.shape == (200, 256)
    assert decoder.num_layers == 9 and len(decoder.cross_attention_layers) == 9
    assert not any(p.requires_grad for p in model.backbone.parameters())
    # Random unit text embeddings stand in for the vocabulary: running the base text tower costs time
    # and is covered by the tiny model.
    model.classifier.set_text_embeddings(torch.randn(3, model.backbone.embed_dim))
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 64) * 255)
    assert out["pred_logits"].shape == (1, 200, 3 + 1)
    assert out["pred_masks"].shape == (1, 200, 16, 16)
    assert out["query_features"].shape == (1, 200, 256)
    assert len(out["aux_outputs"]) == 9
    assert out["clip_vis_dense"].shape == (1, 1024, 2, 2)
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["pred_logits"]).all()


@pytest.mark.parametrize("preset,clip_model,trunk", [("base", "convnext_base_w_320", "convnext_base"),
                                                     ("large", "convnext_large_d_320", "convnext_large")])
def test_paper_presets_config(preset, clip_model, trunk):
    """Only the configuration: building the large model is too slow for a unit test."""
    cfg = load_config(preset).model
    assert cfg.backbone.clip_model == clip_model and cfg.backbone.pretrained.startswith("laion")
    assert (cfg.transformer_decoder.num_queries, cfg.transformer_decoder.hidden_dim,
            cfg.transformer_decoder.num_layers) == (200, 256, 9)
    assert (cfg.pixel_decoder.conv_dim, cfg.pixel_decoder.mask_dim) == (256, 256)
    register_dearli_clip_configs()
    vision = open_clip.get_model_config(clip_model)["vision_cfg"]
    assert vision["timm_model_name"] == trunk, "dearli needs a timm ConvNeXt vision tower"
    assert cfg.backbone.pretrained in open_clip.list_pretrained_tags_by_model(clip_model)


def test_tiny_model_overfits_one_batch(model):
    # A higher learning rate than the preset's so that 30 steps are enough to show learning.
    cfg = load_config("tiny", LOSS_OVERRIDES + ["optim.lr=0.001"])
    torch.manual_seed(0)  # point sampling draws from the global generator
    batch = synthetic_batch(2, 64)
    assert all(len(t["labels"]) > 0 for t in batch["targets"])
    criterion = build_criterion(cfg.model.loss, model.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = make_grad_scaler(CPU, cfg.train.amp)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    logs = [train_step(model, criterion, optimizer, batch, cfg, scaler, CPU) for _ in range(30)]
    losses = [log["loss"] for log in logs]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall enough: {losses[0]:.2f} -> {losses[-1]:.2f}"
    assert logs[-1]["loss_ce"] < logs[0]["loss_ce"], "the classifier did not learn"
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters())), "backbone changed"
