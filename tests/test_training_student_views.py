"""The Mean-Teacher student's unlabeled branch: the configurable strong view, CutMix partners and boxes, the
ground truth of a weak view (the oracle diagnostic) and the pseudo-label statistics against it."""

import dataclasses

import pytest
import torch

from dearli.config import StrongViewConfig, load_config
from dearli.errors import ConfigError
from dearli.stages.student import truth_rates, views_per_step
from dearli.stages.teacher import truth_stats
from dearli.training.pseudo_labels import PseudoLabel, thing_agreement, truth_view, weak_view
from dearli.training.strong_augment import image_extent, sample_partner_box, strong_augment, student_view

# A strong view that changes nothing: every jitter at its identity, no grayscale, no blur.
IDENTITY = StrongViewConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0,
                            blur_prob=0.0)


def _photo(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_strong_view_is_configuration_with_upstream_defaults_and_named_errors():
    cfg = load_config("ade20k-base")
    assert cfg.ssl.strong_view == StrongViewConfig()
    assert (cfg.ssl.strong_view.brightness, cfg.ssl.strong_view.hue, cfg.ssl.strong_view.grayscale_prob,
            cfg.ssl.strong_view.blur_sigma) == (0.8, 0.2, 0.2, (0.1, 2.0))
    over = load_config("synth", ["ssl.strong_view.hue=0.05", "ssl.strong_view.blur_sigma=[0.2,0.6]"])
    assert over.ssl.strong_view.hue == 0.05 and over.ssl.strong_view.blur_sigma == (0.2, 0.6)
    with pytest.raises(ConfigError, match=r"ssl\.strong_view\.grayscale_prob"):
        load_config("tiny", ["ssl.strong_view.grayscale_prob=1.5"])
    with pytest.raises(ConfigError, match=r"ssl\.strong_view\.blur_sigma"):
        load_config("tiny", ["ssl.strong_view.blur_sigma=[2.0,1.0]"])


def test_the_configured_strong_view_is_the_one_applied():
    image = _photo(32, 32)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(strong_augment(image, generator, params=IDENTITY), image)
    gray = dataclasses.replace(IDENTITY, grayscale_prob=1.0)
    out = strong_augment(image, generator, params=gray).int()
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all() and not torch.equal(out, image.int())


def test_cutmix_box_lies_within_the_partner_image_not_its_padding():
    valid = torch.zeros(64, 64, dtype=torch.bool)
    valid[:40, 24:] = True  # a 40×40 image, flipped: its padding lies below and on the left
    assert image_extent(valid, 64, 64) == (0, 24, 40, 40)
    assert image_extent(None, 64, 64) == (0, 0, 64, 64)
    partner = PseudoLabel(torch.zeros(64, 64, dtype=torch.int32), [], valid)
    boxes = [sample_partner_box(partner, 1.0, torch.Generator().manual_seed(s)) for s in range(200)]
    boxes = [b for b in boxes if b is not None]
    assert len(boxes) > 150
    for box in boxes:
        assert valid[box.top:box.top + box.height, box.left:box.left + box.width].all()
        assert box.height * box.width <= 0.4 * 40 * 40 + 1  # a share of the partner's image, not the canvas


def test_student_view_pastes_the_partner_and_keeps_labels_aligned():
    a, b = _photo(16, 16, 1), _photo(16, 16, 2)
    label_a = PseudoLabel(torch.ones(16, 16, dtype=torch.int32), [{"id": 1, "category_id": 0, "isthing": False,
                                                                 "score": 1.0}])
    label_b = PseudoLabel(torch.ones(16, 16, dtype=torch.int32), [{"id": 1, "category_id": 3, "isthing": True,
                                                                 "score": 1.0}])
    image, label, box = student_view(a, label_a, b, label_b, 1.0, torch.Generator().manual_seed(0), IDENTITY)
    assert box is not None
    inside = box.mask(16, 16)
    assert torch.equal(image[:, inside], b[:, inside]) and torch.equal(image[:, ~inside], a[:, ~inside])
    classes = {s["id"]: s["category_id"] for s in label.segments}
    assert {classes[int(i)] for i in label.panoptic[inside].unique()} == {3}
    assert {classes[int(i)] for i in label.panoptic[~inside].unique()} == {0}


def test_every_rank_gets_a_cutmix_partner_whatever_the_worker_count():
    assert views_per_step(1, 0.5) == 2  # 8 workers with 8 unlabeled images: one each, plus a partner
    assert views_per_step(1, 0.0) == 1  # no CutMix: no partner needed
    assert views_per_step(4, 0.5) == 4  # the batch's next image is the partner


@pytest.mark.parametrize("seed", range(3))
def test_truth_view_has_the_weak_views_geometry(seed):
    cfg = load_config("tiny", ["data.crop_size=64", "data.short_sides=[40,64,96]", "data.max_size=256"]).data
    image = _photo(50, 70, seed)
    masks = torch.zeros(3, 50, 70, dtype=torch.bool)
    masks[0, :, :35], masks[1, :, 35:], masks[2, 10:20, 10:20] = True, True, True
    masks[0] &= ~masks[2]
    labels = torch.tensor([5, 6, 2])
    view, valid, _ = weak_view(image, cfg, torch.Generator().manual_seed(seed))
    t_view, t_valid, truth = truth_view(image, masks, labels, (2, 3), cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(view, t_view) and torch.equal(valid, t_valid)
    assert not truth.panoptic[~valid].any() and truth.panoptic[valid].all()  # every image pixel has its truth
    for seg in truth.segments:
        assert seg["isthing"] == (seg["category_id"] == 2) and seg["score"] == 1.0
        assert (truth.panoptic == seg["id"]).any()


def _label(panoptic, segments):
    return PseudoLabel(torch.tensor(panoptic, dtype=torch.int32),
                       [{"id": i, "category_id": c, "isthing": t, "score": 1.0} for i, c, t in segments])


def test_thing_agreement_counts_same_class_matches_above_half_iou():
    truth = _label([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]], [(1, 0, True), (2, 1, True), (3, 9, False)])
    pred = _label([[1, 1, 2, 2], [1, 4, 2, 2], [3, 3, 3, 3]],
                  [(1, 0, True), (2, 5, True), (3, 9, False), (4, 0, True)])
    # thing 1 matches (IoU 3/4), thing 2 has the wrong class, 4 overlaps nothing of its own
    assert thing_agreement(pred, truth) == (1, 3, 2)
    sums = truth_stats([pred, truth], [truth, truth])
    assert sums == {"matched_things": 3, "pl_things": 5, "gt_things": 4, "gt_segments": 6, "images": 2}
    rates = truth_rates(sums)
    assert rates == {"gt/segments_per_image": 3.0, "gt/things_per_image": 2.0, "pl/thing_recall": 0.75,
                     "pl/thing_precision": 0.6}
    assert truth_rates({}) == {}


def test_the_progress_line_shows_the_labels_beside_the_truth():
    from dearli.stages.progress import progress_text

    record = {"step": 50, "loss": 1.5, "pl/segments_per_image": 3.46, "gt/segments_per_image": 6.9,
              "pl/thing_recall": 0.4, "pl/thing_precision": 0.625}
    line = progress_text("ssl", 100, record)
    assert line.endswith("| labels 3.5 segments/image (truth 6.9), things found 40%, right 62%"), line
    assert "labels" not in progress_text("warmup", 100, {"step": 5, "loss": 1.0})


def test_the_teachers_own_ensemble_weight_is_configuration():
    assert load_config("synth").ssl.teacher_alpha_clip == -1.0  # the model's ensemble, as upstream
    assert load_config("synth", ["ssl.teacher_alpha_clip=0.2"]).ssl.teacher_alpha_clip == 0.2
    with pytest.raises(ConfigError, match=r"ssl\.teacher_alpha_clip"):
        load_config("synth", ["ssl.teacher_alpha_clip=1.5"])
    assert load_config("ade20k-base").ssl.unlabeled_no_object_weight == -1.0  # upstream: the model's weight
    with pytest.raises(ConfigError, match=r"ssl\.unlabeled_no_object_weight"):
        load_config("synth", ["ssl.unlabeled_no_object_weight=-0.5"])


def test_burn_in_steps_train_on_the_labeled_images_alone(tiny):
    """A weight of 0 or no unlabeled batch (ssl.burn_in_steps) leaves the unlabeled images out: two different
    unlabeled batches and none at all give the very same update, and the loss is the supervised one."""
    from dearli.losses.criterion import build_criterion
    from dearli.training.ema import make_teacher
    from dearli.training.mean_teacher import mean_teacher_step
    from dearli.training.optim import build_optimizer
    from dearli.training.pseudo_labels import collate_pseudo
    from dearli.training.step import make_grad_scaler

    cfg = load_config("tiny", ["optim.lr=0.001", "model.loss.num_points=64", "ssl.burn_in_steps=5"])
    assert cfg.ssl.burn_in_steps == 5
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, :, :16] = True
    labeled = {"images": images[:2], "valid": torch.ones(2, 32, 32, dtype=torch.bool), "stems": ["a", "b"],
               "targets": [{"masks": masks.clone(), "labels": torch.tensor([1])} for _ in range(2)]}
    label = PseudoLabel(masks[0].int(), [{"id": 1, "category_id": 0, "isthing": True, "score": 1.0}])
    updated = []
    for unlabeled, weight in ((collate_pseudo(images[2:], [label, label]), 0.0),
                              (collate_pseudo(255 - images[2:], [label, label]), 0.0), (None, 1.0)):
        torch.manual_seed(7)  # the same sampled points in both runs
        model = make_teacher(tiny)
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith("backbone."))
        optimizer = build_optimizer(model, cfg.optim)
        logged = mean_teacher_step(model, build_criterion(cfg.model.loss, 2), optimizer, labeled,
                                   unlabeled, cfg, make_grad_scaler(torch.device("cpu"), False), torch.device("cpu"),
                                   weight)
        assert logged["loss"] == logged["loss_sup"] and logged["loss_unsup"] == 0.0
        updated.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*updated))
    with pytest.raises(ConfigError, match=r"ssl\.burn_in_steps"):
        load_config("tiny", ["ssl.burn_in_steps=-1"])


def test_a_burn_in_that_leaves_no_step_is_refused_before_anything_starts(tmp_path):
    from dearli.stages.mean_teacher import run_mean_teacher

    cfg = load_config("tiny", ["ssl.burn_in_steps=5", "train.max_steps=5"])
    with pytest.raises(ConfigError, match=r"^ssl\.burn_in_steps: 5 burn-in steps leave none of the 5 steps"):
        run_mean_teacher(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert load_config("synth").ssl.burn_in_steps < load_config("synth").train.max_steps
