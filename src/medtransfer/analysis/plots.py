"""The analysis figures, drawn from the tables `compare` writes (plain row dicts), never from a network.

* `plot_layer_panels`: similarity per layer, one panel per pair group, each with both noise floors (two random
  initialisations; shuffled images) as bands; mean ± sd over folds cut at the measure's range; unreliable values
  hollow.
* `plot_prediction_agreement`: error agreement observed vs its chance level, per pair of fine-tuned models.
* `plot_conv1_panels`: the first convolution's filters of every source and random initialisation, side by side, in
  RGB order, each filter min-max normalised.
* `plot_similarity_vs_gain_by_measure`: per measure and layer, similarity to the source against the relative AUC
  gain over random init, coloured by source and regime, Pearson's r of each source and regime in the legend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtransfer.analysis.similarity import RELIABLE_ROWS_PER_CHANNEL
from medtransfer.layout import PAIR_KIND_TITLES, RANDOM_VS_RANDOM, SHUFFLED
from medtransfer.atomic_files import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: The smallest font on a figure: readable when the PNG is printed at its size.
MIN_FONT = 8


def outside_legend(axis, *, below: bool = False) -> None:
    """The axis's legend, one entry per labelled series, outside its data: below the panel (``below``, for grids of
    panels) or to its right."""
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # a label drawn twice (two scatters of one series) is listed once
    if not unique:
        return
    if below:
        axis.legend(unique.values(), unique.keys(), fontsize=MIN_FONT, loc="upper center",
                    bbox_to_anchor=(0.5, -0.2), frameon=False)
    else:
        axis.legend(unique.values(), unique.keys(), fontsize=MIN_FONT, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(figure, path: Path) -> None:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


#: Beside a table value that rests, in some fold, on fewer than RELIABLE_ROWS_PER_CHANNEL rows per channel.
UNRELIABLE_MARK = "†"
#: The legend entry of hollow markers: values some fold computed from too few rows per channel.
UNRELIABLE_LEGEND = f"hollow: unreliable, < {RELIABLE_ROWS_PER_CHANNEL} rows per channel in some fold"
#: The same for one fold's point (the similarity-vs-gain scatter).
UNRELIABLE_POINT_LEGEND = f"hollow: unreliable, < {RELIABLE_ROWS_PER_CHANNEL} rows per channel"


def is_unreliable(row: dict) -> bool:
    """Whether a summary row's value rests, in some fold, on a comparison flagged unreliable (reliable_share < 1)."""
    share = _number(row.get("reliable_share"))
    return math.isfinite(share) and share < 1


def plot_prediction_agreement(rows: Sequence[dict], path: Path, *, title: str) -> None:
    """Bars of error agreement (observed vs chance), mean ± sd over folds, per (pair, regime)."""
    plt = _pyplot()
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        groups.setdefault((row["pair"], row["regime"]), []).append(
            (_number(row["error_agreement"]), _number(row["error_agreement_chance"])))
    figure, axis = plt.subplots(figsize=(max(4.5, 1.4 * len(groups) + 2), 4.2), dpi=110)
    if not groups:
        axis.text(0.5, 0.5, "no pairs of fine-tuned models", ha="center", va="center", transform=axis.transAxes)
    labels = []
    for index, ((pair, regime), values) in enumerate(sorted(groups.items())):
        values = np.asarray(values)
        means = np.nanmean(values, axis=0)
        sds = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros(2)
        axis.bar(index - 0.2, means[0], 0.4, yerr=sds[0], capsize=3, color="tab:blue", label="observed" if index == 0 else None)
        axis.bar(index + 0.2, means[1], 0.4, yerr=sds[1], capsize=3, color="tab:grey", label="chance" if index == 0 else None)
        labels.append(f"{pair}\n({regime})" if regime else pair)
    axis.set_xticks(range(len(labels)), labels, fontsize=MIN_FONT)
    axis.set(ylabel="error agreement", ylim=(0, 1.05), title=title)
    if groups:
        outside_legend(axis)
    _save(figure, path)


def filter_grid(weights: np.ndarray, channel_order: str = "RGB") -> np.ndarray:
    """(out, in, kh, kw) filters → one (rows·(kh+1)−1, cols·(kw+1)−1, 3) image in [0, 1], each filter min-max
    normalised on its own; grey (in ≠ 3) filters show their mean over input channels.

    `channel_order` is the order of the network's input channels (its preprocessing's): a Keras-converted network
    reads BGR, so its input channels are reversed to draw each filter in RGB, red as red."""
    weights = np.asarray(weights, dtype=np.float64)
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be RGB or BGR, got {channel_order!r}")
    if channel_order == "BGR" and weights.shape[1] == 3:
        weights = weights[:, ::-1]
    out, channels, height, width = weights.shape
    tiles = weights.transpose(0, 2, 3, 1) if channels == 3 else np.repeat(weights.mean(axis=1)[..., None], 3, axis=-1)
    low = tiles.reshape(out, -1).min(axis=1)[:, None, None, None]
    high = tiles.reshape(out, -1).max(axis=1)[:, None, None, None]
    tiles = (tiles - low) / np.where(high > low, high - low, 1.0)
    columns = int(math.ceil(math.sqrt(out)))
    rows = int(math.ceil(out / columns))
    grid = np.ones((rows * (height + 1) - 1, columns * (width + 1) - 1, 3))
    for index in range(out):
        r, c = divmod(index, columns)
        grid[r * (height + 1): r * (height + 1) + height, c * (width + 1): c * (width + 1) + width] = tiles[index]
    return grid




# -- Small multiples -----------------------------------------------------------------------------------------------

#: Each measure's range: error bars are clipped to it (a mean ± sd above 1 is not a value the measure can take).
# The Procrustes and shape measures are reported as similarities in [0, 1] (see analysis/shape_metrics.py).
MEASURE_RANGES = {"cca": (0.0, 1.0), "svcca": (0.0, 1.0), "pwcca": (0.0, 1.0), "cka": (0.0, 1.0),
                  "cka_debiased": (-1.0, 1.0), "procrustes_similarity": (0.0, 1.0), "shape_0": (0.0, 1.0),
                  "shape_0.5": (0.0, 1.0), "shape_1": (0.0, 1.0)}
MEASURE_NAMES = {"cca": "mean CCA", "svcca": "SVCCA", "pwcca": "PWCCA", "cka": "linear CKA",
                 "cka_debiased": "debiased linear CKA", "procrustes_similarity": "Procrustes similarity (1 − d²/2)",
                 "shape_0": "shape similarity, α = 0 (1 − 2θ/π)",
                 "shape_0.5": "shape similarity, α = 0.5 (1 − 2θ/π)",
                 "shape_1": "shape similarity, α = 1 (1 − 2θ/π)"}
_FLOOR_STYLE = {RANDOM_VS_RANDOM: ("tab:grey", PAIR_KIND_TITLES[RANDOM_VS_RANDOM]),
                SHUFFLED: ("tab:brown", PAIR_KIND_TITLES[SHUFFLED])}


def clipped_error(means: np.ndarray, sds: np.ndarray, measure: str) -> np.ndarray:
    """The (2, n) lower/upper error-bar lengths of mean ± sd, cut at the measure's range."""
    low, high = MEASURE_RANGES.get(measure, (-math.inf, math.inf))
    sds = np.nan_to_num(np.asarray(sds, dtype=float))
    means = np.asarray(means, dtype=float)
    below = np.clip(np.minimum(sds, means - low), 0.0, None)
    above = np.clip(np.minimum(sds, high - means), 0.0, None)
    return np.nan_to_num(np.vstack([below, above]))


def draw_series(axis, x: np.ndarray, means: np.ndarray, sds: np.ndarray, hollow: np.ndarray, measure: str,
                **style) -> bool:
    """One series of mean ± sd (bars cut at the measure's range), its unreliable values drawn hollow in the
    series' colour; returns whether any value was hollow."""
    line = axis.errorbar(x, means, yerr=clipped_error(means, sds, measure), marker="o",
                         markevery=list(np.flatnonzero(~hollow)), **style)
    if hollow.any():
        axis.plot(x[hollow], means[hollow], linestyle="none", marker="o", markersize=5.5, markerfacecolor="white",
                  markeredgecolor=line.lines[0].get_color(), zorder=3)
    return bool(hollow.any())


def add_unreliable_legend(axis, label: str = UNRELIABLE_LEGEND) -> None:
    """The legend entry that says what a hollow marker means."""
    axis.plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="black", label=label)


def is_unreliable_point(row: dict, measure: str) -> bool:
    """Whether a similarity-vs-gain point's `measure` was computed from too few rows per channel (its
    `reliable_<measure>` cell is false; a table without the column marks nothing)."""
    flag = row.get(f"reliable_{measure}")
    if flag is None or flag == "":
        return False
    return not (flag.strip().lower() in ("true", "1") if isinstance(flag, str) else bool(flag))


def plot_layer_panels(summary: Sequence[dict], measure: str, layers: Sequence[str], path: Path, *, title: str,
                      groups: Sequence[tuple[str, str]], floor_kinds: Sequence[str],
                      blocks: Sequence[Sequence[str]] | None = None) -> None:
    """One panel per pair group (`groups`: (pair kind, its title)), every panel with both noise floors as bands,
    each series mean ± sd over folds (clipped to the measure's range), unreliable values hollow.

    `blocks`: the layers of each architecture of the study, in the order of `layers` (None: one architecture).
    Floors are drawn within a block, never across, and a thin line separates the blocks."""
    plt = _pyplot()
    rows = [row for row in summary if row["measure"] == measure]
    present = [(kind, name) for kind, name in groups if any(row["pair_kind"] == kind for row in rows)]
    columns = min(3, max(1, len(present)))
    panel_rows = max(1, math.ceil(len(present) / columns))
    figure, axes = plt.subplots(panel_rows, columns, figsize=(4.4 * columns, 4.6 * panel_rows + 0.6), dpi=110,
                                sharey=True, squeeze=False)
    x = np.arange(len(layers))
    low, high = MEASURE_RANGES.get(measure, (0.0, 1.0))
    any_hollow = False
    floor_row = {row["layer"]: row for row in rows}  # every summary row of a layer carries that layer's floors
    spans = _layer_spans(layers, blocks)
    for axis, (kind, name) in zip(axes.flat, present):
        panel_hollow = False
        for floor in floor_kinds:
            colour, label = _FLOOR_STYLE.get(floor, ("grey", floor.replace("_", " ")))
            means = np.array([_number(floor_row.get(layer, {}).get(f"{floor}_mean")) for layer in layers])
            sds = np.nan_to_num(np.array([_number(floor_row.get(layer, {}).get(f"{floor}_sd")) for layer in layers]))
            labelled = False
            for block in spans:
                if np.isfinite(means[block]).any():
                    axis.fill_between(x[block], np.maximum(means[block] - sds[block], low),
                                      np.minimum(means[block] + sds[block], high), color=colour, alpha=0.22,
                                      linewidth=0, label=None if labelled else label)
                    axis.plot(x[block], means[block], color=colour, linewidth=0.8, linestyle=":")
                    labelled = True
        for boundary in [block.start - 0.5 for block in spans[1:]]:
            axis.axvline(boundary, color="grey", linewidth=0.6, alpha=0.6)
        series: dict[tuple[str, str], dict[str, dict]] = {}
        for row in rows:
            if row["pair_kind"] == kind:
                series.setdefault((row["pair"], row["regime"]), {})[row["layer"]] = row
        palette = plt.get_cmap("tab10")
        for index, ((pair, regime), by_layer) in enumerate(sorted(series.items())):
            means = np.array([_number(by_layer.get(layer, {}).get("mean")) for layer in layers])
            sds = np.array([_number(by_layer.get(layer, {}).get("sd")) for layer in layers])
            hollow = np.array([bool(by_layer.get(layer)) and is_unreliable(by_layer[layer]) for layer in layers])
            own = np.array([layer in by_layer for layer in layers])  # a pair's own stages (several architectures)
            panel_hollow |= draw_series(axis, x[own], means[own], sds[own], hollow[own], measure,
                                        color=palette(index % 10),
                                        label=pair + (f" ({regime})" if regime else ""), markersize=3.5,
                                        capsize=2, linewidth=1.2)
        if panel_hollow:
            any_hollow = True
            add_unreliable_legend(axis)
        axis.set_title(name, fontsize=9)
        axis.set_xticks(x, list(layers), fontsize=MIN_FONT, rotation=0 if len(layers) <= 6 else 40,
                        ha="center" if len(layers) <= 6 else "right")
        axis.set_xlabel("layer", fontsize=8)
        axis.set_ylim(low - 0.03 * (high - low), high + 0.03 * (high - low))
        outside_legend(axis, below=True)
    for axis in axes[:, 0]:
        axis.set_ylabel(MEASURE_NAMES.get(measure, measure), fontsize=8)
    for axis in list(axes.flat)[len(present):]:
        axis.set_axis_off()
    if not present:
        axes[0, 0].text(0.5, 0.5, "no pairs to draw", ha="center", va="center", transform=axes[0, 0].transAxes)
    caption = "mean ± sd over folds, bars cut at the measure's range; bands: noise floors (mean ± sd)"
    if any_hollow:
        caption += "; hollow: unreliable"
    figure.suptitle(f"{title}\n{caption}", fontsize=9)
    _save(figure, path)


def _layer_spans(layers: Sequence[str], blocks: Sequence[Sequence[str]] | None) -> list[slice]:
    """Contiguous runs of `layers` that belong to one block (one architecture's stages); one run without blocks."""
    if not blocks:
        return [slice(0, len(layers))]
    block_of: dict[str, int] = {}
    for index, block in enumerate(blocks):
        for layer in block:
            block_of.setdefault(layer, index)  # a name two architectures share stays in the first one's block
    spans, start = [], 0
    for index in range(1, len(layers) + 1):
        if index == len(layers) or block_of.get(layers[index]) != block_of.get(layers[start]):
            spans.append(slice(start, index))
            start = index
    return spans


def plot_similarity_vs_gain_by_measure(points: Sequence[dict], layers: Sequence[str], measures: Sequence[str],
                                       path: Path, *, title: str) -> None:
    """Rows = measures, columns = layers: similarity of a fine-tuned model to its source against its relative AUC
    gain over the random-init model, coloured by source and regime; each panel's legend gives Pearson's r of each
    source and regime over its own points (the authors' statistic)."""
    plt = _pyplot()
    measures = [m for m in measures if any(m in row for row in points)] or list(measures)[:1]
    # room below each panel for its legend (one entry per series), outside the data
    figure, axes = plt.subplots(len(measures), len(layers), figsize=(3.2 * len(layers), 3.6 * len(measures) + 0.5),
                                dpi=110, sharey=True, squeeze=False)
    # one series per source and regime, each with its own r (the authors' statistic; never pooled over sources)
    series = sorted({(row["source"], row.get("regime") or "") for row in points})
    several_regimes = len({regime for _, regime in series}) > 1
    palette = plt.get_cmap("tab10")
    for i, measure in enumerate(measures):
        for j, layer in enumerate(layers):
            axis = axes[i, j]
            here = [row for row in points if row["layer"] == layer]
            for k, (source, regime) in enumerate(series):
                mine = [row for row in here if (row["source"], row.get("regime") or "") == (source, regime)]
                if not mine:
                    continue
                hollow = np.array([is_unreliable_point(r, measure) for r in mine], dtype=bool)
                x = np.array([_number(r.get(measure)) for r in mine], dtype=np.float64)
                y = np.array([_number(r["relative_gain"]) for r in mine], dtype=np.float64)
                r_value = _number(mine[0].get(f"pearson_{measure}_layer_source"))
                name = f"{source} ({regime})" if several_regimes else source
                label = f"{name}: r = {r_value:.2f}, n = {len(mine)}" if math.isfinite(r_value) \
                    else f"{name}: r n/a, n = {len(mine)}"
                marker = "o" if regime != "freeze" else "^"
                if (~hollow).any():  # an empty scatter would still add a legend entry: each series once
                    axis.scatter(x[~hollow], y[~hollow], s=14, marker=marker, color=palette(k % 10), label=label)
                if hollow.any():
                    axis.scatter(x[hollow], y[hollow], s=14, marker=marker, facecolors="white",
                                 edgecolors=palette(k % 10), label=None if (~hollow).any() else label)
            if any(is_unreliable_point(r, measure) for r in here):
                add_unreliable_legend(axis, UNRELIABLE_POINT_LEGEND)
            axis.axhline(0.0, color="grey", linewidth=0.6, linestyle=":")
            axis.set_xlim(*MEASURE_RANGES.get(measure, (0.0, 1.0)))
            axis.set_title(layer, fontsize=8)
            axis.set_xlabel(MEASURE_NAMES.get(measure, measure), fontsize=MIN_FONT)
            outside_legend(axis, below=True)
        axes[i, 0].set_ylabel("relative AUC gain\nover random init", fontsize=MIN_FONT)
    if not points:
        axes[0, len(layers) // 2].text(0.5, 0.5, "no random-init baseline", ha="center", va="center",
                                       transform=axes[0, len(layers) // 2].transAxes, fontsize=8)
    figure.suptitle(title, fontsize=9)
    _save(figure, path)


def plot_conv1_panels(filters: Sequence[tuple[str, np.ndarray, str]], path: Path, *, title: str, caption: str) -> None:
    """The first convolution's filters of each model side by side (`filters`: (label, weights, channel order)),
    every grid in RGB order, each filter min-max normalised on its own; `caption` says what the reader sees."""
    plt = _pyplot()
    count = max(1, len(filters))
    figure, axes = plt.subplots(1, count, figsize=(3.4 * count, 3.9), dpi=110, squeeze=False)
    for axis, (label, weights, order) in zip(axes[0], filters):
        axis.imshow(filter_grid(weights, order), interpolation="nearest")
        axis.set_title(label, fontsize=8)
        axis.set_axis_off()
    if not filters:
        axes[0, 0].text(0.5, 0.5, "no conv1 weights", ha="center", va="center", transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
    figure.suptitle(title, fontsize=9)
    figure.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=MIN_FONT, wrap=True)
    figure.subplots_adjust(bottom=0.12)
    _save(figure, path)
