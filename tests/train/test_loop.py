"""The training loop on a small learnable fixture: it learns, shuffled labels do not, freezing freezes, the best
epoch is restored, and a seed reproduces a run exactly on a CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medtransfer.config import TrainConfig
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.preprocessing import IMAGENET
from medtransfer.train.augment import AugmentationSettings
from medtransfer.train.loop import Phase, Split, Trainer

SIZE = 16


def _fixture(count, seed):
    """Grey 16 px images: class 1 has a bright blob in the top-left quadrant, class 0 in the bottom-right."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = rng.normal(90, 25, size=(count, SIZE, SIZE, 1))
    for index, label in enumerate(labels):
        top, left = (rng.integers(1, 5), rng.integers(1, 5)) if label else (rng.integers(9, 13), rng.integers(9, 13))
        images[index, top : top + 3, left : left + 3] += 120
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64))


@pytest.fixture(scope="module")
def data():
    return {"train": _fixture(160, 0), "val": _fixture(48, 1), "test": _fixture(160, 2)}


SETTINGS = TrainConfig(learning_rate=1e-3, batch_size=32, max_epochs=6, patience=10, head_learning_rate=1e-2,
                       head_patience=10, head_max_epochs=3, augment=False, seed=0)


def _model(seed=0):
    model = Classifier("resnet18", num_classes=2)
    keras_like_init_(model, torch.Generator().manual_seed(seed))
    return model


def _trainer(model, settings=SETTINGS, **kwargs):
    torch.manual_seed(settings.seed)
    return Trainer(model, IMAGENET, settings, None, device=torch.device("cpu"), progress=False, **kwargs)


def test_learns_the_fixture_while_labels_independent_of_the_images_stay_at_chance(data, control_labels):
    trainer = _trainer(_model())
    trainer.fit("full", data["train"], data["val"])
    accuracy = trainer.evaluate(data["test"]).metrics["accuracy"]

    train, val, test = data["train"], data["val"], data["test"]
    control = _trainer(_model())  # early stopping sees control labels too: the true ones would leak the rule
    control.fit("full", Split(train.images, control_labels(train.labels, 5)),
                Split(val.images, control_labels(val.labels, 6)))
    # Scored against control labels of the test images, drawn independently of the images (balanced within each
    # class): whatever the control network learned, its predictions are a function of the images, so its accuracy
    # is at most Binomial(160, 0.5) / 160 around 0.5, sd 0.040, on any machine; a label leaking into training or
    # evaluation would lift it. 0.5 ± 0.2 is five sd (two-sided p < 1e-6). Against the *true* labels the spread is
    # not binomial (a network can split the test images by blob position from its initialisation alone).
    control_accuracy = control.evaluate(Split(test.images, control_labels(test.labels, 7))).metrics["accuracy"]
    # The real rule is learnable: above chance by the same five sd, a bound any training that learns at all clears.
    assert accuracy >= 0.5 + 0.2, accuracy
    assert abs(control_accuracy - 0.5) <= 0.2, control_accuracy


def _backbone_state(model):
    return {key: value.clone() for key, value in model.backbone.state_dict().items()}


def test_freeze_phase_one_keeps_the_backbone_bit_identical(data):
    model = _model()
    before_backbone, before_head = _backbone_state(model), copy.deepcopy(model.head.state_dict())
    trainer = _trainer(model)
    trainer.run_phase(Phase("head", False, 1e-2, 2, 10, "val_accuracy"), data["train"], data["val"])
    after = model.backbone.state_dict()
    for key, value in before_backbone.items():
        assert torch.equal(value, after[key]), f"backbone changed: {key}"  # running BatchNorm statistics included
    assert any(not torch.equal(value, model.head.state_dict()[key]) for key, value in before_head.items())


def test_linear_regime_never_changes_the_backbone(data):
    model = _model()
    before = _backbone_state(model)
    _trainer(model, TrainConfig(max_epochs=2, patience=5, batch_size=32, augment=False)).fit("linear", data["train"], data["val"])
    assert all(torch.equal(value, model.backbone.state_dict()[key]) for key, value in before.items())


def test_freeze_regime_runs_head_then_everything(data):
    model = _model()
    before = _backbone_state(model)
    phases = _trainer(model).fit("freeze", data["train"], data["val"])
    assert [phase.name for phase in phases] == ["head", "full"]
    assert any(not torch.equal(value, model.backbone.state_dict()[key]) for key, value in before.items())


def test_best_epoch_weights_are_restored(data):
    snapshots, losses = [], []

    def remember(_phase, _epoch, metrics):
        snapshots.append(copy.deepcopy(model.state_dict()))
        losses.append(metrics["val_loss"])

    model = _model()
    settings = TrainConfig(learning_rate=3e-3, batch_size=32, max_epochs=5, patience=10, augment=True, seed=1)
    trainer = Trainer(model, IMAGENET, settings, AugmentationSettings(), device=torch.device("cpu"), on_epoch_end=remember, progress=False)
    (result,) = trainer.fit("full", data["train"], data["val"])
    best = int(np.argmin(losses))
    assert result.best_epoch == best + 1 and len(losses) == 5
    for key, value in snapshots[best].items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert trainer.evaluate(data["val"]).metrics["loss"] == pytest.approx(losses[best], rel=1e-6)


def test_early_stopping_stops_after_patience(data):
    """A validation loss forced flat (learning rate 0 on a frozen backbone: every epoch the same network) never
    improves on epoch 1, so training stops after `patience` more epochs, whatever the machine."""
    trainer = _trainer(_model())
    result = trainer.run_phase(Phase("flat", False, 0.0, 20, 2, "val_loss"), data["train"], data["val"])
    assert len({epoch["val_loss"] for epoch in result.history}) == 1, result.history
    assert (result.best_epoch, result.epochs_run) == (1, 3)


def test_early_stopping_follows_its_rule_on_any_curve(data):
    """On a real curve, whatever shape it takes here: the run ends at max_epochs or `patience` epochs after its best."""
    settings = TrainConfig(learning_rate=1e-4, batch_size=32, max_epochs=8, patience=2, augment=False)
    (result,) = _trainer(_model(), settings).fit("full", data["train"], data["val"])
    losses = [epoch["val_loss"] for epoch in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.epochs_run == len(losses) == min(settings.max_epochs, result.best_epoch + settings.patience)


def test_same_seed_same_metrics_on_cpu(data):
    histories = []
    for _ in range(2):
        settings = TrainConfig(learning_rate=1e-3, batch_size=32, max_epochs=2, patience=5, augment=True, seed=7)
        trainer = Trainer(_model(3), IMAGENET, settings, AugmentationSettings(), device=torch.device("cpu"), progress=False)
        (result,) = trainer.fit("full", data["train"], data["val"])
        histories.append((result.history, trainer.evaluate(data["test"]).probabilities))
    assert histories[0][0] == histories[1][0]
    np.testing.assert_array_equal(histories[0][1], histories[1][1])
