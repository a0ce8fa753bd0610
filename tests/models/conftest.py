"""Real Keras reference files, made once per test session by `keras_reference.py` in a subprocess.

Keras runs on its torch backend (no TensorFlow) in its own process, so its backend choice, its import cost and
its global state never reach the other tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REFERENCE_SCRIPT = Path(__file__).with_name("keras_reference.py")


@pytest.fixture(scope="session")
def keras_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with real Keras ResNet50 .h5 files, reference.npz and info.json (see keras_reference.py)."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed (it comes with the test extras): parity with real Keras not checked")
    out_dir = tmp_path_factory.mktemp("keras_reference")
    env = {
        **os.environ,
        "KERAS_BACKEND": "torch",
        "KERAS_HOME": str(out_dir / "keras_home"),  # keras writes a config file there on import
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [sys.executable, str(REFERENCE_SCRIPT), str(out_dir), "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"keras_reference.py failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    info = json.loads((out_dir / "info.json").read_text())
    assert info["backend"] == "torch"
    return out_dir
