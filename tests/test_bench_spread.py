"""Bench figures: the median of repeats with the warm-up left out, printed with min and max."""

import pytest

from dearli.bench.spread import Spread, repeated


def test_the_warm_up_is_not_a_repeat_and_the_median_is_the_figure():
    values = iter([100.0, 3.0, 1.0, 2.0])  # the first call (warm-up) is slow and left out
    spread = repeated(lambda: next(values), repeats=3, warmup=1)
    assert spread == Spread(1.0, 2.0, 3.0, 3)
    assert spread.text(1) == "2.0 (1.0-3.0 of 3)"
    assert spread.as_dict() == {"min": 1.0, "median": 2.0, "max": 3.0, "repeats": 3}
    with pytest.raises(ValueError):
        repeated(lambda: 1.0, repeats=0)
