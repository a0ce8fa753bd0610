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
    plots.plot_layer_panels(rows, "cca", layers, tmp_path / "curves.png", title="t",
                            groups=[("source_vs_finetuned", "fine-tuned vs its initialisation")],
                            floor_kinds=("random_vs_random",))
    axis = drawn["figure"].axes[0]
    hollow = [line for line in axis.get_lines()
              if line.get_marker() == "o" and line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
              and len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in hollow] == [[4]]  # stage4 alone
    assert [float(y) for y in hollow[0].get_ydata()] == pytest.approx([0.5])
    assert plots.UNRELIABLE_LEGEND in [text.get_text() for text in axis.get_legend().get_texts()]
    assert "10 rows per channel" in plots.UNRELIABLE_LEGEND


def test_error_bars_are_cut_at_the_measures_range():
    from medtransfer.analysis.plots import clipped_error

    # CKA 0.98 ± 0.05 may not reach above 1: the upper bar is 0.02; the lower keeps its 0.05.
    bars = clipped_error(np.array([0.98, 0.5, 0.01]), np.array([0.05, 0.1, 0.04]), "cka")
    np.testing.assert_allclose(bars, [[0.05, 0.1, 0.01], [0.02, 0.1, 0.04]])
    # debiased CKA may be negative: -0.2 ± 0.1 keeps both bars
    np.testing.assert_allclose(clipped_error(np.array([-0.2]), np.array([0.1]), "cka_debiased"), [[0.1], [0.1]])


def _summary_rows(layers):
    rows = []
    for kind, pair, base in (("source_vs_finetuned", "natural", 0.9), ("source_vs_finetuned", "medical", 0.8),
                             ("pretrained_vs_pretrained", "medical vs natural", 0.5),
                             ("finetuned_vs_finetuned", "medical vs natural", 0.6)):
        for index, layer in enumerate(layers):
            rows.append({"pair_kind": kind, "pair": pair, "regime": "" if kind.startswith("pretrained") else "full",
                         "layer": layer, "measure": "cka", "mean": min(base + 0.05 * index, 0.99), "sd": 0.2,
                         "reliable_share": 1.0, "random_vs_random_mean": 0.3, "random_vs_random_sd": 0.02,
                         "shuffled_mean": 0.1, "shuffled_sd": 0.01})
    return rows


def test_layer_panels_one_per_group_each_with_both_floors(monkeypatch, tmp_path):
    from medtransfer.analysis import plots
    from medtransfer.layout import PAIR_KIND_TITLES

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.update(figure=figure))
    layers = ("stem", "stage1", "stage2", "stage3", "stage4")
    groups = [(kind, PAIR_KIND_TITLES[kind]) for kind in
              ("source_vs_finetuned", "pretrained_vs_pretrained", "finetuned_vs_finetuned", "pretrained_vs_random")]
    plots.plot_layer_panels(_summary_rows(layers), "cka", layers, tmp_path / "p.png", title="t", groups=groups,
                            floor_kinds=("random_vs_random", "shuffled"))
    visible = [axis for axis in drawn["figure"].axes if axis.axison]
    # pretrained_vs_random has no rows: three panels, titled with the tables' words
    assert [axis.get_title() for axis in visible] == [PAIR_KIND_TITLES[kind] for kind, _ in groups[:3]]
    for axis in visible:
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        assert "noise floor: two random initialisations" in legend and "noise floor: shuffled images" in legend
        assert axis.get_xlabel() == "layer"
        assert len(axis.collections) >= 2  # the two floor bands (plus error-bar collections)
        top = max(segment[:, 1].max() for collection in axis.collections[2:]
                  for segment in getattr(collection, "get_segments", lambda: [np.zeros((1, 2))])())
        assert top <= 1.0 + 1e-12, "an error bar reaches above the measure's range"
    assert [text.get_text() for text in visible[0].get_legend().get_texts()][2:4] == ["medical (full)", "natural (full)"]


def test_two_architectures_are_drawn_as_blocks_floors_never_crossing_between_them(monkeypatch, tmp_path):
    from medtransfer.analysis import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.update(figure=figure))
    resnet, convnext = ("stem", "stage1", "stage2"), ("stages.0", "stages.1")
    rows = [{**row, "pair": "resnet"} for row in _summary_rows(resnet) if row["pair"] == "natural"]
    rows += [{**row, "pair": "convnext"} for row in _summary_rows(convnext) if row["pair"] == "natural"]
    plots.plot_layer_panels(rows, "cka", resnet + convnext, tmp_path / "p.png", title="t",
                            groups=[("source_vs_finetuned", "fine-tuned vs its initialisation")],
                            floor_kinds=("shuffled",), blocks=[resnet, convnext])
    axis = drawn["figure"].axes[0]
    lines = {tuple(line.get_xdata()) for line in axis.get_lines() if len(line.get_xdata())}
    assert (0, 1, 2) in lines and (3, 4) in lines  # each series, and each floor, within its architecture
    assert not any(0 in xs and 3 in xs for xs in lines), "a line crosses from one architecture to the other"
    assert any(list(line.get_xdata()) == [2.5, 2.5] for line in axis.get_lines())  # the separator
    assert [tick.get_text() for tick in axis.get_xticklabels()] == list(resnet + convnext)


def test_similarity_vs_gain_for_every_measure_with_r_per_panel(monkeypatch, tmp_path):
    from medtransfer.analysis import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.update(figure=figure))
    points = [{"source": source, "regime": "full", "layer": layer, "cca": 0.5, "cka": 0.7, "relative_gain": 0.1,
               "pearson_cca_layer": -0.42, "pearson_cka_layer": 0.13,
               "pearson_cca_layer_source": -0.5 if source == "medical" else -0.3, "pearson_cka_layer_source": "nan"}
              for source in ("medical", "natural") for layer in ("stage1", "stage2") for fold in range(3)]
    plots.plot_similarity_vs_gain_by_measure(points, ("stage1", "stage2"), ("cca", "cka"), tmp_path / "g.png", title="t")
    axes = drawn["figure"].axes
    assert len(axes) == 4
    legends = [[text.get_text() for text in axis.get_legend().get_texts()] for axis in axes]
    # one r per source (the authors' statistic), never the pooled r over sources
    assert legends[0] == ["medical: r = -0.50, n = 3", "natural: r = -0.30, n = 3"]
    assert legends[3] == ["medical: r n/a, n = 3", "natural: r n/a, n = 3"]
    assert [axis.get_xlabel() for axis in axes] == ["mean CCA", "mean CCA", "linear CKA", "linear CKA"]


def test_similarity_vs_gain_draws_unreliable_points_hollow_with_the_reason_in_the_legend(monkeypatch, tmp_path):
    from medtransfer.analysis import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.update(figure=figure))
    points = [{"source": "natural", "layer": "stage4", "cca": 0.2 + 0.1 * fold, "cka": 0.7, "relative_gain": 0.1,
               "reliable_cca": "False" if fold == 0 else "True", "reliable_cka": "True"} for fold in range(3)]
    plots.plot_similarity_vs_gain_by_measure(points, ("stage4",), ("cca", "cka"), tmp_path / "g.png", title="t")
    cca_axis, cka_axis = drawn["figure"].axes

    def hollow_offsets(axis):
        return [tuple(offset) for collection in axis.collections
                if len(collection.get_offsets()) and np.allclose(collection.get_facecolors()[:, :3], 1.0)
                for offset in collection.get_offsets()]

    assert hollow_offsets(cca_axis) == [pytest.approx((0.2, 0.1))]  # fold 0 alone, at its place
    filled = [tuple(o) for c in cca_axis.collections if not np.allclose(c.get_facecolors()[:, :3], 1.0)
              for o in c.get_offsets()]
    assert filled == [pytest.approx((0.3, 0.1)), pytest.approx((0.4, 0.1))]
    assert plots.UNRELIABLE_POINT_LEGEND in [text.get_text() for text in cca_axis.get_legend().get_texts()]
    assert hollow_offsets(cka_axis) == []
    assert plots.UNRELIABLE_POINT_LEGEND not in [text.get_text() for text in cka_axis.get_legend().get_texts()]


def test_conv1_panels_show_every_model_with_a_caption(monkeypatch, tmp_path):
    from medtransfer.analysis import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.update(figure=figure))
    rng = np.random.default_rng(0)
    filters = [(name, rng.normal(size=(8, 3, 3, 3)), "RGB") for name in ("natural", "medical", "random init")]
    plots.plot_conv1_panels(filters, tmp_path / "c.png", title="t", caption="each filter min-max normalised")
    figure = drawn["figure"]
    assert [axis.get_title() for axis in figure.axes] == ["natural", "medical", "random init"]
    assert "each filter min-max normalised" in [text.get_text() for text in figure.texts]


def _readable_at_print_size(figure):
    """Every visible text is at least 8 pt; every legend lists each series once, sits outside its panel's data area
    and inside the figure."""
    figure.tight_layout()
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [text for text in figure.findobj(lambda artist: hasattr(artist, "get_fontsize") and
                                             hasattr(artist, "get_text"))
             if text.get_text().strip() and text.get_visible()]
    small = sorted({(text.get_text(), text.get_fontsize()) for text in texts if text.get_fontsize() < 8})
    assert not small, f"texts below 8 pt: {small[:5]}"
    frame = figure.bbox
    for axis in figure.axes:
        legend = axis.get_legend()
        if legend is None:
            continue
        labels = [text.get_text() for text in legend.get_texts()]
        assert len(labels) == len(set(labels)), f"a series listed twice: {labels}"
        box, data = legend.get_window_extent(renderer), axis.get_window_extent(renderer)
        overlap_w = min(box.x1, data.x1) - max(box.x0, data.x0)
        overlap_h = min(box.y1, data.y1) - max(box.y0, data.y0)
        assert overlap_w <= 1 or overlap_h <= 1, f"the legend {labels} covers the panel '{axis.get_title()}'"
        assert box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y0 >= frame.y0 - 1, "legend cut off"


def test_the_report_figures_are_readable_at_print_size(monkeypatch, tmp_path):
    from medtransfer.analysis import plots
    from medtransfer.layout import PAIR_KIND_TITLES

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.append(figure))
    layers = ("stem", "stage1", "stage2", "stage3", "stage4")
    groups = [(kind, PAIR_KIND_TITLES[kind]) for kind in ("source_vs_finetuned", "pretrained_vs_pretrained",
                                                          "finetuned_vs_finetuned")]
    plots.plot_layer_panels(_summary_rows(layers), "cka", layers, tmp_path / "p.png", title="t", groups=groups,
                            floor_kinds=("random_vs_random", "shuffled"))
    points = [{"source": source, "regime": "full", "layer": layer, "cca": 0.2 + 0.1 * fold, "relative_gain": 0.1 * fold,
               "pearson_cca_layer_source": -0.5, "reliable_cca": "false" if fold == 0 else "true"}
              for source in ("medical", "natural", "random") for layer in layers for fold in range(3)]
    plots.plot_similarity_vs_gain_by_measure(points, layers, ("cca",), tmp_path / "g.png", title="t")
    rows = [{"pair": "medical vs natural", "regime": "full", "error_agreement": 0.4, "error_agreement_chance": 0.3}]
    plots.plot_prediction_agreement(rows, tmp_path / "a.png", title="t")
    assert len(drawn) == 3
    for figure in drawn:
        _readable_at_print_size(figure)
