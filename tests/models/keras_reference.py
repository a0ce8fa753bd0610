"""Write real Keras ResNet50 files and reference stage outputs, for the parity tests (run in a subprocess).

Usage: KERAS_BACKEND=torch python keras_reference.py OUT_DIR [SEED]

Builds `keras.applications.ResNet50(weights=None, include_top=False)` with non-trivial BatchNorm statistics,
gamma/beta and conv biases (so a wrong mapping cannot pass by accident), then writes into OUT_DIR:

- resnet50_model.h5          whole model, legacy HDF5 (`model.save("x.h5")`, layers under `model_weights/`)
- resnet50_weights.h5        weights only, legacy HDF5 (layer groups at the root), if this Keras can write it
- resnet50_nested_model.h5   the ResNet50 as one layer of a bigger model with a dense head (nested weight paths)
- tiny.weights.h5            a Keras 3 native weights file (no layer names), to check the converter refuses it
- reference.npz              per image set: the input (N, H, W, 3) and the five stage outputs (channels-last);
                             and `preprocess/input` (uint8 RGB images) with `preprocess/output`, what
                             `keras.applications.resnet50.preprocess_input` makes of them
- info.json                  keras version, backend, which files were written
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

STAGE_OUTPUTS = ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
# (batch, height, width): one square size and one odd, rectangular size (stride-2 'valid' edge handling).
IMAGE_SETS = {"square64": (2, 64, 64), "odd45x37": (1, 45, 37)}


def randomise(model, rng: np.random.Generator) -> None:
    """Give every BatchNorm non-trivial gamma/beta/moving statistics and every conv a non-zero bias."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.get_weights()[0].shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, channels).astype("float32"),  # gamma
                    rng.normal(0.0, 0.2, channels).astype("float32"),  # beta
                    rng.normal(0.0, 0.3, channels).astype("float32"),  # moving mean
                    rng.uniform(0.5, 2.0, channels).astype("float32"),  # moving variance
                ]
            )
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0.0, 0.1, bias.shape).astype("float32")])


def main(out_dir: Path, seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    randomise(model, rng)
    written = []

    model.save(out_dir / "resnet50_model.h5")
    written.append("resnet50_model.h5")
    # Keras 3 writes the legacy weights-only layout only through its legacy saving module. No fallback: the test
    # extras pin a Keras that has it, and a silently missing file would drop the weights-only check.
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(out_dir / "resnet50_weights.h5", "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    written.append("resnet50_weights.h5")

    inputs = keras.Input((None, None, 3))
    features = keras.layers.GlobalAveragePooling2D()(model(inputs))
    wrapper = keras.Model(inputs, keras.layers.Dense(3, name="head")(features))
    wrapper.save(out_dir / "resnet50_nested_model.h5")
    written.append("resnet50_nested_model.h5")

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.save_weights(out_dir / "tiny.weights.h5")
    written.append("tiny.weights.h5")

    stages = keras.Model(model.input, [model.get_layer(name).output for name in STAGE_OUTPUTS])
    arrays = {}
    for set_name, (batch, height, width) in IMAGE_SETS.items():
        # Roughly the range of caffe-preprocessed images (BGR, mean subtracted, no scaling).
        images = rng.uniform(-125.0, 130.0, (batch, height, width, 3)).astype("float32")
        outputs = stages(images, training=False)
        arrays[f"{set_name}/input"] = images
        for name, output in zip(STAGE_OUTPUTS, outputs):
            arrays[f"{set_name}/{name}"] = keras.ops.convert_to_numpy(output)
    pixels = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    arrays["preprocess/input"] = pixels
    arrays["preprocess/output"] = keras.ops.convert_to_numpy(
        keras.applications.resnet50.preprocess_input(pixels.astype("float32"))
    )
    np.savez(out_dir / "reference.npz", **arrays)
    info = {"keras_version": keras.__version__, "backend": keras.backend.backend(), "files": written}
    (out_dir / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    if os.environ.get("KERAS_BACKEND") != "torch":
        sys.exit("set KERAS_BACKEND=torch")
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
