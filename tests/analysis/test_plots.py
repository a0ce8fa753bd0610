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


def test_unreliable_values_are_drawn_hollow_and_the_legend_says_why(monkeypatch, tmp_path):
    from medtransfer.analysis import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.update(figure=figure))
    layers = ("stem", "stage1", "stage2", "stage3", "stage4")
    rows = [{"pair_kind": "source_vs_finetuned", "pair": "natural", "regime": "full", "layer": layer, "measure": "cca",
             "mean": 0.9 - 0.1 * index, "sd": 0.01, "reliable_share": 0.0 if layer == "stage4" else 1.0,
             "random_vs_random_mean": 0.4, "random_vs_random_sd": 0.02}
            for index, layer in enumerate(layers)]
    plots.plot_layer_curves(rows, "cca", layers, tmp_path / "curves.png", title="t", floor_kinds=("random_vs_random",))
    axis = drawn["figure"].axes[0]
    hollow = [line for line in axis.get_lines()
              if line.get_marker() == "o" and line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
              and len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in hollow] == [[4]]  # stage4 alone
    assert [float(y) for y in hollow[0].get_ydata()] == pytest.approx([0.5])
    assert plots.UNRELIABLE_LEGEND in [text.get_text() for text in axis.get_legend().get_texts()]
    assert "10 rows per channel" in plots.UNRELIABLE_LEGEND
