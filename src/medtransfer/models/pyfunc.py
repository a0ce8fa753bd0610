"""The MLflow pyfunc flavour of a packaged model, as a `loader_module` of this package (no pickled code).

`mlflow.pyfunc.load_model(uri).predict(images)` takes uint8 images (N, H, W[, C]) and returns class
probabilities (N, num_classes) — or, for a source without a head, pooled features (N, num_features) — with the
model's own preprocessing applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medtransfer.models.packaging import read_package

PREDICT_BATCH = 64


class PackagedModelPredictor:
    """What `_load_pyfunc` returns: holds the rebuilt module in eval mode."""

    def __init__(self, folder: Path) -> None:
        self.model, self.spec, self.weights_sha256 = read_package(folder)

    def predict(self, model_input, params=None) -> np.ndarray:  # noqa: ARG002 - MLflow's signature
        if isinstance(model_input, dict):  # MLflow hands named tensor inputs over as {name: array}
            model_input = model_input.get("images", next(iter(model_input.values())))
        images = np.asarray(model_input)
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W[, C]), got dtype {images.dtype}")
        outputs = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], PREDICT_BATCH):
                batch = self.spec.preprocessing.apply(images[start : start + PREDICT_BATCH])
                output = self.model(batch)
                outputs.append(torch.softmax(output, dim=1) if self.spec.num_classes else output)
        return torch.cat(outputs).numpy().astype(np.float32)


def _load_pyfunc(data_path: str) -> PackagedModelPredictor:
    """MLflow's entry point for `loader_module` models: `data_path` is the package folder."""
    return PackagedModelPredictor(Path(data_path))
