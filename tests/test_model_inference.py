"""Panoptic / semantic inference (Mask2Former parity) and test-time resize, pad and postprocessing."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dearli.model.inference import (
    PanopticRule,
    pad_to_multiple,
    panoptic_inference,
    postprocess_masks,
    resize_shortest_edge,
    semantic_inference,
    shortest_edge_size,
)

FIXTURE = Path(__file__).parent / "fixtures" / "model" / "panoptic_inference.npz"


def fixture_cases():
    data = np.load(FIXTURE)
    names = sorted({k.split("_")[0] for k in data.files})
    return [{k[len(n) + 1:]: data[k] for k in data.files if k.startswith(n + "_")} for n in names]


CASES = fixture_cases()


def run_panoptic(case, mask_cls=None, probs=False):
    mask_cls = torch.from_numpy(case["mask_cls"]) if mask_cls is None else mask_cls
    return panoptic_inference(mask_cls, torch.from_numpy(case["mask_pred"]), case["thing_ids"].tolist(),
                              float(case["object_mask_threshold"]), float(case["overlap_threshold"]), probs=probs)


def segment_rows(segments):
    return np.array([[s["id"], int(s["isthing"]), s["category_id"]] for s in segments], dtype=np.int64).reshape(-1, 3)


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_panoptic_fixture_parity(case):
    seg, segments = run_panoptic(case)
    assert seg.dtype == torch.int32
    np.testing.assert_array_equal(seg.numpy(), case["panoptic_seg"])
    np.testing.assert_array_equal(segment_rows(segments), case["segments"])
    assert all(isinstance(s["isthing"], bool) for s in segments)


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_semantic_fixture_parity(case):
    semseg = semantic_inference(torch.from_numpy(case["mask_cls"]), torch.from_numpy(case["mask_pred"]))
    np.testing.assert_allclose(semseg.numpy(), case["semseg"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_probability_input_gives_the_same_result(case):
    probs = torch.softmax(torch.from_numpy(case["mask_cls"]), dim=-1)
    seg, segments = run_panoptic(case, probs, probs=True)
    np.testing.assert_array_equal(seg.numpy(), case["panoptic_seg"])
    np.testing.assert_array_equal(segment_rows(segments), case["segments"])
    # Log-probabilities through the default softmax path are the same distribution.
    seg_log, segments_log = run_panoptic(case, probs.log())
    np.testing.assert_array_equal(seg_log.numpy(), case["panoptic_seg"])
    assert [{k: v for k, v in s.items() if k != "score"} for s in segments_log] == \
        [{k: v for k, v in s.items() if k != "score"} for s in segments]
    # Each segment carries the class probability of the query that made it.
    np.testing.assert_allclose([s["score"] for s in segments_log], [s["score"] for s in segments], atol=1e-6)
    assert all(0.0 < s["score"] <= 1.0 for s in segments)
    semseg = semantic_inference(probs, torch.from_numpy(case["mask_pred"]), probs=True)
    np.testing.assert_allclose(semseg.numpy(), case["semseg"], rtol=0, atol=1e-6)


def confident(classes, num_classes):
    logits = torch.full((len(classes), num_classes + 1), -10.0)
    logits[torch.arange(len(classes)), torch.tensor(classes)] = 10.0
    return logits


def test_stuff_merges_things_do_not():
    # 4 queries on a 4×4 image, each owning one column: stuff class 2 twice, thing class 0 twice.
    masks = torch.full((4, 4, 4), -10.0)
    for q in range(4):
        masks[q, :, q] = 10.0
    seg, segments = panoptic_inference(confident([2, 0, 2, 0], 3), masks, [0, 1], 0.5, 0.8)
    assert [(s["id"], s["isthing"], s["category_id"]) for s in segments] == [(1, False, 2), (2, True, 0), (3, True, 0)]
    assert seg[0].tolist() == [1, 2, 1, 3]


def test_thresholds_drop_queries():
    masks = torch.full((2, 4, 4), -10.0)
    masks[0, :2] = 10.0
    masks[1] = 10.0  # covers everything, but query 0 wins its half (higher score)
    cls = confident([1, 0], 2)
    cls[1, 0] = 1.0  # query 1 less confident
    seg, segments = panoptic_inference(cls, masks, [0], 0.0, 0.8)
    assert [s["id"] for s in segments] == [1]  # query 1 keeps only half of its mask < 0.8
    assert seg[:2].eq(1).all() and seg[2:].eq(0).all()
    seg, segments = panoptic_inference(cls, masks, [0], 0.0, 0.4)
    assert len(segments) == 2 and seg[2:].eq(2).all()
    void = confident([2, 2], 2)  # both predict void
    seg, segments = panoptic_inference(void, masks, [0], 0.0, 0.8)
    assert segments == [] and seg.eq(0).all() and seg.shape == (4, 4)


def test_teacher_rule_things_first_and_confident_stuff():
    # A confident stuff query (class 1) spreads over the whole 4×6 image; a less confident thing query (class 0)
    # covers a 2×2 block; Mask2Former's rule gives the block to the stuff (score·mask is higher there).
    masks = torch.full((2, 4, 6), 4.0)
    masks[0, :, 4:] = 0.3  # stuff mask probability ~0.57 on the last two columns
    masks[1] = -10.0
    masks[1, 1:3, 1:3] = 10.0
    cls = confident([1, 0], 2)
    cls[1] = torch.tensor([0.0, -1.0, -1.0])  # thing query: class 0 with probability ~0.58
    seg, segments = panoptic_inference(cls, masks, [0], 0.0, 0.5)
    assert [s["isthing"] for s in segments] == [False]  # the thing lost its pixels to the stuff
    rule = PanopticRule(things_first=True)
    seg, segments = panoptic_inference(cls, masks, [0], 0.0, 0.5, rule=rule)
    assert [(s["id"], s["isthing"]) for s in segments] == [(1, False), (2, True)]
    assert seg[1:3, 1:3].eq(2).all() and int(seg.eq(1).sum()) == 24 - 4
    rule = PanopticRule(things_first=True, stuff_min_mask=0.9)
    seg, _ = panoptic_inference(cls, masks, [0], 0.0, 0.5, rule=rule)
    assert seg[:, 4:].eq(0).all() and int(seg.eq(1).sum()) == 16 - 4  # unsure stuff pixels are left unlabeled


def test_shortest_edge_size():
    assert shortest_edge_size(480, 640, 128, 512) == (128, 171)
    assert shortest_edge_size(640, 480, 128, 512) == (171, 128)
    assert shortest_edge_size(100, 1000, 128, 512) == (51, 512)  # long side capped
    image = torch.rand(3, 480, 640)
    assert resize_shortest_edge(image, 128, 512).shape == (3, 128, 171)
    assert resize_shortest_edge(image[None], 128, 512).shape == (1, 3, 128, 171)
    flat = torch.full((3, 50, 70), 7.0)
    assert torch.allclose(resize_shortest_edge(flat, 128, 512), torch.full((3, 128, 179), 7.0))


def test_pad_to_multiple():
    image = torch.rand(3, 40, 64)
    padded = pad_to_multiple(image, 32)
    assert padded.shape == (3, 64, 64)
    assert torch.equal(padded[:, :40], image) and padded[:, 40:].eq(0).all()
    assert pad_to_multiple(torch.rand(2, 3, 64, 32)).shape == (2, 3, 64, 32)
    mean = (120.0, 110.0, 100.0)
    padded = pad_to_multiple(image, 32, mean)
    for c in range(3):
        assert padded[c, 40:].eq(mean[c]).all()
    # Padding a raw image with the pixel mean is padding the normalised image with 0.
    normalised = (padded - torch.tensor(mean).view(3, 1, 1)) / 50.0
    assert normalised[:, 40:].abs().max() < 1e-6


def test_postprocess_round_trip():
    orig_hw = (90, 130)
    resized_hw = shortest_edge_size(*orig_hw, 128, 512)
    assert resized_hw == (128, 185)
    padded = pad_to_multiple(torch.zeros(3, *resized_hw), 32)
    padded_hw = tuple(padded.shape[-2:])
    assert padded_hw == (128, 192)
    # Stride-4 mask logits: query 0 positive on the left half of the valid region, query 1 in the padding.
    stride4 = torch.full((2, 32, 48), -5.0)
    stride4[0, :, : resized_hw[1] // 8] = 5.0
    stride4[1, :, 47:] = 5.0
    out = postprocess_masks(stride4, padded_hw, resized_hw, orig_hw)
    assert out.shape == (2, *orig_hw)
    assert (out[0, :, :60] > 0).all() and (out[0, :, 70:] < 0).all()
    assert (out[1] < 0).all()  # the padding was cropped away
    assert postprocess_masks(stride4[None], padded_hw, resized_hw, orig_hw).shape == (1, 2, *orig_hw)


@pytest.mark.parametrize("rule", [PanopticRule(), PanopticRule(things_first=True, stuff_min_mask=0.7)])
@pytest.mark.parametrize("chunk", [1, 3, 0])
def test_upsampling_a_few_queries_at_a_time_gives_the_same_panoptic_map(rule, chunk):
    # Mask logits at the model's stride-4 resolution, the image 4× larger and cropped: deciding pixels with the
    # masks upsampled `chunk` queries at a time must give exactly the map of upsampling all of them first.
    generator = torch.Generator().manual_seed(3)
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(14.0), indexing="ij")
    centres = torch.rand(12, 2, generator=generator) * torch.tensor([10.0, 14.0])
    radii = 1.5 + 3 * torch.rand(12, generator=generator)
    distance = ((ys - centres[:, :1, None]) ** 2 + (xs - centres[:, 1:, None]) ** 2).sqrt()
    low = 3 * (radii.view(-1, 1, 1) - distance)  # one blob per query, overlapping
    low[5] = low[2].clone()  # a tie between two queries: the earlier one wins in both
    cls = torch.randn(12, 6, generator=generator) * 3
    cls[5] = cls[2].clone()
    upsample = lambda m: postprocess_masks(m, (40, 56), (37, 50), (75, 101))  # noqa: E731
    calls = []
    expected = panoptic_inference(cls, upsample(low), [0, 1, 2], 0.1, 0.6, rule=rule)
    got = panoptic_inference(cls, low, [0, 1, 2], 0.1, 0.6, rule=rule, upsample=upsample, chunk=chunk,
                             check=lambda: calls.append(1))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]
    assert len(expected[1]) >= 3 and got[0].shape == (75, 101)
    assert calls, "the check runs between chunks"


def test_a_check_that_raises_stops_the_inference():
    def stop():
        raise TimeoutError("gone")

    with pytest.raises(TimeoutError):
        panoptic_inference(torch.randn(4, 3), torch.randn(4, 5, 5), [0], 0.0, 0.5, upsample=lambda m: m, check=stop)
