"""Geometric ensemble (fixture parity), alpha schedules, mask pooling and the zero-shot CLIP branch."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dearli.config import load_config
from dearli.config_model import EnsembleConfig
from dearli.errors import ConfigError
from dearli.model.ensemble import BUDGET_MIN_FRACTION, alpha_schedule, geometric_ensemble
from dearli.model.text_classifier import TextEmbeddings, class_text_embeddings
from dearli.model.zero_shot import mask_pool, zero_shot_logits

FIXTURE = Path(__file__).parent / "fixtures" / "model" / "ensemble.npz"


def fixture_cases():
    data = np.load(FIXTURE)
    names = sorted({k.split("_")[0] for k in data.files})
    return [{k[len(n) + 1:]: data[k] for k in data.files if k.startswith(n + "_")} for n in names]


@pytest.mark.parametrize("case", fixture_cases(), ids=lambda c: str(c["mask_cls"].shape))
def test_fixture_parity(case):
    probs = geometric_ensemble(torch.from_numpy(case["mask_cls"]), torch.from_numpy(case["clip_cls"]),
                               float(case["alpha_clip"]))
    assert probs.dtype == torch.float64
    np.testing.assert_allclose(probs.numpy(), case["probs"], rtol=0, atol=1e-9)


def test_clip_void_column_is_ignored_and_rows_sum_to_one():
    torch.manual_seed(0)
    mask_cls, clip_cls = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    full = geometric_ensemble(mask_cls, clip_cls, 0.3)
    no_void = geometric_ensemble(mask_cls, clip_cls[..., :-1], 0.3)
    other_void = geometric_ensemble(mask_cls, torch.cat([clip_cls[..., :-1], clip_cls[..., -1:] + 50], -1), 0.3)
    assert torch.allclose(full, no_void) and torch.allclose(full, other_void)
    assert torch.allclose(full.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    assert torch.allclose(full[..., -1], mask_cls.softmax(-1)[..., -1])


def test_alpha_extremes_and_per_query_alpha():
    torch.manual_seed(1)
    mask_cls, clip_cls = torch.randn(1, 4, 6, dtype=torch.float64), torch.randn(1, 4, 6, dtype=torch.float64)
    void = mask_cls.softmax(-1)[..., -1:]
    decoder_only = geometric_ensemble(mask_cls, clip_cls, 0.0)
    assert torch.allclose(decoder_only, mask_cls.softmax(-1))
    clip_only = geometric_ensemble(mask_cls, clip_cls, 1.0)
    assert torch.allclose(clip_only[..., :-1], clip_cls[..., :-1].softmax(-1) * (1 - void))
    per_query = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64).view(1, 4, 1)
    mixed = geometric_ensemble(mask_cls, clip_cls, per_query)
    assert torch.allclose(mixed[:, 0::2], decoder_only[:, 0::2])
    assert torch.allclose(mixed[:, 1::2], clip_only[:, 1::2])
    with pytest.raises(ValueError):
        geometric_ensemble(mask_cls, clip_cls[..., :3], 0.5)


def test_alpha_schedules():
    constant = EnsembleConfig(alpha_clip=0.4)
    assert alpha_schedule(constant, 0, 100) == alpha_schedule(constant, 100, 100) == 0.4
    linear = EnsembleConfig(alpha_clip=0.2, schedule="linear", alpha_clip_end=0.6)
    assert alpha_schedule(linear, 0, 100) == pytest.approx(0.2)
    assert alpha_schedule(linear, 50, 100) == pytest.approx(0.4)
    assert alpha_schedule(linear, 100, 100) == pytest.approx(0.6)
    assert alpha_schedule(linear, 500, 100) == pytest.approx(0.6)
    budget = EnsembleConfig(alpha_clip=0.2, schedule="budget", alpha_clip_end=0.6)
    assert alpha_schedule(budget, 0, 100, labeled_fraction=1.0) == pytest.approx(0.2)
    assert alpha_schedule(budget, 0, 100, labeled_fraction=BUDGET_MIN_FRACTION) == pytest.approx(0.6)
    assert alpha_schedule(budget, 0, 100, labeled_fraction=BUDGET_MIN_FRACTION / 4) == pytest.approx(0.6)
    mid = math.sqrt(BUDGET_MIN_FRACTION)
    assert alpha_schedule(budget, 7, 100, labeled_fraction=mid) == pytest.approx(0.4)
    assert alpha_schedule(budget, 0, 100, 1 / 8) < alpha_schedule(budget, 0, 100, 1 / 128)
    with pytest.raises(ConfigError, match="labeled fraction"):
        alpha_schedule(budget, 0, 100)


def test_mask_pool_hand_made():
    # dense 1×2×2×2: channel 0 = [[1, 2], [3, 4]], channel 1 = 10 × channel 0.
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    dense = torch.stack([base, 10 * base])[None]
    masks = torch.tensor([
        [[5.0, -5.0], [5.0, -5.0]],  # left column -> mean 2
        [[-1.0, 1.0], [-1.0, -1.0]],  # top-right pixel -> 2
        [[1.0, 1.0], [1.0, 1.0]],  # everything -> 2.5
        [[-1.0, -1.0], [-1.0, -1.0]],  # empty -> 0
    ])[None]
    pooled = mask_pool(dense, masks)
    assert pooled.shape == (1, 4, 2)
    assert torch.allclose(pooled[0, :, 0], torch.tensor([2.0, 2.0, 2.5, 0.0]))
    assert torch.allclose(pooled[0, :, 1], 10 * pooled[0, :, 0])


def test_mask_pool_resizes_logits_before_thresholding():
    dense = torch.arange(4.0).view(1, 1, 2, 2)
    masks = torch.full((1, 1, 8, 8), -1.0)
    masks[..., :, :4] = 1.0  # left half at 4x resolution
    pooled = mask_pool(dense, masks)
    assert torch.allclose(pooled, torch.tensor([[[1.0]]]))  # mean of 0 and 2
    dense.requires_grad_(True)
    mask_pool(dense, masks.requires_grad_(True)).sum().backward()
    assert dense.grad is not None and masks.grad is None


def test_zero_shot_logits(backbone):
    images = torch.rand(1, 3, 64, 64) * 255
    dense = backbone(images)["clip_vis_dense"]
    masks = torch.randn(1, 3, 16, 16)
    text = class_text_embeddings(backbone, [["cat", "kitten"], ["sky"]])
    logits = zero_shot_logits(backbone, dense, masks, text)
    assert logits.shape == (1, 3, 3)
    assert logits[..., -1].max() < -1e30  # dummy void column gets no probability
    assert torch.allclose(logits.softmax(-1)[..., -1], torch.zeros(1, 3))
    image = F.normalize(backbone.visual_prediction(mask_pool(dense, masks)), dim=-1)
    cos = image @ text.embeddings.t() * backbone.logit_scale
    assert torch.allclose(logits[..., 0], cos[..., :2].amax(-1), atol=1e-4)
    assert torch.allclose(logits[..., 1], cos[..., 2], atol=1e-4)
    no_void = zero_shot_logits(backbone, dense, masks, TextEmbeddings(*text), append_void=False)
    assert torch.equal(no_void, logits[..., :-1])
    probs = geometric_ensemble(torch.randn(1, 3, 3), logits, 0.4)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(1, 3))


def test_ensemble_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    mask_cls = (torch.randn(2, 10, 6) * 20).bfloat16()
    clip_cls = (torch.randn(2, 10, 6) * 20).bfloat16()
    reference = geometric_ensemble(mask_cls.float(), clip_cls.float(), 0.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = geometric_ensemble(mask_cls, clip_cls, torch.full((2, 10, 1), 0.4))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-6)


def test_zero_shot_logits_run_in_fp32_under_autocast(backbone):
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        dense = backbone(images)["clip_vis_dense"]
    masks = torch.randn(1, 5, 16, 16)
    text = class_text_embeddings(backbone, [["cat", "kitten"], ["sky"], ["road"]])
    reference = zero_shot_logits(backbone, dense, masks, text, append_void=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = zero_shot_logits(backbone, dense.bfloat16().float(), masks, text, append_void=False)
    assert mixed.dtype == torch.float32
    # dense went through bf16 once (as a bf16 backbone would give it); everything after is fp32.
    torch.testing.assert_close(mixed, zero_shot_logits(backbone, dense.bfloat16().float(), masks, text,
                                                       append_void=False), rtol=0, atol=1e-5)
    assert (mixed - reference).abs().max() < 0.5


def test_empty_mask_gets_the_logits_of_a_zero_pooled_vector(backbone):
    """An empty mask pools to zero, but CLIP's head (LayerNorm first) maps zero to a fixed, non-zero vector."""
    backbone = copy.deepcopy(backbone)
    with torch.no_grad():  # a trained LayerNorm has a bias; the random tiny CLIP's is still 0
        backbone.clip.visual.trunk.head.norm.bias.normal_()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        dense = backbone(images)["clip_vis_dense"]
    masks = torch.full((1, 2, 16, 16), -1.0)  # nothing above 0: empty at every resolution
    text = class_text_embeddings(backbone, [["cat"], ["sky"], ["road"]])
    logits = zero_shot_logits(backbone, dense, masks, text, append_void=False)
    with torch.no_grad():
        zero = F.normalize(backbone.visual_prediction(torch.zeros(1, dense.shape[1])), dim=-1)
        expected = backbone.logit_scale * zero @ text.embeddings.t()
    torch.testing.assert_close(logits[0], expected.expand(2, -1), rtol=0, atol=1e-4)
    assert logits.abs().max() > 1e-3  # not the all-zero "uniform opinion"


def test_on_valid_mask_leaves_masks_empty_on_the_clip_grid_to_the_decoder(backbone):
    """FC-CLIP's ENSEMBLE_ON_VALID_MASK: a query with no cell on the CLIP grid keeps the decoder's classes."""
    from types import SimpleNamespace

    from dearli.model.predictor import class_scores
    from dearli.model.zero_shot import valid_pooling

    torch.manual_seed(0)
    with torch.no_grad():
        dense = backbone(torch.rand(1, 3, 64, 64) * 255)["clip_vis_dense"]  # 2×2 grid
    masks = torch.full((1, 3, 16, 16), -5.0)
    masks[0, 0] = 5.0  # covers the image
    masks[0, 1, 1:3, 1:3] = 5.0  # a 2×2 speck away from every cell centre: empty on the 2×2 grid
    # query 2: empty everywhere
    assert valid_pooling(masks, dense.shape[-2:]).tolist() == [[True, False, False]]
    text = class_text_embeddings(backbone, [["cat"], ["sky"], ["road"]])
    model = SimpleNamespace(zero_shot_logits=lambda out: zero_shot_logits(backbone, out["clip_vis_dense"],
                                                                           out["pred_masks"], text))
    outputs = {"pred_logits": torch.randn(1, 3, 4), "pred_masks": masks, "clip_vis_dense": dense}
    plain, probs = class_scores(model, outputs, 0.6)
    valid, _ = class_scores(model, outputs, 0.6, on_valid_mask=True)
    decoder_only = outputs["pred_logits"].softmax(-1)
    assert probs
    torch.testing.assert_close(valid[0, 0], plain[0, 0])
    torch.testing.assert_close(valid[0, 1:], decoder_only[0, 1:])
    assert not torch.allclose(plain[0, 1:], decoder_only[0, 1:], atol=1e-3)
    assert load_config("tiny").model.ensemble.on_valid_mask is False  # the paper's setting by default
