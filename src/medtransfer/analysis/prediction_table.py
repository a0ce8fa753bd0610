"""`predictions.csv` of `compare`: the prediction similarity (see predictions.py) of every two fine-tuned models of
different sources on the same fold and regime, from the test predictions `extract` saved beside the activations
(`predictions/<model_key>.csv`): compare never reads the tracking store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.analysis.pairs import StudyModel, prediction_pairs
from medtransfer.analysis.predictions import prediction_similarity
from medtransfer.errors import DataError, warn

__all__ = ["PREDICTION_COLUMNS", "load_predictions", "prediction_rows"]

PREDICTION_COLUMNS = [
    "pair", "model_a", "model_b", "fold", "regime", "images", "accuracy_a", "accuracy_b", "error_agreement",
    "error_agreement_chance", "error_consistency", "label_agreement", "label_kappa", "probability_correlation",
    "probability_correlation_of", "jensen_shannon", "jensen_shannon_base",
]


def load_predictions(folder: Path, manifest: dict[str, Any], model: StudyModel):
    """(indices, labels, probabilities) of a fine-tuned model's test predictions, from the copy `extract` saved
    beside the activations (compare never reads the tracking store); a missing copy stops the step."""
    from medtransfer.train.reporting import read_predictions

    saved = manifest["models"].get(model.key, {}).get("predictions")
    if not saved or not (folder / saved).is_file():
        raise DataError(f"the activations hold no test predictions of {model.key}", where=str(folder),
                        fix=f"run 'medtransfer extract --dataset {manifest.get('dataset', '<dataset>')}' again")
    return read_predictions(folder / saved)


def _aligned(first, second, keys: tuple[str, str]):
    """Rows of two prediction tables on the same test images, aligned by dataset index."""
    indices_a, labels_a, probabilities_a = first
    indices_b, labels_b, probabilities_b = second
    common, where_a, where_b = np.intersect1d(indices_a, indices_b, assume_unique=False, return_indices=True)
    if not np.array_equal(labels_a[where_a], labels_b[where_b]):
        raise DataError(f"{keys[0]} and {keys[1]} give different true labels for the same test images",
                        fix="the models were evaluated on different data versions; rerun the search")
    if probabilities_a.shape[1] != probabilities_b.shape[1]:
        raise DataError(f"{keys[0]} and {keys[1]} predict different numbers of classes")
    return labels_a[where_a], probabilities_a[where_a], probabilities_b[where_b]


def prediction_rows(folder: Path, manifest: dict[str, Any], models: Sequence[StudyModel]) -> list[dict]:
    by_key = {m.key: m for m in models}
    cache: dict[str, Any] = {}

    def load(key: str):
        if key not in cache:
            cache[key] = load_predictions(folder, manifest, by_key[key])
        return cache[key]

    rows = []
    for pair in prediction_pairs(models):
        first, second = load(pair.model_a), load(pair.model_b)
        labels, probabilities_a, probabilities_b = _aligned(first, second, (pair.model_a, pair.model_b))
        if len(labels) == 0:
            warn(f"{pair.model_a} and {pair.model_b} share no test images; skipped")
            continue
        measures = prediction_similarity(labels, probabilities_a, probabilities_b)
        rows.append({"pair": pair.label, "model_a": pair.model_a, "model_b": pair.model_b, "fold": pair.fold,
                     "regime": pair.regime, **measures.to_dict()})
    return rows

