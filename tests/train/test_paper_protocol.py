"""The `paper` protocol against the authors' v1 fine-tuning script, setting by setting.

Every assertion inspects what the code builds (options, optimisers, phases, heads, fold assignments); none
depends on how well a model trains. The authors' files are in github.com/DovileDo/revisiting-transfer:
v1 = src/fine-tuning.py at commit f9672ca; "later" = src/fine-tuning.py at 1efcebd and src/make_dataframe.py
at fd71612. README "The `paper` protocol: ours vs the authors'" carries the same table.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from torch import nn

from medtransfer.config import TrainConfig
from medtransfer.data import splits
from medtransfer.models.backbones import HEAD_DROPOUT, Classifier, keras_like_init_
from medtransfer.models.preprocessing import IMAGENET
from medtransfer.train.finetune import prepare_model
from medtransfer.train.loop import Split, Trainer, head_linear, regime_phases, uses_autocast
from medtransfer.train.presets import DEFAULT_LOOP_OPTIONS, PAPER, PAPER_LOOP, head_dropout, loop_options

V1 = "src/fine-tuning.py@f9672ca"
LATER = "src/fine-tuning.py@1efcebd"
SPLIT_SCRIPT = "src/make_dataframe.py@fd71612"

#: setting, ours under `paper`, the authors', the authors' file. Each row is asserted below.
TABLE = [
    ("adam epsilon", PAPER_LOOP.adam_eps, 1e-7, V1 + " (Adam() / Adam(learning_rate=...): Keras default)"),
    ("binary head and loss", PAPER_LOOP.binary_head, "sigmoid", V1 + " (Dense(1, 'sigmoid') + BinaryCrossentropy)"),
    ("freeze head phase restores best epoch", PAPER_LOOP.head_restores_best, False,
     V1 + " (f_es = EarlyStopping('val_acc', patience=2))"),
    ("full phase ends on best epoch", regime_phases("full", PAPER, PAPER_LOOP)[0].restore_best, True,
     V1 + " (ModelCheckpoint(save_best_only=True) is the logged model)"),
    ("bf16 autocast on a GPU", uses_autocast(torch.device("cuda"), PAPER_LOOP), False, V1 + " (no mixed precision)"),
    ("random init head dropout", head_dropout("paper", HEAD_DROPOUT, random_source=True), 0.0,
     LATER + " (ResNet50(weights=None, include_top=True))"),
    ("random init binary head", loop_options("paper", random_source=True).binary_head, "softmax",
     LATER + " (classes=2, classifier_activation='softmax')"),
    ("share of the data trained on (val from the held-out fold)",
     float((splits.stratified_kfold_assignment(np.arange(100) % 2, 5, 0.2, 0, "test")[0] == 0).mean()), 0.8,
     SPLIT_SCRIPT + " (train = 4 folds; held-out fold split into val and test)"),
]


@pytest.mark.parametrize("setting, ours, theirs, source", TABLE, ids=[row[0] for row in TABLE])
def test_table_row_matches_the_authors(setting, ours, theirs, source):
    assert ours == theirs, f"{setting}: ours {ours!r}, the authors' {theirs!r} ({source})"


def test_search_protocol_keeps_todays_behaviour():
    assert loop_options(None) == DEFAULT_LOOP_OPTIONS
    assert (DEFAULT_LOOP_OPTIONS.adam_eps, DEFAULT_LOOP_OPTIONS.head_restores_best, DEFAULT_LOOP_OPTIONS.autocast,
            DEFAULT_LOOP_OPTIONS.binary_head) == (1e-8, True, True, "softmax")
    assert head_dropout(None, HEAD_DROPOUT, random_source=True) == HEAD_DROPOUT
    assert uses_autocast(torch.device("cuda"), DEFAULT_LOOP_OPTIONS)
    assert all(phase.restore_best for phase in regime_phases("freeze", PAPER))


SIZE = 16
SETTINGS = TrainConfig(learning_rate=1e-3, batch_size=16, max_epochs=2, patience=10, head_learning_rate=1e-2,
                       head_patience=10, head_max_epochs=3, augment=False, seed=0)


def _data(count: int, seed: int, classes: int = 2) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, size=(count, SIZE, SIZE, 3), dtype=np.uint8),
                 (np.arange(count) % classes).astype(np.int64))


def _model(num_classes: int, preset: str | None, random_source: bool = False):
    model = Classifier("resnet18", num_classes=None)
    keras_like_init_(model, torch.Generator().manual_seed(0))
    options = prepare_model(model, num_classes, 0, preset, random_source)
    return model, options


def _trainer(model, options, **kwargs) -> Trainer:
    return Trainer(model, IMAGENET, SETTINGS, None, device=torch.device("cpu"), progress=False, options=options,
                   **kwargs)


def test_paper_optimizer_epsilon_is_keras_default():
    model, options = _model(2, "paper")
    trainer = _trainer(model, options)
    optimizer = trainer._optimizer(list(model.head.parameters()), 1e-3)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["eps"] == 1e-7
    default_model, default_options = _model(2, None)
    assert _trainer(default_model, default_options)._optimizer(list(default_model.head.parameters()), 1e-3) \
        .param_groups[0]["eps"] == 1e-8


def test_paper_binary_head_is_one_sigmoid_unit_with_binary_cross_entropy():
    model, options = _model(2, "paper")
    linear = head_linear(model)
    assert linear.out_features == 2  # packaging, extraction and prediction still see (N, 2)
    assert torch.count_nonzero(linear.weight[0]) == 0 and linear.bias[0] == 0
    bound = (6.0 / (linear.in_features + 1)) ** 0.5  # Keras Dense(1) glorot-uniform
    assert 0 < linear.weight[1].abs().max() <= bound
    assert isinstance(model.head[0], nn.Dropout) and model.head[0].p == 0.5  # pretrained sources: Dropout(0.5)
    trainer = _trainer(model, options)
    assert trainer.single_unit
    # The 2-way cross-entropy of logits [0, z] is the binary cross-entropy of sigmoid(z).
    z, targets = torch.randn(8), torch.randint(0, 2, (8,))
    logits = torch.stack([torch.zeros(8), z], dim=1)
    assert torch.allclose(trainer.loss(logits, targets),
                          nn.functional.binary_cross_entropy_with_logits(z, targets.float()), atol=1e-6)
    # After training steps, logit 0 is still pinned at zero; probabilities are (N, 2) = [1 - p, p].
    data = _data(32, 0)
    trainer.run_phase(regime_phases("freeze", SETTINGS, options)[0], data, _data(16, 1))
    assert torch.count_nonzero(linear.weight[0]) == 0 and linear.bias[0] == 0
    probabilities = trainer.predict(data)
    assert probabilities.shape == (32, 2)
    model.eval()
    with torch.no_grad():
        z = model(IMAGENET.apply(torch.from_numpy(data.images)))[:, 1].double()
    np.testing.assert_allclose(probabilities[:, 1], torch.sigmoid(z).numpy(), atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)


def test_paper_multiclass_and_random_heads():
    model, options = _model(3, "paper")  # multi-class: a softmax Dense, as theirs
    assert not _trainer(model, options).single_unit
    assert torch.count_nonzero(head_linear(model).weight[0]) > 0
    model, options = _model(2, "paper", random_source=True)  # their random ResNet50: softmax top, no dropout
    assert options.binary_head == "softmax" and not _trainer(model, options).single_unit
    assert model.dropout == 0.0 and model.head[0].p == 0.0
    model, _ = _model(2, None, random_source=True)  # search protocol: unchanged
    assert model.dropout == HEAD_DROPOUT


def test_paper_freeze_head_phase_keeps_its_last_epoch():
    head, full = regime_phases("freeze", PAPER, PAPER_LOOP)
    assert (head.name, head.restore_best, head.monitor, head.patience) == ("head", False, "val_accuracy", 2)
    assert (full.name, full.restore_best, full.monitor, full.patience) == ("full", True, "val_loss", 3)
    model, options = _model(2, "paper")
    seen = []
    trainer = _trainer(model, options,
                       on_epoch_end=lambda *_: seen.append(copy.deepcopy(head_linear(model).weight.detach())))
    result = trainer.run_phase(regime_phases("freeze", SETTINGS, options)[0], _data(32, 0), _data(16, 1))
    assert len(seen) == result.epochs_run
    assert torch.equal(head_linear(model).weight.detach(), seen[-1])  # whichever epoch was best


def test_paper_trains_in_float32():
    assert not uses_autocast(torch.device("cuda"), PAPER_LOOP)
    assert not uses_autocast(torch.device("cpu"), PAPER_LOOP)


@pytest.mark.parametrize("scheme, val_fraction", [("stratified", 0.2), ("grouped", 0.25)])
def test_val_from_the_held_out_fold_trains_on_80_percent(scheme, val_fraction):
    count, folds = 1000, 5
    if scheme == "stratified":
        assignment = splits.stratified_kfold_assignment(np.arange(count) % 2, folds, val_fraction, 0, "test")
    else:
        assignment = splits.grouped_kfold_assignment(np.arange(count) // 4, folds, val_fraction, 0, "test")
    for fold in range(folds):
        row = assignment[fold]
        assert (row == splits.TRAIN).mean() == pytest.approx(0.8, abs=0.01)
        held_out = (row != splits.TRAIN).sum()
        assert (row == splits.VAL).sum() / held_out == pytest.approx(val_fraction, abs=0.05)
    # every image is tested exactly once over the folds, or validates that fold instead
    assert ((assignment != splits.TRAIN).sum(axis=0) == 1).all()


def test_split_option_reaches_make_split_assignment_and_defaults_to_training():
    labels = np.arange(200) % 2
    dataset = types.SimpleNamespace(labels=labels, groups=None)
    as_config = types.SimpleNamespace(scheme="stratified_kfold", folds=5, val_fraction=0.2, seed=0)
    default = splits.make_split_assignment(dataset, as_config)
    assert (default[0] == splits.TRAIN).mean() == pytest.approx(0.64)
    held_out = splits.make_split_assignment(dataset, types.SimpleNamespace(**vars(as_config), val_from="test"))
    assert (held_out[0] == splits.TRAIN).mean() == pytest.approx(0.8)
    with pytest.raises(Exception, match="val_from"):
        splits.stratified_kfold_assignment(labels, 5, 0.2, 0, "elsewhere")


def test_paper_profile_takes_validation_from_the_held_out_fold():
    from pathlib import Path

    from medtransfer.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "profiles" / "paper.yaml")
    assert all(getattr(dataset.split, "val_from", "train") == "test" for dataset in config.datasets.values())
