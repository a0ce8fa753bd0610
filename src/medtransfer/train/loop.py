"""The training loop: phases with early stopping and best-epoch restore, freeze regimes, per-epoch metrics.

One loop serves fine-tuning and pretraining. A *phase* trains a chosen set of parameters with one optimiser until
its monitored validation quantity stops improving for `patience` epochs, then restores the best epoch's weights
(unless the phase says otherwise: the `paper` preset's head phase keeps its last epoch, as the authors' did).
The regimes are sequences of phases:

    full    everything trainable; monitor validation loss
    freeze  head only on a frozen backbone (monitor validation accuracy), then everything (validation loss)
    linear  head only throughout (validation loss)

A frozen backbone also runs its BatchNorm layers in inference mode (as a frozen Keras layer does), so its weights
and statistics stay bit-identical. Training batches drop the last incomplete batch: BatchNorm cannot normalise a
batch of one image at 28–32 px. Data stays in memory as uint8; augmentation and preprocessing run per batch.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medtransfer.layout import REGIMES
from medtransfer.config import TrainConfig
from medtransfer.models.backbones import Classifier
from medtransfer.models.preprocessing import Preprocessing
from medtransfer.progress import epoch_line, progress_line
from medtransfer.train.augment import AugmentationSettings, augment_batch
from medtransfer.train.metrics import classification_metrics
from medtransfer.train.presets import DEFAULT_LOOP_OPTIONS, LoopOptions

EVAL_BATCH = 256

EpochCallback = Callable[[str, int, dict[str, float]], None]


@dataclass(frozen=True)
class Split:
    """uint8 images (N, H, W, C) and int labels (N,) of one part of a fold."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Phase:
    name: str
    train_backbone: bool
    learning_rate: float
    max_epochs: int
    patience: int
    monitor: str  # "val_loss" (lower is better) or "val_accuracy" (higher is better)
    restore_best: bool = True  # end on the best epoch's weights (else on the last epoch's)


@dataclass
class PhaseResult:
    name: str
    best_epoch: int
    epochs_run: int
    best_value: float
    history: list[dict[str, float]] = field(default_factory=list)


def regime_phases(regime: str, settings: TrainConfig, options: LoopOptions = DEFAULT_LOOP_OPTIONS) -> list[Phase]:
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; use one of {', '.join(REGIMES)}")
    head = Phase("head", False, settings.head_learning_rate, settings.head_max_epochs, settings.head_patience,
                 "val_accuracy", restore_best=options.head_restores_best)
    full = Phase("full", True, settings.learning_rate, settings.max_epochs, settings.patience, "val_loss")
    linear = Phase("linear", False, settings.head_learning_rate, settings.max_epochs, settings.patience, "val_loss")
    return {"full": [full], "freeze": [head, full], "linear": [linear]}[regime]


class Trainer:
    """Fits a `Classifier` on in-memory uint8 splits. Deterministic for a seed on a CPU."""

    def __init__(
        self,
        model: Classifier,
        preprocessing: Preprocessing,
        settings: TrainConfig,
        augmentation: AugmentationSettings | None,
        *,
        device: torch.device | None = None,
        on_epoch_end: EpochCallback | None = None,
        progress: bool = True,
        label: str = "train",
        options: LoopOptions = DEFAULT_LOOP_OPTIONS,
    ) -> None:
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.preprocessing = preprocessing
        self.settings = settings
        self.augmentation = augmentation if settings.augment else None
        self.on_epoch_end = on_epoch_end
        self.progress = progress
        self.label = label  # names the model in the log's epoch lines
        self.options = options
        # One sigmoid unit inside the 2-way head (see LoopOptions.binary_head): logit 0 pinned at zero.
        self.single_unit = options.binary_head == "sigmoid" and model.num_classes == 2
        if self.single_unit:
            pin_first_logit(model)
        self.generator = torch.Generator().manual_seed(settings.seed)  # batch order and augmentation
        torch.manual_seed(settings.seed)  # dropout draws from the global generator
        self.loss = nn.CrossEntropyLoss()
        # On a GPU: bfloat16 autocast (unless options.autocast is off: float32) and channels-last convolutions;
        # on a CPU: plain float32, deterministic.
        self.autocast = uses_autocast(self.device, options)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)

    # -- phases ---------------------------------------------------------------------------------------------------

    def fit(self, regime: str, train: Split, val: Split) -> list[PhaseResult]:
        return [self.run_phase(phase, train, val) for phase in regime_phases(regime, self.settings, self.options)]

    def run_phase(self, phase: Phase, train: Split, val: Split) -> PhaseResult:
        if len(train) < 2:
            raise ValueError("training needs at least 2 images")
        parameters = list(self.model.parameters()) if phase.train_backbone else list(self.model.head.parameters())
        for parameter in self.model.backbone.parameters():
            parameter.requires_grad_(phase.train_backbone)
        optimizer = self._optimizer(parameters, phase.learning_rate)
        higher_is_better = phase.monitor == "val_accuracy"
        best_value = -math.inf if higher_is_better else math.inf
        best_state, best_epoch, stale = None, 0, 0
        result = PhaseResult(phase.name, 0, 0, best_value)
        for epoch in range(1, phase.max_epochs + 1):
            train_metrics = self._train_epoch(optimizer, train, phase, epoch)
            val_metrics = {f"val_{k}": v for k, v in self.evaluate(val).metrics.items()}
            metrics = {**train_metrics, **val_metrics}
            result.history.append(metrics)
            result.epochs_run = epoch
            value = metrics[phase.monitor]
            improved = value > best_value if higher_is_better else value < best_value
            if improved:
                best_value, best_epoch, stale = value, epoch, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                stale += 1
            if self.on_epoch_end is not None:
                self.on_epoch_end(phase.name, epoch, metrics)
            if self.progress:
                progress_line(epoch_line(self.label, phase.name, epoch, phase.max_epochs, metrics))
            if stale >= phase.patience:
                break
        if best_state is not None and phase.restore_best:
            self.model.load_state_dict(best_state)
        result.best_epoch, result.best_value = best_epoch, best_value
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
        return result

    def _optimizer(self, parameters, learning_rate: float) -> torch.optim.Optimizer:
        settings, eps = self.settings, self.options.adam_eps
        if settings.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=learning_rate, eps=eps, weight_decay=settings.weight_decay)
        if settings.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=learning_rate, eps=eps, weight_decay=settings.weight_decay)
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=settings.momentum, weight_decay=settings.weight_decay)

    # -- epochs ---------------------------------------------------------------------------------------------------

    def _train_epoch(self, optimizer: torch.optim.Optimizer, train: Split, phase: Phase, epoch: int) -> dict[str, float]:
        model = self.model
        model.train()
        if not phase.train_backbone:
            model.backbone.eval()  # frozen BatchNorm: inference statistics, no running-stat updates
        batch_size = min(self.settings.batch_size, len(train))
        order = torch.randperm(len(train), generator=self.generator).numpy()
        batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]  # drop_last
        total_loss, seen = 0.0, 0
        labels_seen, probabilities = [], []
        started = time.perf_counter()
        for index, batch in enumerate(batches, start=1):
            images = torch.from_numpy(np.ascontiguousarray(train.images[np.sort(batch)]))
            targets = torch.from_numpy(train.labels[np.sort(batch)]).to(self.device)
            if self.augmentation is not None:
                images = augment_batch(images, self.augmentation, self.generator)
            inputs = self._inputs(images)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = model(inputs)
                loss = self.loss(logits.float(), targets)
            loss.backward()
            if self.single_unit:
                zero_first_logit_grad(model)
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
            labels_seen.append(targets.cpu().numpy())
            probabilities.append(torch.softmax(logits.detach().float(), dim=1).cpu().numpy())
            if self.progress:
                self._progress(phase.name, epoch, index, len(batches), total_loss / seen, started)
        if self.progress and batches and sys.stderr.isatty():
            sys.stderr.write("\n")
        metrics = classification_metrics(np.concatenate(labels_seen), np.concatenate(probabilities))
        return {"loss": total_loss / max(seen, 1), **{key: value for key, value in metrics.items()}}

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocessing.apply(images).to(self.device, non_blocking=True)
        return inputs.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else inputs

    @torch.no_grad()
    def predict(self, split: Split) -> np.ndarray:
        """(N, K) class probabilities in eval mode, no augmentation."""
        self.model.eval()
        outputs = []
        for start in range(0, len(split), EVAL_BATCH):
            images = torch.from_numpy(np.ascontiguousarray(split.images[start : start + EVAL_BATCH]))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(self._inputs(images))
            outputs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        return np.concatenate(outputs).astype(np.float64)

    def evaluate(self, split: Split) -> Evaluation:
        probabilities = self.predict(split)
        clipped = np.clip(probabilities[np.arange(len(split)), split.labels], 1e-12, 1.0)
        metrics = {"loss": float(-np.log(clipped).mean()), **classification_metrics(split.labels, probabilities)}
        return Evaluation(probabilities, metrics)

    @staticmethod
    def _progress(phase: str, epoch: int, index: int, total: int, loss: float, started: float) -> None:
        if not sys.stderr.isatty():
            return
        rate = index / max(time.perf_counter() - started, 1e-9)
        width = 24
        filled = int(width * index / total)
        sys.stderr.write(
            f"\r{phase} epoch {epoch:3d} [{'#' * filled}{'.' * (width - filled)}] {index}/{total} "
            f"loss {loss:.4f} {rate:.1f} batch/s"
        )
        sys.stderr.flush()


def uses_autocast(device: torch.device, options: LoopOptions) -> bool:
    """bfloat16 autocast: on a GPU, unless the options ask for float32."""
    return device.type == "cuda" and options.autocast


def head_linear(model: Classifier) -> nn.Linear:
    """The linear layer of a `Classifier`'s head (dropout + linear)."""
    linears = [module for module in model.head.modules() if isinstance(module, nn.Linear)]
    if len(linears) != 1:
        raise ValueError("the head has no single linear layer")
    return linears[0]


def pin_first_logit(model: Classifier) -> None:
    """Make a 2-way head one sigmoid unit: logit 0's weights and bias zero (logit 1 is the unit's z)."""
    linear = head_linear(model)
    with torch.no_grad():
        linear.weight[0].zero_()
        linear.bias[0].zero_()


def zero_first_logit_grad(model: Classifier) -> None:
    """Keep logit 0 at zero: with a zero gradient, Adam (no weight decay) and SGD leave it where it is."""
    linear = head_linear(model)
    for parameter in (linear.weight, linear.bias):
        if parameter.grad is not None:
            parameter.grad[0].zero_()


@dataclass(frozen=True)
class Evaluation:
    probabilities: np.ndarray  # (N, K)
    metrics: dict[str, float]
