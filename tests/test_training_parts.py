import dataclasses

import pytest
import torch
from _reference import random_crop, random_resize
from torch import nn

from dearli.config import load_config
from dearli.errors import DataError
from dearli.training.augment import (
    PAD_VALUE,
    _rgb_to_hsv,
    augment,
    draw_short_side,
    ssd_color_aug,
)
from dearli.training.checkpoint import latest_checkpoint, load_checkpoint, restore, save_checkpoint
from dearli.training.optim import build_optimizer, build_poly_scheduler, clip_gradients, param_groups


def _sample(h=60, w=90):
    image = torch.arange(3 * h * w, dtype=torch.int64).reshape(3, h, w).remainder(256).to(torch.uint8)
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, :, : w // 2] = True
    masks[1, 10:20, w - 10:] = True
    return image, masks, torch.tensor([3, 5])


def test_resize_keeps_masks_aligned_and_binary():
    image, masks, _ = _sample()
    image2, masks2 = random_resize(image, masks, 120)
    assert image2.shape == (3, 120, 180) and masks2.shape == (2, 120, 180) and masks2.dtype == torch.bool
    assert masks2[0, :, :90].all() and not masks2[0, :, 90:].any()
    _, capped = random_resize(image, masks, 120, max_size=150)  # the long side is capped, aspect kept
    assert capped.shape == (2, 100, 150)


def _centre(profile: torch.Tensor) -> float:
    """Weighted mean position of a 1-D profile."""
    profile = profile.double()
    return float((profile * torch.arange(len(profile), dtype=torch.float64)).sum() / profile.sum())


@pytest.mark.parametrize("factor", [1.5, 0.5, 1.3, 0.63])
@pytest.mark.parametrize("axis", ["column", "row"])
def test_one_pixel_stripe_keeps_its_position(factor, axis):
    """A 1-px stripe, in the image and in a mask, stays where the resized image has it.

    Every stripe that survives the (nearest) mask resize lies within half a pixel of the image's stripe,
    and on average exactly on it. (At 0.5x half of all 1-px stripes must vanish from a nearest resize; at
    0.5x and 1.5x pixel centres tie, so the error there is ±0.25 px for any rounding rule. torch's
    mode="nearest" floors and is off by up to 0.8 px at 0.63x, 0.45 px on average.)
    """
    length = 120
    errors, survivors = [], 0
    for pos in range(2, length - 2):
        image = torch.zeros(3, length, 16, dtype=torch.uint8)
        masks = torch.zeros(1, length, 16, dtype=torch.bool)
        image[:, pos], masks[:, pos] = 255, True
        if axis == "column":
            image, masks = image.transpose(1, 2), masks.transpose(1, 2)
        short = round(16 * factor)
        image2, masks2 = random_resize(image, masks, short)
        if axis == "column":
            image2, masks2 = image2.transpose(1, 2), masks2.transpose(1, 2)
        out_len = image2.shape[1]
        expected = (pos + 0.5) * out_len / length - 0.5  # the source pixel's centre, in output pixels
        assert abs(_centre(image2[0].float().sum(1)) - expected) < 0.15  # the image is resized centre-aligned
        profile = masks2[0].float().sum(1)
        if profile.sum() > 0:
            survivors += 1
            errors.append(_centre(profile) - expected)
    assert survivors >= (length - 4) * min(factor, 1.0) * 0.9, "too many stripes vanished"
    assert max(abs(e) for e in errors) <= 0.5, (factor, max(abs(e) for e in errors))
    if factor not in (0.5, 1.5):
        assert abs(sum(errors) / len(errors)) < 0.1  # no systematic shift


def test_crop_pads_small_images_and_marks_padding_invalid():
    cfg = dataclasses.replace(load_config("tiny").data, short_sides=(40,), crop_size=64, flip=False,
                              color_aug=False)  # the image keeps its size: only the crop's padding acts
    image, masks, labels = _sample(40, 50)
    sample = augment(image, masks, labels, cfg, torch.Generator().manual_seed(0))
    img, m, valid = sample.image, sample.masks, sample.valid
    assert img.shape == (3, 64, 64) and m.shape == (2, 64, 64) and torch.equal(img[:, :40, :50], image)
    assert valid[:40, :50].all() and not valid[40:].any() and not valid[:, 50:].any()
    assert (img[:, 40:] == PAD_VALUE).all() and (img[:, :, 50:] == 128).all()  # grey, as upstream
    assert not m[:, 40:].any() and not m[:, :, 50:].any()  # background for every mask


def test_short_sides_are_drawn_from_the_list():
    cfg = load_config("ade20k-base").data
    drawn = {draw_short_side(cfg, torch.Generator().manual_seed(s)) for s in range(400)}
    assert drawn == set(range(320, 1281, 64))


def test_augment_is_deterministic_and_drops_vanished_instances():
    cfg = load_config("tiny").data
    image, masks, labels = _sample(200, 300)
    a = augment(image, masks, labels, cfg, torch.Generator().manual_seed(1))
    b = augment(image, masks, labels, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks)
    assert a.image.shape == (3, cfg.crop_size, cfg.crop_size)
    assert a.masks.shape[0] == a.labels.shape[0] and a.masks.flatten(1).any(1).all()
    seen = {augment(image, masks, labels, cfg, torch.Generator().manual_seed(s)).labels.tolist().__len__()
            for s in range(20)}
    assert 1 in seen, "the small instance should be cropped away for some seeds"


def test_augment_crops_masks_as_resizing_then_cropping_would():
    cfg = dataclasses.replace(load_config("tiny").data, color_aug=False, flip=False)
    image, masks, labels = _sample(90, 130)
    for seed in range(6):
        sample = augment(image, masks, labels, cfg, torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed)
        resized, resized_masks = random_resize(image, masks, draw_short_side(cfg, generator), cfg.max_size)
        img, m, valid = random_crop(resized, resized_masks, cfg.crop_size, generator)
        keep = m.flatten(1).any(1)
        assert torch.equal(sample.image, img) and torch.equal(sample.masks, m[keep])
        assert torch.equal(sample.valid, valid)


def test_ssd_color_aug_matches_upstream_ranges():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    unchanged = sum(torch.equal(ssd_color_aug(image, torch.Generator().manual_seed(s)), image) for s in range(200))
    assert 0 < unchanged < 30  # every op is skipped with probability 1/2: all four skipped ~1/16 of the time
    # A grey image has no hue or saturation: only brightness and contrast move it, within their ranges.
    grey = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    for s in range(100):
        out = ssd_color_aug(grey, torch.Generator().manual_seed(s)).float()
        assert out.std() == 0  # still uniform and grey
        assert (100 - 32) * 0.5 - 1 <= out[0, 0, 0] <= (100 + 32) * 1.5 + 1


def test_ssd_hue_shift_is_in_opencv_units():
    """A dark red (hue 0°) never clipped by the other ops: its hue lands within ±36° (18 units of 2°)."""
    red = torch.tensor([120, 30, 30], dtype=torch.uint8)[:, None, None].expand(3, 2, 2).contiguous()
    hues = set()
    for s in range(300):
        out = ssd_color_aug(red, torch.Generator().manual_seed(s), hue_delta=18).float() / 255
        hue, sat, val = _rgb_to_hsv(out)
        degrees = (float(hue[0, 0]) * 360 + 180) % 360 - 180
        assert abs(degrees) <= 36 + 2.5, (s, degrees)  # + rounding to uint8
        hues.add(round(degrees))
    assert max(hues) >= 20 and min(hues) <= -20  # the range is used, not just small shifts
    same = ssd_color_aug(red, torch.Generator().manual_seed(0), hue_delta=0).float() / 255
    assert float(_rgb_to_hsv(same)[0][0, 0]) == 0.0  # hue_delta 0 keeps the hue


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.query_embed = nn.Embedding(3, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


class _Head(nn.Module):
    """Bare parameters named as in M2F-Lang."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.void_embedding = nn.Parameter(torch.zeros(1, 4))
        self.gn = nn.GroupNorm(2, 4)


def test_no_weight_decay_on_norms_and_embeddings():
    net = _Net()
    decay, no_decay = param_groups(net, 0.05)
    assert {id(p) for p in decay["params"]} == {id(net.linear.weight), id(net.linear.bias)}
    assert {id(p) for p in no_decay["params"]} == {id(net.norm.weight), id(net.norm.bias),
                                                   id(net.query_embed.weight)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_weight_decay_rule_is_upstreams():
    """Only norm layers and embeddings are exempt: the temperature and the encoder's level_embed decay."""
    head = _Head()
    decay, no_decay = param_groups(head, 0.05)
    assert {id(p) for p in decay["params"]} == {id(head.logit_scale), id(head.level_embed)}
    assert {id(p) for p in no_decay["params"]} == {id(head.void_embedding), id(head.gn.weight), id(head.gn.bias)}


def test_weight_decay_groups_of_the_model():
    from dearli.model.m2f_lang import build_m2f_lang

    torch.manual_seed(0)
    model = build_m2f_lang(load_config("tiny").model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"transformer_decoder.class_head.logit_scale", "pixel_decoder.encoder.level_embed"} <= decayed
    assert {"transformer_decoder.class_head.void_embedding", "transformer_decoder.query_feat.weight",
            "transformer_decoder.query_embed.weight", "transformer_decoder.level_embed.weight",
            "transformer_decoder.decoder_norm.weight"} <= exempt
    norms = {n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    assert all(n.rsplit(".", 1)[0] in norms or n.endswith(("embed.weight", "query_feat.weight", "void_embedding"))
               for n in exempt), sorted(exempt)
    assert not any(n.startswith("backbone.") for n in decayed | exempt)  # frozen


def test_poly_schedule_and_clipping():
    net = _Net()
    lr = load_config("tiny").optim.lr
    opt = build_optimizer(net, load_config("tiny").optim)
    sched = build_poly_scheduler(opt, 10, 0.9)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(lr) and lrs[5] == pytest.approx(lr * 0.5 ** 0.9)
    assert opt.param_groups[0]["lr"] == 0.0
    net.linear.weight.grad = torch.full_like(net.linear.weight, 10.0)
    before = clip_gradients(net.parameters(), 0.01)
    assert before == pytest.approx(40.0)
    assert net.linear.weight.grad.norm() == pytest.approx(0.01, rel=1e-4)


def test_checkpoint_round_trip_is_weights_only_and_never_overwrites(tmp_path):
    cfg = load_config("tiny")
    net = _Net()
    opt = build_optimizer(net, cfg.optim)
    sched = build_poly_scheduler(opt, 10, 0.9)
    net.linear.weight.grad = torch.ones_like(net.linear.weight)
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path, 3, net, cfg, opt, sched, extra={"pq": 0.5})
    with pytest.raises(DataError, match="already exists"):
        save_checkpoint(tmp_path, 3, net, cfg, opt, sched)
    assert latest_checkpoint(tmp_path) == path
    payload = torch.load(path, weights_only=True)  # must not need pickled classes
    assert payload["step"] == 3
    loaded = load_checkpoint(path)
    assert loaded["config"] == cfg and loaded["extra"] == {"pq": 0.5}
    net2 = _Net()
    opt2 = build_optimizer(net2, cfg.optim)
    sched2 = build_poly_scheduler(opt2, 10, 0.9)
    assert restore(net2, loaded, opt2, sched2) == 3
    assert torch.equal(net2.linear.weight, net.linear.weight)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "step_0000001.pt"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="step_0000001.pt: damaged or truncated checkpoint"):
        load_checkpoint(bad)
