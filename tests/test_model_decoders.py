"""Pixel decoder and masked transformer decoder on the tiny configuration."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from dearli.config_model import PixelDecoderConfig, TransformerDecoderConfig
from dearli.model import transformer_decoder
from dearli.model.decoder_layers import CrossAttentionLayer
from dearli.model.pixel_decoder import build_pixel_decoder, group_norm
from dearli.model.position_encoding import PositionEmbeddingSine
from dearli.model.transformer_decoder import attention_mask_from_logits, build_transformer_decoder

INPUT_SHAPE = {"res2": (40, 4), "res3": (80, 8), "res4": (160, 16), "res5": (320, 32)}
PIXEL_CFG = PixelDecoderConfig(conv_dim=64, mask_dim=64, num_layers=1, num_heads=4, dim_feedforward=128)
DECODER_CFG = TransformerDecoderConfig(hidden_dim=64, num_queries=32, num_heads=4, dim_feedforward=128,
                                       num_layers=3)
NUM_CLASSES = 5


def _features(batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Backbone-like pyramid of an image height×width (ceil division, as strided convs give)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, c, math.ceil(height / s), math.ceil(width / s), generator=gen)
            for name, (c, s) in INPUT_SHAPE.items()}


def _build(pixel_cfg=PIXEL_CFG, decoder_cfg=DECODER_CFG, seed=0):
    torch.manual_seed(seed)
    pixel = build_pixel_decoder(INPUT_SHAPE, pixel_cfg)
    decoder = build_transformer_decoder(pixel_cfg.conv_dim, pixel_cfg.mask_dim, decoder_cfg,
                                        nn.Linear(decoder_cfg.hidden_dim, NUM_CLASSES + 1))
    return pixel, decoder


def _run(pixel, decoder, feats):
    mask_features, multi_scale = pixel(feats)
    return mask_features, multi_scale, decoder(multi_scale, mask_features)


@pytest.mark.parametrize("height,width", [(128, 96), (100, 75)])
def test_output_shapes(height, width):
    pixel, decoder = _build()
    feats = _features(2, height, width)
    mask_features, multi_scale, out = _run(pixel, decoder, feats)
    h4, w4 = feats["res2"].shape[-2:]
    assert mask_features.shape == (2, 64, h4, w4)
    assert [tuple(m.shape[-2:]) for m in multi_scale] == [tuple(feats[k].shape[-2:])
                                                          for k in ("res5", "res4", "res3")]
    assert all(m.shape[:2] == (2, 64) for m in multi_scale)
    assert out["pred_logits"].shape == (2, 32, NUM_CLASSES + 1)
    assert out["pred_masks"].shape == (2, 32, h4, w4)
    assert out["query_features"].shape == (2, 32, 64)
    assert len(out["aux_outputs"]) == DECODER_CFG.num_layers
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks"}
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_masks"].shape == out["pred_masks"].shape
    assert all(torch.isfinite(t).all() for t in (out["pred_logits"], out["pred_masks"]))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_every_parameter_gets_a_finite_gradient(pre_norm):
    pixel, decoder = _build(decoder_cfg=dataclasses.replace(DECODER_CFG, pre_norm=pre_norm))
    # Deformable attention starts with zero query->offset/weight matrices, so at initialisation the
    # encoder's position (level) embeddings get an exactly zero gradient; move off that point as one
    # training step would.
    with torch.no_grad():
        for layer in pixel.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=1e-2)
            layer.self_attn.attention_weights.weight.normal_(std=1e-2)
    _, _, out = _run(pixel, decoder, _features(2, 128, 96))
    loss = out["pred_masks"].sigmoid().mean() + out["pred_logits"].logsumexp(-1).mean()
    loss = loss + out["query_features"].square().mean()
    for aux in out["aux_outputs"]:
        loss = loss + aux["pred_masks"].sigmoid().mean() + aux["pred_logits"].logsumexp(-1).mean()
    loss.backward()
    for prefix, module in (("pixel", pixel), ("decoder", decoder)):
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{prefix}.{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{prefix}.{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{prefix}.{name} has an all-zero gradient"


def test_attention_mask_blocks_background_and_clears_empty_rows():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0  # query 0: top half foreground
    logits[0, 2] = 5.0  # query 2: everything foreground; query 1: nothing
    mask = attention_mask_from_logits(logits, (2, 2), num_heads=2)
    assert mask.shape == (2, 3, 4) and mask.dtype == torch.bool
    for head in range(2):
        assert mask[head, 0].tolist() == [False, False, True, True]
        assert not mask[head, 1].any(), "a fully blocked query must attend everywhere"
        assert not mask[head, 2].any()


def test_masked_cross_attention_ignores_blocked_memory():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(16, 2)
    tgt, query_pos = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    memory, pos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = torch.zeros(2 * 2, 3, 5, dtype=torch.bool)
    mask[:, :, 3:] = True  # every query ignores memory positions 3 and 4
    changed = memory.clone()
    changed[:, 3:] += 10.0
    same = layer(tgt, memory, mask, pos, query_pos)
    torch.testing.assert_close(same, layer(tgt, changed, mask, pos, query_pos))
    assert not torch.allclose(layer(tgt, memory, None, pos, query_pos), layer(tgt, changed, None, pos, query_pos))


def test_fully_blocked_queries_attend_everywhere(monkeypatch):
    pixel, decoder = _build()
    # Every predicted mask is negative everywhere (at every layer), so every query's attention row is
    # fully blocked: the decoder must neither produce NaN (older softmax) nor zero attention (newer
    # "safe" softmax) but attend everywhere, i.e. behave exactly as without masking.
    with torch.no_grad():
        last = decoder.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.fill_(-1.0)
    feats = _features(2, 64, 64)
    mask_features = torch.ones(2, PIXEL_CFG.mask_dim, *feats["res2"].shape[-2:])
    _, multi_scale = pixel(feats)
    out = decoder(multi_scale, mask_features)
    assert (out["aux_outputs"][0]["pred_masks"] < 0).all()
    for t in (out["pred_logits"], out["pred_masks"], out["query_features"]):
        assert torch.isfinite(t).all()
    monkeypatch.setattr(transformer_decoder, "attention_mask_from_logits", lambda *args: None)
    unmasked = decoder(multi_scale, mask_features)
    torch.testing.assert_close(out["query_features"], unmasked["query_features"])


def test_eval_is_deterministic_and_dropout_only_acts_in_training():
    pixel, decoder = _build(pixel_cfg=dataclasses.replace(PIXEL_CFG, dropout=0.5))
    feats = _features(2, 128, 96)
    pixel.eval()
    decoder.eval()
    with torch.no_grad():
        first = _run(pixel, decoder, feats)[2]
        second = _run(pixel, decoder, feats)[2]
    assert torch.equal(first["pred_masks"], second["pred_masks"])
    assert torch.equal(first["pred_logits"], second["pred_logits"])
    pixel.train()
    with torch.no_grad():
        noisy = _run(pixel, decoder, feats)[2]
    assert not torch.allclose(noisy["pred_masks"], first["pred_masks"])


def test_same_seed_same_model():
    feats = _features(1, 64, 64)
    outs = [_run(*_build(seed=3), feats)[2]["pred_masks"] for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_position_encoding_formula():
    pe = PositionEmbeddingSine(8, temperature=100.0)
    pos = pe(torch.zeros(2, 3, 4, 5))
    assert pos.shape == (2, 16, 4, 5)
    i, j = 2, 3  # row, column
    y, x = (i + 1) / 4 * 2 * math.pi, (j + 1) / 5 * 2 * math.pi
    for c in range(8):
        freq = 100.0 ** (2 * (c // 2) / 8)
        fn = math.sin if c % 2 == 0 else math.cos
        assert pos[1, c, i, j].item() == pytest.approx(fn(y / freq), abs=1e-5)
        assert pos[1, 8 + c, i, j].item() == pytest.approx(fn(x / freq), abs=1e-5)


@pytest.mark.parametrize("channels,groups", [(256, 32), (64, 32), (40, 20), (24, 24), (7, 7)])
def test_group_norm_groups(channels, groups):
    assert group_norm(channels).num_groups == groups


def test_missing_feature_is_reported():
    pixel, _ = _build()
    feats = _features(1, 64, 64)
    del feats["res3"]
    with pytest.raises(KeyError, match="res3"):
        pixel(feats)
