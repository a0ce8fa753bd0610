"""The figures' pixel logic: filters drawn in RGB whatever order the network reads its input in."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.analysis.plots import filter_grid


def _filter_reading_only_input_channel(index: int) -> np.ndarray:
    weights = np.zeros((1, 3, 2, 2))
    weights[0, index] = 1.0
    return weights


def test_a_bgr_network_filter_on_its_blue_input_is_drawn_blue():
    # Input channel 0 is blue for a network fed BGR (Keras caffe preprocessing), red for one fed RGB.
    weights = _filter_reading_only_input_channel(0)
    assert filter_grid(weights, "BGR")[0, 0].tolist() == [0.0, 0.0, 1.0]
    assert filter_grid(weights, "RGB")[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert filter_grid(weights)[0, 0].tolist() == [1.0, 0.0, 0.0]


def test_grey_filters_ignore_the_channel_order():
    weights = np.random.default_rng(0).normal(size=(4, 1, 3, 3))
    np.testing.assert_array_equal(filter_grid(weights, "BGR"), filter_grid(weights, "RGB"))


def test_an_unknown_channel_order_is_refused():
    with pytest.raises(ValueError, match="RGB or BGR"):
        filter_grid(_filter_reading_only_input_channel(1), "GBR")
