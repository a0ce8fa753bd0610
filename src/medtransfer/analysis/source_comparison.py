"""Tables of `compare` that ask whether two sources differ beyond fold noise (see `paired_statistics`).

- `auc_interval_rows`: each fine-tuned primary fit's test AUC with a seeded bootstrap interval over its test images.
- `paired_rows`: for every regime and pair of sources fine-tuned on the same folds, the per-fold AUC differences and
  the corrected resampled t-test (correction n_test / n_train, averaged over the folds, from the activations
  manifest that `extract` wrote from the prepared splits).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medtransfer.layout import ROLE_FINETUNED
from medtransfer.analysis.paired_statistics import bootstrap_auc_interval, corrected_resampled_t
from medtransfer.analysis.pairs import StudyModel

AUC_INTERVAL_COLUMNS = ["source", "regime", "fold", "model", "images", "test_auc", "test_auc_low", "test_auc_high",
                        "resamples", "level"]
PAIRED_COLUMNS = ["regime", "source_a", "source_b", "folds", "auc_a", "auc_b", "differences", "mean_difference",
                  "low", "high", "t", "p", "correction", "level"]
LEVEL = 0.95

Predictions = tuple[np.ndarray, np.ndarray, np.ndarray]


def primary_fits(models: Sequence[StudyModel]) -> list[StudyModel]:
    """The fine-tuned model of each (source, regime, fold) that the AUC table reports (seed index 0)."""
    return sorted((m for m in models if m.role == ROLE_FINETUNED and (m.seed_index or 0) == 0),
                  key=lambda m: (m.source, m.regime or "", m.fold))


def auc_interval_rows(models: Sequence[StudyModel], load: Callable[[StudyModel], Predictions], resamples: int,
                      seed: int) -> list[dict[str, Any]]:
    rows = []
    for model in primary_fits(models):
        _, labels, probabilities = load(model)
        auc, low, high = bootstrap_auc_interval(labels, probabilities, resamples, seed=[seed, model.fold or 0],
                                                level=LEVEL)
        rows.append({"source": model.source, "regime": model.regime or "", "fold": model.fold, "model": model.key,
                     "images": int(labels.size), "test_auc": auc, "test_auc_low": low, "test_auc_high": high,
                     "resamples": resamples, "level": LEVEL})
    return rows


def correction_term(fold_records: dict[str, dict[str, Any]]) -> float:
    """Nadeau & Bengio's correction n_test / n_train, averaged over the folds of the activations manifest."""
    ratios = [record["test_images"] / record["train_images"] for record in fold_records.values()
              if record.get("train_images")]
    return float(np.mean(ratios)) if ratios else math.nan


def paired_rows(auc_rows: Sequence[dict[str, Any]], correction: float) -> list[dict[str, Any]]:
    """One row per regime and pair of sources (alphabetical, a − b) over the folds both were fitted on."""
    by_key: dict[tuple[str, str], dict[int, float]] = {}
    for row in auc_rows:
        by_key.setdefault((row["regime"], row["source"]), {})[int(row["fold"])] = float(row["test_auc"])
    rows = []
    regimes = sorted({regime for regime, _ in by_key})
    for regime in regimes:
        sources = sorted(source for r, source in by_key if r == regime)
        for source_a, source_b in itertools.combinations(sources, 2):
            first, second = by_key[(regime, source_a)], by_key[(regime, source_b)]
            folds = sorted(set(first) & set(second))
            if not folds:
                continue
            a = np.array([first[fold] for fold in folds])
            b = np.array([second[fold] for fold in folds])
            result = corrected_resampled_t(a, b, correction if math.isfinite(correction) else 0.0, level=LEVEL)
            rows.append({
                "regime": regime, "source_a": source_a, "source_b": source_b, "folds": len(folds),
                "auc_a": float(a.mean()), "auc_b": float(b.mean()),
                "differences": " ".join(f"{value:.6g}" for value in result.differences),
                "mean_difference": result.mean, "low": result.low, "high": result.high, "t": result.t, "p": result.p,
                "correction": result.correction, "level": LEVEL,
            })
    return rows
