"""Multi-scale deformable attention: parity with the reference implementation, module behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dearli.model.ms_deform_attn_module import MSDeformAttn
from dearli.ops import ms_deform_attn

FIXTURE = Path(__file__).parent / "fixtures" / "model" / "msdeform.npz"


def _cases() -> list[str]:
    with np.load(FIXTURE) as data:
        return sorted({key.split("_", 1)[0] for key in data.files})


def test_fixture_has_cases():
    assert len(_cases()) >= 3


@pytest.mark.parametrize("case", _cases())
def test_matches_reference_float64(case):
    with np.load(FIXTURE) as data:
        t = {k: torch.from_numpy(data[f"{case}_{k}"]) for k in ("value", "shapes", "locations", "weights", "output")}
    out = ms_deform_attn(t["value"], t["shapes"], t["locations"], t["weights"])
    assert out.dtype == torch.float64
    assert out.shape == t["output"].shape
    torch.testing.assert_close(out, t["output"], rtol=0, atol=1e-10)
    # Spatial shapes given as plain (H, W) pairs give the same result.
    pairs = [tuple(s) for s in t["shapes"].tolist()]
    torch.testing.assert_close(ms_deform_attn(t["value"], pairs, t["locations"], t["weights"]), out)


def test_pixel_centre_sampling_reads_the_pixel():
    # One level 2×3, one head, one point at the centre of pixel (row 1, col 2): exact read, no blending.
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
    loc = torch.tensor([(2 + 0.5) / 3, (1 + 0.5) / 2], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(2, 3)], loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    assert out.item() == pytest.approx(5.0)
    # Outside the map reads zeros.
    out = ms_deform_attn(value, [(2, 3)], loc + 2.0, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    assert out.item() == 0.0


def test_shape_mismatch_is_reported():
    value = torch.zeros(1, 10, 2, 4)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, [(3, 3)], torch.zeros(1, 5, 2, 1, 4, 2), torch.zeros(1, 5, 2, 1, 4))


def _module_inputs(n=2, c=32, shapes=((8, 6), (4, 3), (2, 2))):
    s = sum(h * w for h, w in shapes)
    torch.manual_seed(0)
    query = torch.randn(n, s, c)
    value = torch.randn(n, s, c, requires_grad=True)
    ref = torch.rand(n, s, len(shapes), 2)
    return query, ref, value, [tuple(x) for x in shapes]


def test_module_output_shape_and_gradients():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, ref, value, shapes = _module_inputs()
    out = attn(query, ref, value, shapes)
    assert out.shape == query.shape
    out.square().sum().backward()
    assert value.grad is not None and value.grad.abs().sum() > 0
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        grad = getattr(attn, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_module_initialisation_rays():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    offsets = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 points along +x, head 1 along +y, point k at distance k+1 pixels, same on every level.
    torch.testing.assert_close(offsets[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(offsets[1, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0


def test_module_padding_mask_hides_values():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, ref, value, shapes = _module_inputs()
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[:, :10] = True
    changed = value.detach().clone()
    changed[:, :10] += 100.0
    torch.testing.assert_close(attn(query, ref, value, shapes, mask), attn(query, ref, changed, shapes, mask))
