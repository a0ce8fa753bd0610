"""`compare --dataset NAME`: every pair × layer × measure from the saved activations, the prediction similarity of
the fine-tuned models, and similarity against transfer gain; tables, figures and one MLflow run.

Reads only `activations/<NAME>/` (written by `extract`) and the `analysis` params: no network is loaded, and
neither the registry nor the pointers in `results/models` are read. Everything compare needs of them (each model's
test predictions, fold AUCs, versions, the layer names of the architecture) `extract` copied into that folder;
whether the activations still match the pointers is DVC's question (extract depends on the pointers, compare on the
activations). The pairs come from `pairs.plan_pairs` over the manifest's model list (see pairs.py for the kinds).
Each pair's two memory-mapped matrices are streamed in row chunks (streaming.py); the tables are built in
summaries.py, prediction_table.py and source_comparison.py.

Controls on every layer: the `identity` pair (a model against itself: 1), `random_vs_random` (two random
initialisations) and `shuffled` (a `source_vs_finetuned` pair with one side's images permuted, whole images at a
time, so that no image meets itself: the similarity that finite samples give without any correspondence). Each
row also carries its rows-per-channel ratio n / max(c_a, c_b) and the engine's reliability flag (n ≥ 10 × kept
channels, the CCA family's condition; CKA rows carry the same flag for the layer).

Channel sampling (`analysis.channel_sample` > 0): `channel_repeats` draws of that many channels per side (the same
indices on both sides when the channel counts match), seeded by (analysis.seed, fold, layer) so that every pair
of a fold and layer uses the same draws; each draw takes its own block of the layer's images where extract kept
enough (`activations.image_draws`); the measures are averaged over the draws. 0 compares all channels.

Outputs, written together into `results/analysis/<NAME>/` (atomically):

* `similarity.csv`: one row per pair × layer × measure (controls included), columns `SIMILARITY_COLUMNS`;
* `similarity_summary.csv`: mean ± sd over folds per pair group × layer × measure, with the random-vs-random and
  shuffled noise floors of that layer and measure alongside, columns `SUMMARY_COLUMNS`;
* `predictions.csv`: prediction similarity of fine-tuned models of different sources, same fold and regime,
  columns `PREDICTION_COLUMNS` (see predictions.py);
* `stage_matches.csv`: for every pairing of architectures among the pairs, which stage of one was compared with
  which of the other (by name within an architecture, by reduction across architectures: `stage_matching.py`) and
  which stages have no partner, columns `STAGE_MATCH_COLUMNS`;
* `similarity_vs_gain.csv`: per non-random source, regime, fold and layer, mean CCA and linear CKA of the
  fine-tuned model vs its source against its relative test-AUC gain over the random-init fine-tuned model of the
  same fold and regime, (AUC − AUC_random) / AUC_random, with Pearson's r per layer over all points and per
  source (NaN with fewer than 3 points), columns `GAIN_COLUMNS`;
* PNGs: `layers_<measure>.png` (a panel per pair group), `prediction_agreement.png`, `conv1_filters.png`,
  `similarity_vs_gain.png` (a row per measure);

and, beside them, `results/curves/<NAME>/<measure>.csv` for `dvc plots show`. Both folders are replaced as one unit
(`atomic_files.atomic_directories`): a compare killed at any instant leaves both old or both new once the next
compare, summary or report has run.

All of it is logged to one MLflow run (nested under the active run, if any): tags `step=compare`, `dataset`, and
`model.<model_key>=<version>` per model used; artifacts under `analysis/`; summary metrics such as
`cca_stage4_source_vs_finetuned_<source>_<regime>`.
"""


from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.analysis.activations import manifest_layers, read_manifest
from medtransfer.analysis.pairs import StudyModel, plan_pairs
from medtransfer.analysis.prediction_table import PREDICTION_COLUMNS, load_predictions, prediction_rows
from medtransfer.analysis.similarity import ALL_MEASURES
from medtransfer.analysis.source_comparison import (
    AUC_INTERVAL_COLUMNS,
    PAIRED_COLUMNS,
    auc_interval_rows,
    correction_term,
    paired_rows,
)
from medtransfer.analysis.stage_matching import (
    STAGE_MATCH_COLUMNS,
    cross_architecture_matches,
    model_stages,
    stage_match_rows,
    stage_sizes,
)
from medtransfer.analysis.streaming import pair_rows
from medtransfer.analysis.summaries import (
    CURVE_COLUMNS,
    GAIN_COLUMNS,
    GAIN_MEASURES,
    SIMILARITY_COLUMNS,
    SUMMARY_COLUMNS,
    layer_curve_rows,
    metric_name,
    similarity_vs_gain,
    summarise,
    summary_metrics,
)
from medtransfer.atomic_files import atomic_directories
from medtransfer.config import Config
from medtransfer.errors import ConfigError
from medtransfer.layout import (
    ACTIVATIONS_FOLDER,
    ANALYSIS_FOLDER,
    AUC_INTERVAL_FILE,
    CONTROL_KINDS,
    CONV1_FIGURE_FILE,
    CURVES_FOLDER,
    FIGURE_PAIR_KINDS,
    GAIN_FIGURE_FILE,
    GAIN_FILE,
    LAYER_FIGURE_FILE,
    PAIR_KIND_TITLES,
    PAIRED_FILE,
    PREDICTION_FIGURE_FILE,
    PREDICTIONS_FILE,
    RANDOM_VS_RANDOM,
    SEED_TO_SEED,
    SHUFFLED,
    Tag,
    SIMILARITY_FILE,
    SIMILARITY_SUMMARY_FILE,
    STAGE_MATCH_FILE,
)
from medtransfer.models.preprocessing import IMAGENET, PREPROCESSING
from medtransfer.progress import item_line, progress_line
from medtransfer.tables import write_table

__all__ = ["curves_folder", "format_summary", "results_folder", "run_compare"]


def results_folder(config: Config, dataset: str) -> Path:
    """`results/analysis/<dataset>/` under the repository root."""
    return config.resolve(ANALYSIS_FOLDER) / dataset


def curves_folder(config: Config, dataset: str) -> Path:
    """`results/curves/<dataset>/` under the repository root."""
    return config.resolve(CURVES_FOLDER) / dataset


def run_compare(config: Config, dataset: str) -> Path:
    """Compute every table and figure of `dataset`'s analysis from its activations; returns the results folder.

    Raises ConfigError (unknown dataset or measure), DataError (no or damaged activations), each one line.
    """
    began = time.time()  # wall clock: the MLflow run starts here
    config.dataset(dataset)
    measures = _measures(config)
    started = time.perf_counter()
    folder = config.resolve(ACTIVATIONS_FOLDER) / dataset
    manifest = read_manifest(folder, dataset)
    layers = manifest_layers(manifest, folder)
    models = [StudyModel.from_dict(record) for record in manifest["models"].values()]
    by_key = {m.key: m for m in models}
    pairs = plan_pairs(models, manifest["random_baselines"])
    similarity_rows = []
    for index, pair in enumerate(pairs, start=1):
        progress_line(item_line(f"compare {dataset}", index, len(pairs),
                                f"{pair.kind}: {pair.label} fold {pair.fold}{' (shuffled)' if pair.shuffled else ''}"))
        similarity_rows.extend(pair_rows(folder, manifest, pair, measures, config.analysis, layers))
    summary_rows = summarise(similarity_rows, correction_term(manifest["folds"]))
    predictions = prediction_rows(folder, manifest, models)
    gain_rows = similarity_vs_gain(similarity_rows, by_key, layers,
                                   predictions_loader=lambda m: load_predictions(folder, manifest, m),
                                   model_layers={key: list(model_stages(manifest, key)) for key in manifest["models"]})
    auc_rows = auc_interval_rows(models, lambda m: load_predictions(folder, manifest, m),
                                 config.analysis.bootstrap_resamples, config.analysis.seed)
    paired = paired_rows(auc_rows, correction_term(manifest["folds"]))
    stage_matches = _stage_matches(manifest, pairs)
    target = results_folder(config, dataset)
    # The tables and the plot curves change together: a kill never leaves new tables beside stale curves.
    with atomic_directories(target, curves_folder(config, dataset)) as (staging, curves_staging):
        write_table(staging / SIMILARITY_FILE, SIMILARITY_COLUMNS, similarity_rows)
        write_table(staging / SIMILARITY_SUMMARY_FILE, SUMMARY_COLUMNS, summary_rows)
        write_table(staging / PREDICTIONS_FILE, PREDICTION_COLUMNS, predictions)
        write_table(staging / GAIN_FILE, GAIN_COLUMNS, gain_rows)
        write_table(staging / AUC_INTERVAL_FILE, AUC_INTERVAL_COLUMNS, auc_rows)
        write_table(staging / PAIRED_FILE, PAIRED_COLUMNS, paired)
        write_table(staging / STAGE_MATCH_FILE, STAGE_MATCH_COLUMNS, stage_matches)
        _write_figures(staging, folder, manifest, dataset, measures, layers, summary_rows, predictions, gain_rows)
        for measure in measures:
            write_table(curves_staging / f"{measure}.csv", CURVE_COLUMNS, layer_curve_rows(summary_rows, measure,
                                                                                           layers))
    _log_compare_run(config, dataset, manifest, target, measures, summary_rows, predictions, paired, began)
    print(format_summary(dataset, summary_rows, measures, layers, len(pairs), time.perf_counter() - started, target))
    for line in format_unpaired(stage_matches):
        print(line)
    return target


def _stage_matches(manifest: dict[str, Any], pairs: Sequence) -> list[dict]:
    """`stage_matches.csv`: the stage pairing of every pairing of architectures the pairs make (stage sizes from
    the first fold; every fold holds the same images' sizes)."""
    sizes = stage_sizes(next(iter(manifest["folds"].values())))
    return stage_match_rows(manifest, [(pair.model_a, pair.model_b) for pair in pairs], sizes)


def format_unpaired(stage_matches: Sequence[dict]) -> list[str]:
    """One line per pairing of two architectures: which stages were compared and which have no partner."""
    return [f"  stages {arch_a} vs {arch_b}: compared {', '.join(compared) or 'none'}; without partner: "
            f"{', '.join(alone) or 'none'} (see {STAGE_MATCH_FILE})"
            for arch_a, arch_b, compared, alone in cross_architecture_matches(stage_matches)]


def _measures(config: Config) -> list[str]:
    """The requested measures, after checking the comparison settings (ConfigError naming the key)."""
    analysis = config.analysis
    where = f"{config.source_file}: analysis"
    if analysis.channel_sample < 0:
        raise ConfigError(f"channel_sample must be 0 (all channels) or more, got {analysis.channel_sample}",
                          where=f"{where}.channel_sample", fix="the original study compared 64 channels, 5 times")
    if analysis.channel_repeats < 1:
        raise ConfigError(f"channel_repeats must be at least 1, got {analysis.channel_repeats}",
                          where=f"{where}.channel_repeats")
    if analysis.bootstrap_resamples < 1:
        raise ConfigError(f"bootstrap_resamples must be at least 1, got {analysis.bootstrap_resamples}",
                          where=f"{where}.bootstrap_resamples", fix="1000 is usual for a 95 % interval")
    measures = list(dict.fromkeys(analysis.measures))
    unknown = [m for m in measures if m not in ALL_MEASURES]
    if unknown or not measures:
        raise ConfigError(
            f"unknown similarity measure '{unknown[0]}'" if unknown else "no similarity measure given",
            where=f"{config.source_file}: analysis.measures",
            fix=f"use a list drawn from: {', '.join(ALL_MEASURES)}",
        )
    return measures

# --------------------------------------------------------------------------------------------------------------
# Figures, tracking, the printed summary
# --------------------------------------------------------------------------------------------------------------


def _write_figures(staging: Path, folder: Path, manifest: dict[str, Any], dataset: str, measures: list[str],
                   layers: Sequence[str], summary: list[dict], predictions: list[dict], gain: list[dict]) -> None:
    from medtransfer.analysis import plots

    groups = [(kind, PAIR_KIND_TITLES[kind]) for kind in FIGURE_PAIR_KINDS]
    # each architecture's stages (the extracted models' distinct stage lists), for the figures' blocks
    blocks = list(dict.fromkeys(tuple(model_stages(manifest, key)) for key, record in manifest["models"].items()
                                if record.get("channels")))
    for measure in measures:
        plots.plot_layer_panels(summary, measure, layers, staging / LAYER_FIGURE_FILE.format(measure=measure),
                                title=f"{dataset}: {plots.MEASURE_NAMES.get(measure, measure)} per layer",
                                groups=groups, floor_kinds=(RANDOM_VS_RANDOM, SHUFFLED), blocks=blocks)
    plots.plot_prediction_agreement(predictions, staging / PREDICTION_FIGURE_FILE,
                                    title=f"{dataset}: error agreement of fine-tuned models")
    filters = []
    records = manifest.get("conv1", {})
    # the pretrained sources first, then the random initialisations, each group by name
    for source in sorted(records, key=lambda name: (bool(manifest["models"].get(records[name]["model_key"], {})
                                                         .get("random_init")), name)):
        record = records[source]
        model = manifest["models"].get(record["model_key"], {})
        weights = np.load(folder / record["file"], allow_pickle=False)
        # Manifests written before the channel order was recorded: the model's named preprocessing says it.
        order = record.get("channel_order") or PREPROCESSING.get(model.get("preprocessing"), IMAGENET).channel_order
        filters.append((f"{source} (random init)" if model.get("random_init") else source, weights, order))
    if filters:
        module = ", ".join(dict.fromkeys(record["module"] for record in records.values()))  # one per architecture
        plots.plot_conv1_panels(filters, staging / CONV1_FIGURE_FILE, title=f"{dataset}: first-layer filters ({module})",
                                caption="each filter min-max normalised on its own and drawn in RGB order, whatever "
                                        "channel order the network reads (Keras-converted sources read BGR)")
    gain_measures = [measure for measure in GAIN_MEASURES if measure in measures]
    plots.plot_similarity_vs_gain_by_measure(
        gain, layers, gain_measures or list(GAIN_MEASURES[:1]), staging / GAIN_FIGURE_FILE,
        title=f"{dataset}: similarity of each fine-tuned model to its source vs its relative AUC gain over random init")


def _log_compare_run(config: Config, dataset: str, manifest: dict[str, Any], target: Path, measures: list[str],
                     summary: list[dict], predictions: list[dict], paired: list[dict], started: float) -> None:
    import mlflow

    from medtransfer.tracking import DATA_FINGERPRINT_TAG, step_run

    tags = {Tag.DATASET: dataset, DATA_FINGERPRINT_TAG: manifest.get("data_fingerprint", "")}
    tags.update({f"model.{key}": str(record["version"]) for key, record in manifest["models"].items()
                 if record.get("channels")})
    with step_run(config, step="compare", run_name=f"compare {dataset}", tags=tags, started=started):
        analysis = config.analysis
        mlflow.log_params({
            "measures": ",".join(measures), "gram_precision": analysis.gram_precision,
            "channel_sample": analysis.channel_sample,
            "channel_repeats": analysis.channel_repeats, "positions_per_layer": manifest["sampling"]["positions_per_layer"],
            "images": manifest["sampling"]["images"], "seed": manifest["sampling"]["seed"],
            "models": sum(1 for record in manifest["models"].values() if record.get("channels")),
            "folds": len(manifest["folds"]),
        })
        metrics = summary_metrics(summary, predictions)
        for row in paired:
            label = metric_name("auc_difference", f"{row['source_a']} vs {row['source_b']}", row["regime"])
            metrics.update({label: row["mean_difference"], f"{label}_low": row["low"], f"{label}_high": row["high"],
                            f"{label}_p": row["p"]})
        metrics = {name: value for name, value in metrics.items() if math.isfinite(value)}
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(target), artifact_path="analysis")


def format_summary(dataset: str, summary: Sequence[dict], measures: Sequence[str], layers: Sequence[str], pairs: int,
                   seconds: float, target: Path) -> str:
    """A short table: the first measure's mean per layer for each pair group, controls last."""
    measure = "cca" if "cca" in measures else measures[0]
    rows = [r for r in summary if r["measure"] == measure and r["pair_kind"] not in (SEED_TO_SEED,)]
    groups: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        groups.setdefault((row["pair_kind"], row["pair"], row["regime"]), {})[row["layer"]] = row["mean"]
    order = sorted(groups, key=lambda key: (key[0] in CONTROL_KINDS, key))
    names = [f"{kind}: {pair}" + (f" ({regime})" if regime else "") for kind, pair, regime in order]
    width = max([len("pair"), *map(len, names)])
    lines = [f"compare {dataset}: {pairs} pairs x {len(layers)} layers x {len(measures)} measures; {seconds:.0f} s",
             f"  {measure} (mean over folds)",
             f"  {'pair':<{width}}  " + "  ".join(f"{layer:>6}" for layer in layers)]
    for name, key in zip(names, order):
        values = groups[key]
        lines.append(f"  {name:<{width}}  " + "  ".join(
            f"{values.get(layer, math.nan):6.3f}" if math.isfinite(values.get(layer, math.nan)) else f"{'n/a':>6}"
            for layer in layers))
    lines.append(f"  -> {target}")
    return "\n".join(lines)
