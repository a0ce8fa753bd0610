"""Progress the study's log shows: one line per epoch, model or pair, flushed to stdout (a pipe under DVC)."""

from __future__ import annotations

import numpy as np

from medtransfer.progress import epoch_line, item_line


def test_epoch_and_item_lines_name_the_model_and_its_place():
    line = epoch_line("finetune t natural full fold0", "full", 3, 30,
                      {"loss": 0.51234, "val_loss": 0.4011, "val_auc": 0.8741, "val_accuracy": float("nan"), "x": 1.0})
    assert line == "finetune t natural full fold0 full epoch 3/30: loss 0.5123, val_loss 0.4011, val_auc 0.8741"
    assert epoch_line("m", "head", 1, 2, {}) == "m head epoch 1/2"
    assert item_line("compare t", 2, 9, "natural vs medical") == "compare t [2/9] natural vs medical"


def test_the_trainer_prints_one_line_per_epoch_when_piped(capsys):
    import torch

    from medtransfer.config import TrainConfig
    from medtransfer.models.backbones import Classifier
    from medtransfer.models.preprocessing import IMAGENET
    from medtransfer.train.loop import Split, Trainer

    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), np.array([0, 1] * 4))
    settings = TrainConfig(batch_size=4, max_epochs=2, patience=5, augment=False)
    trainer = Trainer(Classifier("resnet18", num_classes=2), IMAGENET, settings, None, label="finetune probe",
                      device=torch.device("cpu"))
    trainer.fit("full", split, split)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("finetune probe")]
    assert [line.split(":")[0] for line in lines] == ["finetune probe full epoch 1/2", "finetune probe full epoch 2/2"]
