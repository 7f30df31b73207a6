"""Ray-free units of the Mean-Teacher stage: EMA, pseudo-labels, strong view and CutMix, the student step."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from dearli.config import load_config
from dearli.losses.criterion import build_criterion, total_loss
from dearli.model.predictor import Prediction
from dearli.training.augment import augment
from dearli.training.ema import (
    ema_decay,
    ema_update,
    load_trainable_state,
    make_teacher,
    trainable_state,
)
from dearli.training.mean_teacher import mean_teacher_step, split_outputs, unlabeled_criterion
from dearli.training.optim import build_optimizer
from dearli.training.pseudo_labels import (
    PseudoLabel,
    collate_pseudo,
    from_prediction,
    pseudo_label_stats,
    to_targets,
    weak_view,
)
from dearli.training.step import make_grad_scaler, move_batch
from dearli.training.strong_augment import (
    CUTMIX_AREA,
    CUTMIX_RATIO,
    Box,
    merge_labels,
    paste_box,
    sample_cutmix_box,
    strong_augment,
    student_view,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- EMA


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(2, 1)
        self.norm = nn.BatchNorm1d(2)


def _fill(net: _Net, head_w, head_b, running_mean, tracked, backbone_w):
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([head_w]))
        net.head.bias.fill_(head_b)
        net.norm.running_mean.copy_(torch.tensor(running_mean))
        net.norm.num_batches_tracked.fill_(tracked)
        net.backbone.weight.fill_(backbone_w)


def test_ema_step_by_hand_averages_parameters_and_buffers_but_not_the_backbone():
    teacher, student = _Net(), _Net()  # separate backbones: the EMA must leave the teacher's alone
    _fill(teacher, [1.0, 2.0], 4.0, [0.0, 8.0], 3, backbone_w=5.0)
    _fill(student, [3.0, -2.0], 0.0, [4.0, 0.0], 7, backbone_w=-1.0)
    ema_update(teacher, student, decay=0.75)
    # 0.75·t + 0.25·s, all exact in binary floating point
    assert teacher.head.weight.tolist() == [[1.5, 1.0]]
    assert teacher.head.bias.tolist() == [3.0]
    assert teacher.norm.running_mean.tolist() == [1.0, 6.0]
    assert teacher.norm.running_var.tolist() == [1.0, 1.0]  # equal in both: stays exactly equal
    assert int(teacher.norm.num_batches_tracked) == 7  # integer buffer: copied
    assert (teacher.backbone.weight == 5.0).all()
    assert student.head.weight.tolist() == [[3.0, -2.0]]  # the student is read only


def test_make_teacher_shares_the_backbone_and_freezes_a_copy_of_the_rest():
    student = _Net()
    teacher = make_teacher(student)
    assert teacher.backbone is student.backbone
    assert teacher.head is not student.head and torch.equal(teacher.head.weight, student.head.weight)
    assert teacher.head.weight.data_ptr() != student.head.weight.data_ptr()
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert student.head.weight.requires_grad  # the student is untouched
    with torch.no_grad():
        student.head.weight.fill_(2.0)
        teacher.head.weight.fill_(0.0)
    ema_update(teacher, student, decay=0.5)
    assert (teacher.head.weight == 1.0).all()


def test_ema_decay_ramp():
    assert [ema_decay(s, 0.999, ramp=True) for s in (0, 1, 3, 9)] == [0.0, 0.5, 0.75, 0.9]
    assert ema_decay(999, 0.999, ramp=True) == pytest.approx(0.999)
    assert ema_decay(5000, 0.999, ramp=True) == 0.999
    assert ema_decay(0, 0.999, ramp=False) == 0.999
    # decay 0 at step 0 makes the teacher a copy of the student
    teacher, student = _Net(), _Net()
    ema_update(teacher, student, ema_decay(0, 0.999, ramp=True))
    assert torch.equal(teacher.head.weight, student.head.weight)


def test_teacher_of_the_real_model_has_no_second_backbone(tiny):
    teacher = make_teacher(tiny)
    assert teacher.backbone is tiny.backbone
    state = trainable_state(teacher)
    assert state and not any(k.startswith("backbone.") for k in state)
    assert any(k.startswith("transformer_decoder.") for k in state)
    replica = make_teacher(tiny)
    with torch.no_grad():
        for p in replica.transformer_decoder.parameters():
            p.zero_()
    load_trainable_state(replica, state)
    assert all(torch.equal(a, b) for a, b in zip(replica.transformer_decoder.parameters(),
                                                 teacher.transformer_decoder.parameters()))


# ---------------------------------------------------------------- pseudo-labels


def _label(panoptic, segments, valid=None):
    return PseudoLabel(torch.tensor(panoptic, dtype=torch.int32), segments,
                       None if valid is None else torch.tensor(valid, dtype=torch.bool))


def _seg(id_, category, isthing, score):
    return {"id": id_, "category_id": category, "isthing": isthing, "score": score}


def test_to_targets_merges_stuff_drops_unconfident_and_leaves_unlabeled_pixels_to_no_target():
    label = _label([[1, 1, 2, 2],
                    [0, 4, 3, 3]],
                   [_seg(1, 0, True, 0.9), _seg(2, 1, False, 0.8), _seg(3, 1, False, 0.7),
                    _seg(4, 0, True, 0.3), _seg(5, 2, True, 0.99)])  # 5 owns no pixel
    targets = to_targets(label, min_confidence=0.5)
    assert targets["labels"].tolist() == [0, 1] and targets["labels"].dtype == torch.int64
    assert targets["masks"].dtype == torch.bool
    assert targets["masks"][0].int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert targets["masks"][1].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert not targets["masks"].any(0)[1, :2].any()  # unlabeled and dropped pixels: no target at all
    assert to_targets(label, 0.0)["labels"].tolist() == [0, 1, 0]
    empty = to_targets(_label([[0, 0]], []), 0.0)
    assert empty["masks"].shape == (0, 1, 2) and empty["labels"].shape == (0,)


def test_thing_floor_filters_things_alone():
    label = _label([[1, 2, 3]], [_seg(1, 0, True, 0.9), _seg(2, 1, False, 0.2), _seg(3, 0, True, 0.4)])
    assert to_targets(label, 0.0, thing_min_confidence=0.5)["labels"].tolist() == [0, 1]
    stuff_only = to_targets(label, 0.0, thing_min_confidence=1.01)
    assert stuff_only["labels"].tolist() == [1] and stuff_only["masks"][0].int().tolist() == [[0, 1, 0]]
    assert pseudo_label_stats([label], 0.0, 1.01)["things_per_image"] == 0.0
    batch = collate_pseudo(torch.zeros(1, 3, 1, 3, dtype=torch.uint8), [label], 0.3, thing_min_confidence=0.5)
    assert batch["targets"][0]["labels"].tolist() == [0]  # the stuff floor 0.3 drops the stuff at 0.2


def test_from_prediction_clears_padding_and_stats_count_image_pixels():
    prediction = Prediction(panoptic=np.array([[1, 1, 2], [1, 3, 3]], dtype=np.int32),
                            segments=[_seg(1, 0, True, 0.5), _seg(2, 1, False, 1.0), _seg(3, 1, False, 0.75)],
                            semantic=np.zeros((2, 3), np.uint8))
    valid = np.array([[True, True, False], [True, True, True]])
    label = from_prediction(prediction, valid)
    assert label.panoptic.tolist() == [[1, 1, 0], [1, 3, 3]]
    assert [s["id"] for s in label.segments] == [1, 3]  # 2 lived only on padding
    stats = pseudo_label_stats([label, _label([[0, 0], [0, 7]], [_seg(7, 0, True, 0.25)])])
    assert stats["segments_per_image"] == 1.5
    assert stats["labeled_fraction"] == pytest.approx((5 + 1) / (5 + 4))
    assert stats["mean_confidence"] == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    assert pseudo_label_stats([label], min_confidence=0.6) == {
        "segments_per_image": 1.0, "things_per_image": 0.0, "labeled_fraction": pytest.approx(2 / 5),
        "mean_confidence": 0.75}


def _photo(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("seed", range(4))
def test_weak_view_is_the_labeled_geometry_without_photometric_changes(seed):
    cfg = load_config("tiny", ["data.crop_size=64", "data.short_sides=[40,64,96]", "data.max_size=256"]).data
    image = _photo(50, 70, seed)
    view, valid, params = weak_view(image, cfg, torch.Generator().manual_seed(seed))
    assert view.shape == (3, 64, 64) and view.dtype == torch.uint8 and valid.shape == (64, 64)
    assert params == {"source_hw": (50, 70)}
    reference = augment(image, torch.zeros(0, 50, 70, dtype=torch.bool), torch.zeros(0, dtype=torch.int64),
                        dataclasses.replace(cfg, color_aug=False), torch.Generator().manual_seed(seed))
    assert torch.equal(view, reference.image) and torch.equal(valid, reference.valid)
    # no colour change: a flat image stays exactly its colour on every image pixel
    flat = torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 50, 70).contiguous()
    flat_view, flat_valid, _ = weak_view(flat, cfg, torch.Generator().manual_seed(seed))
    assert flat_valid.any() and (flat_view[:, flat_valid] == flat[:, :1, 0]).all()


def test_weak_views_vary_with_the_generator():
    cfg = load_config("tiny", ["data.crop_size=64", "data.short_sides=[40,64,96]", "data.max_size=256"]).data
    image = _photo(50, 70)
    views = {weak_view(image, cfg, torch.Generator().manual_seed(s))[0].sum().item() for s in range(8)}
    assert len(views) > 4
    assert torch.equal(weak_view(image, cfg, torch.Generator().manual_seed(3))[0],
                       weak_view(image, cfg, torch.Generator().manual_seed(3))[0])


# ---------------------------------------------------------------- strong view


def test_strong_augment_is_photometric_only():
    image = torch.full((3, 48, 48), 20, dtype=torch.uint8)
    image[0, 16:32, 12:36] = 230
    image[1, 16:32, 12:36] = 180
    image[2, 16:32, 12:36] = 90
    square = torch.zeros(48, 48, dtype=torch.bool)
    square[16:32, 12:36] = True
    label = _label(square.int().tolist(), [_seg(1, 0, True, 0.9)])
    panoptic_before = label.panoptic.clone()
    changed = 0
    for seed in range(24):
        out, out_label, box = student_view(image, label, image, label, 0.0, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape and out.dtype == torch.uint8 and box is None
        assert out_label is label and torch.equal(label.panoptic, panoptic_before)
        changed += int(not torch.equal(out, image))
        # pixel-wise colour changes plus a symmetric blur of at most 3σ = 6 px: region interiors are uniform
        inner, outer = out[:, 22:26, 18:30], out[:, :8, :8]
        assert (inner == inner[:, :1, :1]).all() and (outer == outer[:, :1, :1]).all()
        v_in, v_out = inner[:, 0, 0].float(), outer[:, 0, 0].float()
        assert not torch.equal(v_in, v_out)
        # the square has not moved: the pixels nearer its colour have the square's centroid
        closer = ((out.float() - v_in[:, None, None]).norm(dim=0) < (out.float() - v_out[:, None, None]).norm(dim=0))
        rows, cols = torch.nonzero(closer, as_tuple=True)
        assert abs(rows.float().mean() - 23.5) < 0.75 and abs(cols.float().mean() - 23.5) < 0.75
    assert changed == 24  # colour jitter is applied always


def test_strong_augment_rates_determinism_and_padding():
    image = _photo(16, 16)
    gray = sum(bool((out[0] == out[1]).all() and (out[1] == out[2]).all())
               for out in (strong_augment(image, torch.Generator().manual_seed(s)) for s in range(200)))
    assert 0.12 < gray / 200 < 0.28  # random grayscale p = 0.2
    a = strong_augment(image, torch.Generator().manual_seed(3))
    assert torch.equal(a, strong_augment(image, torch.Generator().manual_seed(3)))
    valid = torch.zeros(16, 16, dtype=torch.bool)
    valid[:10, :12] = True
    out = strong_augment(image, torch.Generator().manual_seed(3), valid)
    assert torch.equal(out[:, ~valid], image[:, ~valid]) and not torch.equal(out[:, valid], image[:, valid])
    batch = strong_augment(torch.stack([image, image]), torch.Generator().manual_seed(0))
    assert batch.shape == (2, 3, 16, 16) and not torch.equal(batch[0], batch[1])


# ---------------------------------------------------------------- CutMix


def test_cutmix_boxes_follow_unimatch():
    g = torch.Generator().manual_seed(0)
    boxes = [sample_cutmix_box(64, 64, 1.0, g) for _ in range(300)]
    assert all(b is not None for b in boxes)
    areas = [b.height * b.width / 64 ** 2 for b in boxes]
    assert min(areas) >= CUTMIX_AREA[0] * 0.7 and max(areas) <= CUTMIX_AREA[1]  # ⌊·⌋ shrinks small boxes
    assert np.mean(areas) == pytest.approx(0.2, abs=0.04)
    for b in boxes:
        assert b.top >= 0 and b.left >= 0 and b.top + b.height <= 64 and b.left + b.width <= 64
        assert CUTMIX_RATIO[0] * 0.8 <= b.height / b.width <= CUTMIX_RATIO[1] * 1.25
    assert all(sample_cutmix_box(64, 64, 0.0, g) is None for _ in range(100))


def _pair():
    panoptic_a = torch.zeros(32, 32, dtype=torch.int32)
    panoptic_a[:, :16], panoptic_a[:, 16:] = 1, 2
    panoptic_a[2:6, 2:6] = 3
    label_a = PseudoLabel(panoptic_a, [_seg(1, 1, False, 0.9), _seg(2, 0, True, 0.8), _seg(3, 0, True, 0.7)])
    panoptic_b = torch.zeros(32, 32, dtype=torch.int32)
    panoptic_b[:16], panoptic_b[16:] = 1, 2  # b's ids collide with a's on purpose
    label_b = PseudoLabel(panoptic_b, [_seg(1, 1, False, 0.6), _seg(2, 0, True, 0.5)])
    return _photo(32, 32, 1), label_a, _photo(32, 32, 2), label_b


def test_cutmix_pastes_b_inside_the_box_with_distinct_ids():
    image_a, label_a, image_b, label_b = _pair()
    for seed in range(30):
        box = sample_cutmix_box(32, 32, 1.0, torch.Generator().manual_seed(seed))
        assert box is not None  # p = 1 always mixes
        image, label = paste_box(image_a, image_b, box), merge_labels(label_a, label_b, box)
        inside = box.mask(32, 32)
        assert torch.equal(image[:, inside], image_b[:, inside]) and torch.equal(image[:, ~inside], image_a[:, ~inside])
        assert torch.equal(label.panoptic[~inside], label_a.panoptic[~inside])
        assert torch.equal(label.panoptic[inside], label_b.panoptic[inside] + 3)  # shifted past a's max id
        ids = [s["id"] for s in label.segments]
        assert len(ids) == len(set(ids)) and set(ids) == label.present_ids()
        for seg in label.segments:  # every segment kept its class
            source = label_a if seg["id"] <= 3 else label_b
            original = next(s for s in source.segments if s["id"] == (seg["id"] if seg["id"] <= 3 else seg["id"] - 3))
            assert seg["category_id"] == original["category_id"] and seg["score"] == original["score"]


def test_cutmix_p0_leaves_a_and_covered_segments_disappear():
    image_a, label_a, image_b, label_b = _pair()
    for seed in range(30):
        _, label, box = student_view(image_a, label_a, image_b, label_b, 0.0, torch.Generator().manual_seed(seed))
        assert box is None and label is label_a
    merged = merge_labels(label_a, label_b, Box(top=0, left=0, height=8, width=8))  # covers a's segment 3
    assert 3 not in {s["id"] for s in merged.segments}
    assert {s["id"] for s in merged.segments} == {1, 2, 4}  # b's segment 2 (rows 16+) lies outside the box
    targets = to_targets(merged)
    # a's stuff (class 1) and b's stuff (class 1) are one target
    assert targets["labels"].tolist() == [1, 0]
    assert int(targets["masks"][0].sum()) == 16 * 32 - 64 + 64 and int(targets["masks"][1].sum()) == 16 * 32


def test_cutmix_merges_valid_maps():
    _, label_a, _, label_b = _pair()
    valid_b = torch.ones(32, 32, dtype=torch.bool)
    valid_b[:, 24:] = False
    label_b = PseudoLabel(label_b.panoptic, label_b.segments, valid_b)
    merged = merge_labels(label_a, label_b, Box(top=4, left=20, height=8, width=8))
    expected = torch.ones(32, 32, dtype=torch.bool)
    expected[4:12, 24:28] = False
    assert torch.equal(merged.valid, expected)


# ---------------------------------------------------------------- student step


def _batches(num_classes=2, size=64):
    """A labeled batch (collate format) and an unlabeled one built from pseudo-labels."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, :, : size // 2] = True
    masks[1, size // 4: size // 2, size // 2:] = True
    images[:, :, :, : size // 2] //= 4  # something for the decoder to find
    targets = [{"masks": masks.clone(), "labels": torch.tensor([1, 0])} for _ in range(2)]
    labeled = {"images": images[:2], "valid": torch.ones(2, size, size, dtype=torch.bool), "targets": targets,
               "stems": ["a", "b"]}
    panoptic = masks[0].int() + 2 * masks[1].int()
    label = PseudoLabel(panoptic, [_seg(1, 1, False, 0.9), _seg(2, 0, True, 0.8)])
    unlabeled = collate_pseudo(images[2:], [label, label], min_confidence=0.5)
    return labeled, unlabeled


def _fixed_loss(model, criterion, labeled, unlabeled):
    torch.manual_seed(123)  # the same sampled points every time
    model.train()  # the mode the step trains in (make_teacher returns an eval-mode copy)
    with torch.no_grad():
        images_l, targets_l = move_batch(labeled, torch.device("cpu"))
        images_u, targets_u = move_batch(unlabeled, torch.device("cpu"))
        out_l, out_u = split_outputs(model(torch.cat([images_l, images_u])), 2)
        return float(total_loss(criterion(out_l, targets_l)) + total_loss(criterion(out_u, targets_u)))


def test_mean_teacher_step_lowers_the_loss_and_never_touches_the_backbone(tiny):
    cfg = load_config("tiny", ["optim.lr=0.001", "model.loss.num_points=256"])
    model = make_teacher(tiny)  # a fresh trainable copy over the same frozen backbone
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("backbone."))
    backbone_before = [p.clone() for p in model.backbone.parameters()]
    criterion = build_criterion(cfg.model.loss, 2)
    optimizer = build_optimizer(model, cfg.optim)
    scaler, device = make_grad_scaler(torch.device("cpu"), False), torch.device("cpu")
    labeled, unlabeled = _batches()
    assert unlabeled["targets"][0]["labels"].tolist() == [1, 0]
    before = _fixed_loss(model, criterion, labeled, unlabeled)
    for step in range(3):
        logged = mean_teacher_step(model, criterion, optimizer, labeled, unlabeled, cfg, scaler, device, 0.5)
        assert logged["loss"] == pytest.approx(logged["loss_sup"] + 0.5 * logged["loss_unsup"], rel=1e-5)
        assert math.isfinite(logged["grad_norm"]) and logged["grad_norm"] > 0
        if step == 0:
            assert all(p.grad is None for p in model.backbone.parameters())
            for part in (model.pixel_decoder, model.transformer_decoder):
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    after = _fixed_loss(model, criterion, labeled, unlabeled)
    assert after < 0.85 * before, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))


def test_unlabeled_criterion_follows_the_ssl_settings():
    from dearli.errors import ConfigError

    cfg = load_config("tiny")
    criterion = build_criterion(cfg.model.loss, 4)
    assert unlabeled_criterion(cfg, 4, (0, 1), criterion) is criterion  # upstream: the same loss
    agnostic = unlabeled_criterion(load_config("tiny", ["ssl.thing_pseudo_classes=any_thing"]), 4, (0, 1), criterion)
    assert agnostic.label_sets[0, :2].all() and not agnostic.label_sets[2, :2].any()
    assert agnostic.matcher.label_sets is not None
    quiet = unlabeled_criterion(load_config("tiny", ["ssl.unlabeled_no_object_weight=0"]), 4, (0, 1), criterion)
    assert quiet.label_sets is None and quiet.empty_weight[-1] == 0
    with pytest.raises(ConfigError, match="ssl.thing_pseudo_classes"):
        load_config("tiny", ["ssl.thing_pseudo_classes=maybe"])
