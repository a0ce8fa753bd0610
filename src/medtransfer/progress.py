"""Progress a study's log can show: one line per epoch, model or pair.

Under `medtransfer study` and `make demo` a step's output is piped (DVC, then the study's log), so a bar redrawn
with carriage returns would show nothing until the step ends. Lines go to stdout, flushed, where the study echoes
them as they come; stderr stays for the one-line errors and, on a terminal, the training loop's batch bar.
"""

from __future__ import annotations

import math
import sys

# The metrics an epoch line shows, in this order, when the epoch has them.
EPOCH_METRICS = ("loss", "val_loss", "val_auc", "val_accuracy")


def progress_line(message: str) -> None:
    """Print one progress line now (flushed: the reader is a pipe, which would otherwise buffer it)."""
    print(message, file=sys.stdout, flush=True)


def epoch_line(label: str, phase: str, epoch: int, max_epochs: int, metrics: dict[str, float]) -> str:
    """`finetune target.natural.full fold0 full epoch 3/30: loss 0.5123, val_loss 0.4011, val_auc 0.874`."""
    shown = [f"{key} {metrics[key]:.4g}" for key in EPOCH_METRICS
             if key in metrics and isinstance(metrics[key], float) and math.isfinite(metrics[key])]
    return f"{label} {phase} epoch {epoch}/{max_epochs}" + (f": {', '.join(shown)}" if shown else "")


def item_line(label: str, index: int, total: int, detail: str) -> str:
    """`compare target [3/12] natural vs medical`."""
    return f"{label} [{index}/{total}] {detail}"
