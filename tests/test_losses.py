"""Mask2Former losses: point sampling, Hungarian matching, SetCriterion."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dearli.config_model import LossConfig
from dearli.errors import ConfigError, DataError
from dearli.losses import (
    HungarianMatcher,
    build_criterion,
    calculate_uncertainty,
    point_sample,
    thing_label_sets,
    total_loss,
    uncertain_point_coords,
)

torch.set_num_threads(1)

NUM_CLASSES = 4
NUM_QUERIES = 6
TARGET_SIZE = 32  # targets at "input" resolution
STRIDE = 4  # predictions at 1/4


def small_cfg(**changes) -> LossConfig:
    return dataclasses.replace(LossConfig(num_points=256), **changes)


def make_target(boxes: list[tuple[int, int, int, int]], labels: list[int]) -> dict[str, torch.Tensor]:
    """Rectangles (y0, x0, y1, x1) on a TARGET_SIZE² canvas, aligned to STRIDE so they downsample exactly."""
    masks = torch.zeros(len(boxes), TARGET_SIZE, TARGET_SIZE, dtype=torch.bool)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}


def perfect_outputs(targets: list[dict], perms: list[list[int]], scale: float = 10.0) -> dict[str, torch.Tensor]:
    """Predictions that reproduce each target j in query perms[b][j]; other queries predict void/empty."""
    size = TARGET_SIZE // STRIDE
    logits = torch.full((len(targets), NUM_QUERIES, NUM_CLASSES + 1), -scale)
    logits[:, :, NUM_CLASSES] = scale
    masks = torch.full((len(targets), NUM_QUERIES, size, size), -scale)
    for b, (target, perm) in enumerate(zip(targets, perms)):
        for j, q in enumerate(perm):
            small = F.avg_pool2d(target["masks"][j][None].float(), STRIDE)[0]
            masks[b, q] = torch.where(small > 0.5, scale, -scale)
            logits[b, q] = -scale
            logits[b, q, target["labels"][j]] = scale
    return {"pred_logits": logits, "pred_masks": masks}


def two_images() -> tuple[list[dict], list[list[int]]]:
    targets = [
        make_target([(0, 0, 16, 16), (16, 8, 32, 32), (4, 20, 12, 28)], [1, 3, 0]),
        make_target([(8, 8, 24, 24), (0, 0, 4, 32)], [2, 2]),
    ]
    return targets, [[4, 0, 2], [1, 5]]


def random_outputs(batch: int, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    size = TARGET_SIZE // STRIDE
    logits = torch.randn(batch, NUM_QUERIES, NUM_CLASSES + 1, requires_grad=requires_grad)
    masks = torch.randn(batch, NUM_QUERIES, size, size, requires_grad=requires_grad)
    return {"pred_logits": logits, "pred_masks": masks}


# ---------------------------------------------------------------- point sampling

def manual_bilinear(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of C×H×W at normalised (x, y), pixel centres at (i + 0.5) / size, zeros outside."""
    _, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(image.shape[0])
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * image[:, yy, xx]
    return out


def test_point_sample_matches_manual_bilinear():
    image = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) ** 1.5  # C=2, H=3, W=4
    points = [(0.5, 0.5), (0.375, 1 / 6), (0.3, 0.7), (0.01, 0.99), (1.0, 0.0), (0.9, 0.45)]
    coords = torch.tensor(points)[None]
    got = point_sample(image[None], coords)
    assert got.shape == (1, 2, len(points))
    for p, (x, y) in enumerate(points):
        torch.testing.assert_close(got[0, :, p], manual_bilinear(image, x, y), rtol=1e-5, atol=1e-5)
    # A pixel centre returns the pixel itself: x indexes width, y height.
    assert got[0, 0, 1].item() == pytest.approx(image[0, 0, 1].item(), abs=1e-5)


def test_point_sample_same_location_at_any_resolution():
    big = torch.zeros(1, 1, 32, 32)
    big[..., :16, 8:] = 1.0
    small = F.avg_pool2d(big, 4)
    coords = torch.tensor([[[0.6, 0.2], [0.1, 0.2], [0.6, 0.8]]])
    torch.testing.assert_close(point_sample(big, coords), point_sample(small, coords))
    assert point_sample(big, coords).flatten().tolist() == [1.0, 0.0, 0.0]


def test_uncertain_points_concentrate_near_boundary():
    torch.manual_seed(0)
    xs = torch.linspace(-1, 1, 64)
    logits = (xs[None, :] * 10).expand(64, 64)[None, None].repeat(2, 1, 1, 1)  # zero crossing at x = 0.5
    coords = uncertain_point_coords(logits, calculate_uncertainty, 200, 3.0, 1.0)
    assert coords.shape == (2, 200, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    assert (coords[..., 0] - 0.5).abs().mean() < 0.1  # uniform points would give 0.25
    mixed = uncertain_point_coords(logits, calculate_uncertainty, 200, 3.0, 0.5)
    assert (mixed[:, 100:, 0] - 0.5).abs().mean() > 0.15  # the random half is spread out


def test_calculate_uncertainty():
    assert calculate_uncertainty(torch.tensor([-3.0, 0.0, 2.0])).tolist() == [-3.0, 0.0, -2.0]


# ---------------------------------------------------------------- matcher

def test_matcher_finds_permutation_and_handles_empty_image():
    torch.manual_seed(0)
    targets, perms = two_images()
    outputs = perfect_outputs(targets, perms)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, TARGET_SIZE, TARGET_SIZE)}
    outputs = {k: torch.cat([v, v[:1]]) for k, v in outputs.items()}
    indices = HungarianMatcher(num_points=256)(outputs, targets + [empty])
    assert len(indices) == 3
    for (pred_idx, tgt_idx), perm in zip(indices[:2], perms):
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert {(int(p), int(t)) for p, t in zip(pred_idx, tgt_idx)} == {(q, j) for j, q in enumerate(perm)}
    assert indices[2][0].numel() == 0 and indices[2][1].numel() == 0


def test_class_agnostic_matching_ignores_logits():
    targets, perms = two_images()
    outputs = perfect_outputs(targets, perms)
    matcher = HungarianMatcher(cost_class=0.0, num_points=256)
    torch.manual_seed(1)
    first = matcher({"pred_masks": outputs["pred_masks"]}, targets)  # logits not even needed
    torch.manual_seed(1)
    second = matcher({**outputs, "pred_logits": torch.randn(2, NUM_QUERIES, NUM_CLASSES + 1) * 100}, targets)
    for (p1, t1), (p2, t2), perm in zip(first, second, perms):
        assert torch.equal(p1, p2) and torch.equal(t1, t2)
        assert dict(zip(t1.tolist(), p1.tolist())) == dict(enumerate(perm))


def test_matcher_uses_class_cost():
    # Two identical masks with different classes: only the class cost can tell them apart.
    target = make_target([(0, 0, 16, 16), (0, 0, 16, 16)], [1, 2])
    outputs = perfect_outputs([target], [[3, 0]])
    for q, cls in ((3, 1), (0, 2)):
        outputs["pred_logits"][0, q] = -10.0
        outputs["pred_logits"][0, q, cls] = 10.0
    pred_idx, tgt_idx = HungarianMatcher(num_points=256)(outputs, [target])[0]
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 3, 1: 0}


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ConfigError):
        HungarianMatcher(0.0, 0.0, 0.0)


# ---------------------------------------------------------------- criterion

def test_perfect_predictions_have_much_lower_loss_than_random():
    torch.manual_seed(0)
    targets, perms = two_images()
    criterion = build_criterion(small_cfg(), NUM_CLASSES)
    perfect = criterion(perfect_outputs(targets, perms), targets)
    random = criterion(random_outputs(2), targets)
    assert set(perfect) == {"loss_ce", "loss_mask", "loss_dice"}
    assert total_loss(perfect) < 0.2 * total_loss(random)
    assert perfect["loss_ce"] < 1e-3
    # Not ~0: importance sampling puts most points on mask boundaries, where 1/4-resolution logits blur.
    for name in ("loss_mask", "loss_dice"):
        assert perfect[name] < 0.25 * random[name]


def test_gradients_reach_logits_and_masks():
    torch.manual_seed(0)
    targets, _ = two_images()
    outputs = random_outputs(2, requires_grad=True)
    total_loss(build_criterion(small_cfg(), NUM_CLASSES)(outputs, targets)).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_masks"].grad.abs().sum() > 0


def test_class_agnostic_mode_multiplies_the_class_loss_by_zero():
    torch.manual_seed(0)
    targets, _ = two_images()
    for t in targets:
        t["labels"] = torch.full_like(t["labels"], 99)  # e.g. SAM masks: labels are meaningless
    outputs = random_outputs(2, requires_grad=True)
    outputs["aux_outputs"] = [random_outputs(2, requires_grad=True)]
    criterion = build_criterion(small_cfg(class_weight=0.0), NUM_CLASSES)
    assert criterion.matcher.cost_class == 0
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    assert losses["loss_ce"].item() == 0.0 and losses["loss_ce_0"].item() == 0.0
    total_loss(losses).backward()
    # Zero gradients, not missing ones: the optimizer still sees (and decays) the class head.
    for logits in (outputs["pred_logits"], outputs["aux_outputs"][0]["pred_logits"]):
        assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0
    assert outputs["pred_masks"].grad.abs().sum() > 0
    # A class head of another size than the criterion's K (e.g. the vocabulary of the warm-up dataset).
    wide = {k: v.detach() for k, v in random_outputs(2).items()}
    wide["pred_logits"] = torch.randn(2, NUM_QUERIES, NUM_CLASSES + 4)
    assert criterion(wide, targets)["loss_ce"].item() == 0.0


def test_warmup_step_changes_the_class_head_by_weight_decay_only():
    """DeWa (class weight 0): after a step, the class head equals an AdamW step with zero gradients."""
    from dearli.bench.step import synthetic_batch
    from dearli.config import load_config
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.training.optim import build_optimizer
    from dearli.training.step import make_grad_scaler, train_step

    cfg = load_config("tiny", ["model.loss.num_points=256", "model.loss.class_weight=0", "optim.lr=0.01",
                               "optim.weight_decay=0.5"])
    torch.manual_seed(0)
    model = build_m2f_lang(cfg.model, [["red"], ["blue"], ["sky"]])
    head = model.transformer_decoder.class_head
    before = {name: p.detach().clone() for name, p in head.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim)
    criterion = build_criterion(cfg.model.loss, 3)
    train_step(model, criterion, optimizer, synthetic_batch(2, 64), cfg, make_grad_scaler(torch.device("cpu"), False),
               torch.device("cpu"))
    decayed = 1 - cfg.optim.lr * cfg.optim.weight_decay  # AdamW with zero gradients: p <- p (1 - lr wd)
    for name, param in head.named_parameters():
        expected = before[name] if name == "void_embedding" else before[name] * decayed
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(head.logit_scale.detach(), before["logit_scale"])  # decayed, as upstream
    moved = model.transformer_decoder.mask_embed.layers[0].weight
    assert moved.grad is not None and moved.grad.abs().sum() > 0  # the mask branch did learn


def test_aux_losses_present_with_same_weights():
    targets, perms = two_images()
    outputs = perfect_outputs(targets, perms, scale=1.0)  # soft logits: non-trivial losses
    outputs["aux_outputs"] = [{k: v.clone() for k, v in outputs.items()} for _ in range(2)]
    base, doubled = small_cfg(), small_cfg(class_weight=4.0, mask_weight=10.0, dice_weight=10.0)
    torch.manual_seed(3)
    losses = build_criterion(base, NUM_CLASSES)(outputs, targets)
    torch.manual_seed(3)
    losses2 = build_criterion(doubled, NUM_CLASSES)(outputs, targets)
    names = {f"{n}{s}" for n in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1")}
    assert set(losses) == names
    for name in names:
        torch.testing.assert_close(losses2[name], 2 * losses[name])  # the weight applies to every layer
    torch.testing.assert_close(losses["loss_ce_1"], losses["loss_ce"])  # identical aux output
    assert losses["loss_mask_1"] == pytest.approx(losses["loss_mask"].item(), rel=0.1)
    no_aux = build_criterion(small_cfg(deep_supervision=False), NUM_CLASSES)(outputs, targets)
    assert set(no_aux) == {"loss_ce", "loss_mask", "loss_dice"}


def test_doubling_the_batch_keeps_the_loss():
    targets, perms = two_images()
    outputs = perfect_outputs(targets, perms, scale=1.0)
    outputs["pred_masks"] = outputs["pred_masks"] + 0.5 * torch.randn(outputs["pred_masks"].shape,
                                                                      generator=torch.Generator().manual_seed(0))
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items()}
    criterion = build_criterion(small_cfg(num_points=2048), NUM_CLASSES)
    torch.manual_seed(0)
    single = criterion(outputs, targets)
    torch.manual_seed(0)
    double = criterion(doubled, targets + targets)
    torch.testing.assert_close(double["loss_ce"], single["loss_ce"])
    for name in ("loss_mask", "loss_dice"):
        assert double[name].item() == pytest.approx(single[name].item(), rel=0.05)
    assert criterion.num_masks(targets + targets, torch.device("cpu")) == 10.0


def test_batch_without_targets():
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, TARGET_SIZE, TARGET_SIZE)}
    outputs = random_outputs(2, requires_grad=True)
    criterion = build_criterion(small_cfg(), NUM_CLASSES)
    assert criterion.num_masks([empty, empty], torch.device("cpu")) == 1.0  # clamped
    losses = criterion(outputs, [empty, empty])
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    total_loss(losses).backward()
    assert outputs["pred_masks"].grad is not None  # still in the graph (distributed training needs it)
    assert outputs["pred_logits"].grad[..., NUM_CLASSES].sum() < 0  # pushed towards void


def test_deterministic_under_fixed_seed():
    targets, _ = two_images()
    criterion = build_criterion(small_cfg(), NUM_CLASSES)
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs = random_outputs(2)
        outputs["aux_outputs"] = [random_outputs(2)]
        results.append(criterion(outputs, targets))
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name])


def test_bad_targets_raise_clear_errors():
    targets, _ = two_images()
    criterion = build_criterion(small_cfg(), NUM_CLASSES)
    bad_label = [targets[0], {**targets[1], "labels": torch.tensor([2, NUM_CLASSES])}]
    with pytest.raises(DataError, match="labels"):
        criterion(random_outputs(2), bad_label)
    unpadded = [targets[0], {**targets[1], "masks": targets[1]["masks"][:, :24]}]
    with pytest.raises(DataError, match="pad"):
        criterion(random_outputs(2), unpadded)
    with pytest.raises(DataError, match="2 images"):
        criterion(random_outputs(2), targets[:1])
    with pytest.raises(ConfigError):
        type(criterion)(NUM_CLASSES, HungarianMatcher(cost_class=2.0), small_cfg(class_weight=0.0))


def test_no_object_weight_zero_ignores_unmatched_queries_and_survives_empty_targets():
    """The loss on pseudo-labels (ssl.unlabeled_no_object_weight=0): a query no segment matched is no
    evidence of "nothing there" (the teacher may have missed an object), so its class scores cost nothing."""
    targets, perms = two_images()
    criterion = build_criterion(small_cfg(no_object_weight=0.0), NUM_CLASSES)
    outputs = perfect_outputs(targets, perms)
    torch.manual_seed(0)
    base = criterion(outputs, targets)["loss_ce"]
    changed = {**outputs, "pred_logits": outputs["pred_logits"].clone()}
    changed["pred_logits"][0, 1] = torch.tensor([9.0, 0.0, 0.0, 0.0, -9.0])  # unmatched query 1 of image 0
    torch.manual_seed(0)
    assert torch.equal(criterion(changed, targets)["loss_ce"], base)
    torch.manual_seed(0)
    weighted = build_criterion(small_cfg(no_object_weight=0.1), NUM_CLASSES)
    assert weighted(changed, targets)["loss_ce"] > weighted(outputs, targets)["loss_ce"]
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, TARGET_SIZE, TARGET_SIZE,
                                                                                   dtype=torch.bool)}] * 2
    losses = criterion(random_outputs(2, requires_grad=True), empty)
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_ce"]) == 0.0


# ---------------------------------------------------------------- label sets (ssl.thing_pseudo_classes)

THINGS = (0, 1)  # of NUM_CLASSES = 4: classes 2 and 3 are stuff


def test_identity_label_sets_are_the_plain_class_loss():
    targets, perms = two_images()
    outputs = random_outputs(2)
    eye = torch.cat([torch.eye(NUM_CLASSES, dtype=torch.bool), torch.zeros(NUM_CLASSES, 1, dtype=torch.bool)], 1)
    plain, with_sets = build_criterion(small_cfg(), NUM_CLASSES), build_criterion(small_cfg(), NUM_CLASSES, eye)
    indices = [(torch.tensor(p), torch.arange(len(p))) for p in perms]
    assert torch.allclose(plain.loss_labels(outputs, targets, indices),
                          with_sets.loss_labels(outputs, targets, indices), atol=1e-6)


def test_any_thing_sets_accept_another_thing_class_but_not_stuff():
    sets = thing_label_sets(NUM_CLASSES, THINGS)
    assert sets.shape == (NUM_CLASSES, NUM_CLASSES + 1)
    assert sets[0, :2].all() and sets[1, :2].all() and not sets[0, 2:].any()
    assert sets[2].tolist() == [False, False, True, False, False]  # stuff keeps its own class
    criterion = build_criterion(small_cfg(), NUM_CLASSES, sets)
    target = make_target([(0, 0, 16, 16)], [0])  # a thing of class 0
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    losses = {}
    for named in (0, 1, 2):  # the query names the target's class, another thing, a stuff class
        outputs = perfect_outputs([target], [[0]])
        outputs["pred_logits"][0, 0] = -10.0
        outputs["pred_logits"][0, 0, named] = 10.0
        losses[named] = criterion.loss_labels(outputs, [target], indices).item()
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert losses[2] > losses[0] + 1.0
    plain = build_criterion(small_cfg(), NUM_CLASSES)
    assert plain.loss_labels(outputs, [target], indices).item() > losses[0] + 1.0  # class 2 is wrong for CE


def test_any_thing_matching_takes_a_query_of_another_thing_class():
    # Query 3 has the target's mask but names thing class 1; query 0 has it too but names stuff class 2.
    target = make_target([(0, 0, 16, 16)], [0])
    outputs = perfect_outputs([target], [[3]])
    outputs["pred_masks"][0, 0] = outputs["pred_masks"][0, 3]
    for q, cls in ((3, 1), (0, 2)):
        outputs["pred_logits"][0, q] = -10.0
        outputs["pred_logits"][0, q, cls] = 10.0
    sets = thing_label_sets(NUM_CLASSES, THINGS)
    assert HungarianMatcher(num_points=256, label_sets=sets)(outputs, [target])[0][0].tolist() == [3]


def test_label_sets_of_the_wrong_shape_are_refused():
    with pytest.raises(ConfigError, match="label sets"):
        build_criterion(small_cfg(), NUM_CLASSES, torch.ones(NUM_CLASSES, NUM_CLASSES, dtype=torch.bool))
