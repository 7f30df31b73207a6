import pytest
import torch
from torch import nn

from dearli.config import load_config
from dearli.errors import DataError
from dearli.training.augment import augment, color_jitter, random_crop, random_resize
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


def test_crop_pads_small_images_and_marks_padding_invalid():
    image, masks, _ = _sample(40, 50)
    img, m, valid = random_crop(image, masks, 64, torch.Generator().manual_seed(0))
    assert img.shape == (3, 64, 64) and m.shape == (2, 64, 64)
    assert valid[:40, :50].all() and not valid[40:].any() and not valid[:, 50:].any()
    assert (img[:, 40:] == 0).all() and not m[:, 40:].any()


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


def test_color_jitter_changes_colours_only_when_enabled():
    image, _, _ = _sample()
    assert torch.equal(color_jitter(image, 0.0, torch.Generator()), image)
    assert not torch.equal(color_jitter(image, 0.4, torch.Generator().manual_seed(0)), image)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.query_embed = nn.Embedding(3, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_norms_and_embeddings():
    net = _Net()
    decay, no_decay = param_groups(net, 0.05)
    assert {id(p) for p in decay["params"]} == {id(net.linear.weight), id(net.linear.bias)}
    assert {id(p) for p in no_decay["params"]} == {id(net.norm.weight), id(net.norm.bias),
                                                   id(net.query_embed.weight)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


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
    with pytest.raises(DataError, match="step_0000001.pt: not a readable dearli checkpoint"):
        load_checkpoint(bad)
