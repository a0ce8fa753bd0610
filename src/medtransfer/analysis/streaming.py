"""The pair × layer engine of `compare`: two memory-mapped activation matrices streamed in row chunks through
`similarity.SimilarityAccumulator` (float64 statistics, memory O(channels²), not O(rows)), with the controls and
the channel sampling that `compare` describes.

`compare_pair_layer` works on any two (n, p) and (n, q) arrays; `pair_rows` opens one planned pair's matrices
from `activations/<dataset>/` for every layer the manifest names and returns its `similarity.csv` rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.analysis.activations import image_draws, open_activations
from medtransfer.analysis.pairs import Pair
from medtransfer.analysis.similarity import SimilarityAccumulator
from medtransfer.analysis.stage_matching import model_stages, paired_layers, stage_sizes
from medtransfer.config import AnalysisConfig
from medtransfer.errors import DataError

__all__ = ["CHUNK_BYTES", "LayerComparison", "channel_draws", "compare_pair_layer", "image_derangement", "pair_rows"]

#: Bytes of each side's rows read per streamed chunk; module-level so tests can shrink it.
CHUNK_BYTES = 32 << 20


def channel_draws(
    channels_a: int, channels_b: int, sample: int, repeats: int, rng: np.random.Generator
) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """Column selections [(indices_a, indices_b)], None = all channels.

    `sample` = 0, or no side larger than `sample`: one draw of all channels. Otherwise `repeats` draws of
    min(sample, C) sorted channel indices per side, the same indices on both sides when the counts match.
    """
    if sample <= 0 or max(channels_a, channels_b) <= sample:
        return [(None, None)]
    draws = []
    for _ in range(max(1, repeats)):
        a = np.sort(rng.choice(channels_a, size=min(sample, channels_a), replace=False)) if channels_a > sample else None
        if channels_b == channels_a:
            b = a
        else:
            b = np.sort(rng.choice(channels_b, size=min(sample, channels_b), replace=False)) if channels_b > sample else None
        draws.append((a, b))
    return draws


def image_derangement(images: int, rng: np.random.Generator) -> np.ndarray | None:
    """A permutation of `images` with no fixed point (image i meets image π(i) ≠ i); None for a single image."""
    if images < 2:
        return None
    cycle = rng.permutation(images)
    permutation = np.empty(images, dtype=np.int64)
    permutation[cycle] = np.roll(cycle, -1)  # one cycle through all images: nobody stays in place
    return permutation


@dataclass(frozen=True)
class LayerComparison:
    """The measures of one pair on one layer (averaged over channel draws; None = undefined)."""

    values: dict[str, float | None]
    n: int
    images: int
    c_a: int
    c_b: int
    channels_a: int
    channels_b: int
    draws: int
    reliable: bool
    note: str
    #: per measure, the sd (ddof 1) of its values over the channel draws; None with fewer than two defined draws
    draw_sd: dict[str, float | None] = field(default_factory=dict)


def compare_pair_layer(
    x: np.ndarray,
    y: np.ndarray,
    positions: int,
    measures: Sequence[str],
    *,
    channel_sample: int = 0,
    channel_repeats: int = 1,
    rng_channels: np.random.Generator | None = None,
    shuffle_rng: np.random.Generator | None = None,
    images_per_draw: int | None = None,
    gram_precision: str = "float64",
) -> LayerComparison:
    """Stream (n, p) `x` and (n, q) `y` (memory maps are read chunk by chunk) through the similarity engine.

    positions: rows per image (H·W); rows r of x and y belong to the same image and position, unless
    `shuffle_rng` is given: then y's images are permuted (`image_derangement`) and image i of x meets image π(i)
    of y at the same positions.
    images_per_draw: the images one channel draw uses (None: all); each draw then takes its own block of images
    (`activations.image_draws`), a fresh draw of held-out images per repeat as far as the layer holds them.
    gram_precision: how the accumulator forms the cross products (`cross_products`; ``analysis.gram_precision``).
    """
    if x.shape[0] != y.shape[0]:
        raise DataError(f"paired activation matrices have {x.shape[0]} and {y.shape[0]} rows",
                        fix="run 'medtransfer extract' again")
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    images = n // positions
    draws = channel_draws(p, q, channel_sample, channel_repeats, rng_channels or np.random.default_rng(0))
    if len(draws) == 1 and channel_sample > 0 and channel_repeats > 1 and images_per_draw:
        # every channel fits in one draw, but the repeats still each take their own images where the layer has them
        # (repeating a draw on the same images would only repeat the same number)
        draws = draws * min(channel_repeats, max(1, images // max(1, images_per_draw)))
    permutation = None
    if shuffle_rng is not None:
        permutation = image_derangement(images, shuffle_rng)
        if permutation is None:
            return LayerComparison({m: None for m in measures}, n, images, p, q, p, q, 0, False,
                                   "one image only: nothing to shuffle")
    accumulators = [SimilarityAccumulator(p if a is None else len(a), q if b is None else len(b),
                                          gram_precision=gram_precision) for a, b in draws]
    blocks = image_draws(images, images_per_draw or images, len(draws))
    step = max(1, CHUNK_BYTES // (positions * 4 * max(p, q)))  # images per chunk
    offsets = np.arange(positions)
    for first in range(min(b.start for b in blocks), max(b.stop for b in blocks), step):
        last = min(first + step, images)
        x_rows = np.asarray(x[first * positions : last * positions])
        if permutation is None:
            y_rows = np.asarray(y[first * positions : last * positions])
        else:
            y_rows = y[(permutation[first:last, None] * positions + offsets[None, :]).ravel()]
        for accumulator, (a, b), block in zip(accumulators, draws, blocks):
            start, stop = max(first, block.start), min(last, block.stop)
            if start >= stop:
                continue
            rows = slice((start - first) * positions, (stop - first) * positions)
            accumulator.update(x_rows[rows] if a is None else x_rows[rows][:, a],
                               y_rows[rows] if b is None else y_rows[rows][:, b])
    results = [accumulator.finalize(measures) for accumulator in accumulators]
    values: dict[str, float | None] = {}
    draw_sd: dict[str, float | None] = {}
    notes = []
    for measure in measures:
        got = [r.value(measure) for r in results if r.value(measure) is not None]
        values[measure] = float(np.mean(got)) if got else None
        draw_sd[measure] = float(np.std(got, ddof=1)) if len(got) > 1 else None
        if not got:
            reasons = {r.undefined.get(measure, "undefined") for r in results}
            notes.append(f"{measure}: {'; '.join(sorted(reasons))}")
    fresh = len({(block.start, block.stop) for block in blocks})
    if len(draws) > 1 and fresh < len(draws):
        notes.append(f"the {len(draws)} channel draws share images: the layer holds {fresh} draw(s) of "
                     f"{blocks[0].stop - blocks[0].start} images")
    warnings = {r.warning for r in results if r.warning}
    reliable = all(r.reliable for r in results)
    if warnings and not notes:
        notes.extend(sorted(warnings))
    first_draw = draws[0]
    c_a = p if first_draw[0] is None else len(first_draw[0])
    c_b = q if first_draw[1] is None else len(first_draw[1])
    per_draw = blocks[0].stop - blocks[0].start
    return LayerComparison(values, per_draw * positions, per_draw, c_a, c_b, p, q, len(draws), reliable,
                           " | ".join(notes), draw_sd)


# --------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------



def pair_rows(folder: Path, manifest: dict[str, Any], pair: Pair, measures: Sequence[str], analysis: AnalysisConfig,
              layers: Sequence[str]) -> list[dict]:
    """The `similarity.csv` rows of one pair: each paired stage × measure, in model a's forward order.

    Models that name the same stages are compared stage by stage; models of different architectures stage by
    stage of equal reduction (`stage_matching.paired_layers`): `layer` is model a's stage, `layer_b` model b's.
    The channel draws and the shuffle of a layer are seeded by (analysis.seed, fold, the index of model a's stage
    in `layers`, the manifest's), so every pair of a fold and layer uses the same draws."""
    rows = []
    fold_info = manifest["folds"][str(pair.fold)]
    stages_a, stages_b = model_stages(manifest, pair.model_a), model_stages(manifest, pair.model_b)
    for layer, layer_b in paired_layers(stages_a, stages_b, stage_sizes(fold_info)):
        layer_info = fold_info["layers"][layer]
        x = open_activations(folder, pair.fold, pair.model_a, layer)
        y = x if (pair.model_b, layer_b) == (pair.model_a, layer) else open_activations(folder, pair.fold, pair.model_b,
                                                                                         layer_b)
        positions = int(layer_info["height"]) * int(layer_info["width"])
        if x.shape[0] != int(layer_info["rows"]) or y.shape[0] != int(layer_info["rows"]):
            raise DataError(
                f"{layer} of {pair.model_a} / {layer_b} of {pair.model_b} has {x.shape[0]} / {y.shape[0]} rows, the "
                f"manifest says {layer_info['rows']}",
                where=str(folder),
                fix="run 'medtransfer extract' again",
            )
        seed = [analysis.seed, pair.fold, list(layers).index(layer)]
        result = compare_pair_layer(
            x, y, positions, measures,
            channel_sample=analysis.channel_sample, channel_repeats=analysis.channel_repeats,
            rng_channels=np.random.default_rng(seed),
            shuffle_rng=np.random.default_rng([*seed, 1]) if pair.shuffled else None,
            images_per_draw=int(layer_info.get("images_per_draw") or layer_info["images"]),
            gram_precision=analysis.gram_precision,
        )
        del x, y
        for measure in measures:
            value = result.values[measure]
            rows.append({
                "pair_kind": pair.kind, "pair": pair.label, "model_a": pair.model_a, "model_b": pair.model_b,
                "fold": pair.fold, "regime": pair.regime, "layer": layer, "layer_b": layer_b, "measure": measure,
                "value": math.nan if value is None else value, "n": result.n, "images": result.images,
                "c_a": result.c_a, "c_b": result.c_b, "channels_a": result.channels_a, "channels_b": result.channels_b,
                "channel_draws": result.draws,
                "draw_sd": math.nan if result.draw_sd.get(measure) is None else result.draw_sd[measure],
                "rows_per_channel": result.n / max(result.c_a, result.c_b),
                "reliable": result.reliable, "note": result.note,
            })
    return rows
