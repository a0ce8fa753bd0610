"""Test-set artifacts of a fitted model: per-image predictions (CSV), confusion matrix (JSON), ROC curve (PNG)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from medtransfer.atomic_files import atomic_write_bytes, atomic_write_text
from medtransfer.train.metrics import confusion_matrix, roc_curve



def write_predictions(path: Path, indices: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> None:
    """One row per test image: its index in the prepared dataset, true label, and each class's probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "label", *[f"p_{name}" for name in classes]])
    for index, label, row in zip(indices.tolist(), labels.tolist(), probabilities):
        writer.writerow([index, label, *[f"{value:.8g}" for value in row]])
    atomic_write_text(path, buffer.getvalue())


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices (N,), labels (N,), probabilities (N, K)) from a predictions CSV; a file that is not one (unreadable,
    truncated, not numbers, probabilities outside [0, 1]) is a DataError naming it."""
    from medtransfer.errors import DataError

    def refuse(what: str) -> DataError:
        return DataError(what, where=str(path), fix="rerun the search that fitted this model (or 'medtransfer extract')")

    try:
        with Path(path).open(newline="", encoding="utf-8") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise refuse(f"cannot read the test predictions ({error.__class__.__name__}: {error})") from error
    if len(rows) < 2 or len(rows[0]) < 4 or rows[0][:2] != ["index", "label"]:
        raise refuse("not a predictions table: expected a header 'index,label,p_<class>,...' and at least one row")
    try:
        body = np.asarray(rows[1:], dtype=np.float64)
    except ValueError as error:
        raise refuse(f"the predictions table has a short row or a value that is not a number ({error})") from error
    probabilities = body[:, 2:]
    if body.shape[1] != len(rows[0]) or not np.all((probabilities >= 0) & (probabilities <= 1)):
        raise refuse("the predictions table has probabilities outside [0, 1] or rows of the wrong width")
    return body[:, 0].astype(np.int64), body[:, 1].astype(np.int64), probabilities


def write_confusion(path: Path, labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> None:
    matrix = confusion_matrix(labels, probabilities.argmax(axis=1), len(classes))
    atomic_write_text(path, json.dumps({"classes": classes, "rows_true_columns_predicted": matrix.tolist()}, indent=2) + "\n")


def write_roc_plot(path: Path, labels: np.ndarray, probabilities: np.ndarray, classes: list[str], title: str) -> None:
    """Binary: the ROC of P(class 1). Multi-class: one one-vs-rest curve per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medtransfer.train.metrics import binary_auc

    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    columns = [1] if len(classes) == 2 else range(len(classes))
    for column in columns:
        positive = labels == column
        fpr, tpr = roc_curve(positive, probabilities[:, column])
        auc = binary_auc(positive, probabilities[:, column])
        axis.plot(fpr, tpr, label=f"{classes[column]} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    axis.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
