"""Shared fixtures: a params file in a temp folder, MedMNIST-layout npz files, the real BreastMNIST copy."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The project's own attributed copy (data/breastmnist/README.md); nothing here reads ../shared.
BREASTMNIST = REPO_ROOT / "data" / "breastmnist" / "breastmnist.npz"
BIN_DIR = Path(sys.executable).parent


# Python processes the tests start print their stacks on SIGABRT (faulthandler), which `finish_process` sends to a
# process group that ran out of time before it kills the group: a hung child says where it hung. The stacks are
# wanted, not core files in the children's folders (the repository, for some): no process of the session dumps core.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
# The suite checks the CPU path: training that is deterministic for a seed and float32 activations compared with a
# CPU recomputation. On a GPU the product trains in bfloat16 autocast with non-deterministic kernels and may
# convolve in TF32, so those checks would fail on a correct product: every process of the session sees no GPU.
# (The GPU path is measured by a prepared script on a GPU machine, not by this suite.)
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _load_test_module(name: str):
    """tests/<name>.py as a module (the suite runs with --import-mode=importlib: test folders are not importable)."""
    spec = importlib.util.spec_from_file_location(f"medtransfer_tests_{name}", Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_WAITS = _load_test_module("process_waits")


def pytest_configure(config: pytest.Config) -> None:
    # Timeouts on every test and the backstop behind them; a test that took its xdist worker down is not run again.
    for name in ("time_bounds", "worker_guard"):
        config.pluginmanager.register(_load_test_module(name), f"medtransfer-{name.replace('_', '-')}")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def breastmnist_path() -> Path:
    """The real BreastMNIST the repository carries (the demo's real target)."""
    assert BREASTMNIST.is_file(), f"the repository's BreastMNIST copy is missing: {BREASTMNIST}"
    return BREASTMNIST


def write_medmnist_npz(
    path: Path,
    sizes: tuple[int, int, int] = (30, 10, 12),
    num_classes: int = 2,
    image_shape: tuple[int, ...] = (8, 8),
    label_shape: str = "column",
    seed: int = 0,
) -> Path:
    """A MedMNIST-layout npz with random uint8 images; labels (N,1) ('column'), (N,) ('flat') or (N,K) ('multi')."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, *image_shape), dtype=np.uint8)
        if label_shape == "multi":
            labels = rng.integers(0, 2, size=(count, 5)).astype(np.uint8)
        else:
            labels = (np.arange(count) % num_classes).astype(np.uint8)
            labels = labels[:, None] if label_shape == "column" else labels
        arrays[f"{split}_labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def medmnist_npz() -> Callable[..., Path]:
    return write_medmnist_npz


def write_blob_npz(path, seed, classes=2, per_split=(48, 16, 24)):
    """16 px grey images whose class sets the quadrant of a bright blob; MedMNIST layout."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), per_split):
        labels = np.arange(count) % classes
        images = rng.normal(90, 20, size=(count, 16, 16))
        for index, label in enumerate(labels):
            top, left = divmod(int(label), 2)
            images[index, top * 8 + 2 : top * 8 + 5, left * 8 + 2 : left * 8 + 5] += 120
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


@pytest.fixture(scope="session")
def blob_npz() -> Callable[..., None]:
    """A learnable 16 px MedMNIST-layout npz: the class sets the quadrant of a bright blob."""
    return write_blob_npz


def labels_independent_of_the_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Binary control labels drawn independently of the images: within each true class exactly half the images get
    each label (an odd class leaves one image to chance), so the control labels carry no information about the
    class. A random permutation of the true labels would keep a share of them, and a network learns that share."""
    rng = np.random.default_rng(seed)
    control = np.empty_like(labels)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        control[members] = (np.arange(members.size) + rng.integers(2)) % 2
    return control


@pytest.fixture(scope="session")
def control_labels() -> Callable[[np.ndarray, int], np.ndarray]:
    return labels_independent_of_the_images


def read_markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The first Markdown table after the line `heading` (a '#' heading, matched exactly), as one dict per row
    keyed by the header cells. Fails when there is no such heading or no table below it."""
    lines = text.splitlines()
    assert heading in lines, f"no heading {heading!r} in the report"
    start = lines.index(heading) + 1
    while start < len(lines) and not lines[start].startswith("|"):
        assert not lines[start].startswith("#"), f"no table below {heading!r}"
        start += 1
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(table) >= 2 and set("".join(table[1])) <= set("-:"), f"no table below {heading!r}"
    return [dict(zip(table[0], row)) for row in table[2:]]


@pytest.fixture(scope="session")
def markdown_table() -> Callable[[str, str], list[dict[str, str]]]:
    return read_markdown_table


def write_fits_pointer(config, prepared, registered, dataset: str, source: str, regime: str, fits: list) -> None:
    """Write the pointer of `fits` (`FoldModel`s registered by a test) of one (dataset, source, regime), as a search
    would: `registered` is the source's `register_source` result, the first fit the champion, the AUCs summarised."""
    from medtransfer.pointers import ModelPointer, write_pointer
    from medtransfer.registry import finetuned_model_name

    aucs = [fit.test_auc for fit in fits]
    write_pointer(config, ModelPointer(
        registered_model=finetuned_model_name(dataset, source, regime), dataset=dataset, source=source,
        regime=regime, source_model=registered.name, source_version=registered.version,
        source_weights_sha256=registered.weights_sha256, data_fingerprint=prepared.fingerprint,
        study=f"{dataset}.{source}", champion_version=fits[0].version, folds=fits,
        test_auc_mean=float(np.mean(aucs)), test_auc_sd=float(np.std(aucs)),
    ))


@pytest.fixture(scope="session")
def fits_pointer() -> Callable[..., None]:
    """`write_fits_pointer`, for module-scoped study fixtures."""
    return write_fits_pointer


def demo_params(datasets: dict, **sections) -> dict:
    params = {
        "project": {"profile": "test", "seed": 0},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test", "optuna_storage": "sqlite:///optuna.db"},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "datasets": datasets,
    }
    params.update(sections)
    return params


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """Write a params.yaml into tmp_path from a datasets mapping (plus optional section overrides)."""

    def write(datasets: dict, folder: Path | None = None, **sections) -> Path:
        target = (folder or tmp_path) / "params.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(demo_params(datasets, **sections), sort_keys=False))
        return target

    return write


@pytest.fixture(scope="session")
def cap_address_space() -> Callable[[int], str]:
    """Python source of one statement that caps the running process's address space (RLIMIT_AS, `ulimit -v`) at what
    it has mapped plus ``extra`` bytes. For a child process, after its imports: a fixed cap set before them can be too
    small for the libraries' own thread stacks (one OpenBLAS thread per core, two OpenBLAS copies) on many cores."""
    def source(extra: int) -> str:
        return ("import resource; from medtransfer.memory_budget import parse_vm_size; "
                f"resource.setrlimit(resource.RLIMIT_AS, (parse_vm_size(open('/proc/self/status').read()) + {extra}, "
                "resource.getrlimit(resource.RLIMIT_AS)[1]))")
    return source


@pytest.fixture(scope="session")
def process_waits() -> SimpleNamespace:
    """The bounded waits, for tests that start processes themselves: `finish` (`finish_process`) and `kill`
    (`kill_process_group`)."""
    return SimpleNamespace(finish=_WAITS.finish_process, kill=_WAITS.kill_process_group)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `medtransfer` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{BIN_DIR}{os.pathsep}{full_env.get('PATH', '')}"
    return _WAITS.run_bounded([sys.executable, "-m", "medtransfer", *args], cwd, full_env, timeout)


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli


_NO_FILE_OVERRIDES = "-dac_override,-dac_read_search"


@pytest.fixture
def cli_without_root_file_access() -> Callable[..., subprocess.CompletedProcess]:
    """`run_cli` in a process that file permissions bind: tests often run as root, which reads and writes past any
    mode bits, so a chmod-000 fault would never show. Drops the capabilities that bypass them (the files stay
    owned by the same user, so tmp_path stays reachable)."""
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        require_or_skip("setpriv (util-linux) is missing; permission faults not checked")

    def run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
        prefix = [setpriv, f"--inh-caps={_NO_FILE_OVERRIDES}", f"--bounding-set={_NO_FILE_OVERRIDES}"]
        return _WAITS.run_bounded([*prefix, sys.executable, "-m", "medtransfer", *args], cwd, full_env, timeout)

    return run


POSTGRES_URL_ENV = "MEDTRANSFER_TEST_POSTGRES_URL"


def require_or_skip(reason: str) -> None:
    """Skip for a missing optional tool on a developer's machine; fail under CI (CI=true), where `.ci/run`
    installs every tool, so that a test that did not run never passes as green."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], None]:
    """`require_or_skip` for tests and fixtures in other folders (conftest modules are not importable by name)."""
    return require_or_skip


KERAS_REFERENCE_SCRIPT = REPO_ROOT / "tests" / "models" / "keras_reference.py"


@pytest.fixture(scope="session")
def keras_references(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Real Keras ResNet50 files for a seed: a folder with the .h5 files, reference.npz and info.json written by
    tests/models/keras_reference.py, made once per seed and session.

    Keras runs on its torch backend (no TensorFlow) in its own process, so its backend choice, its import cost and
    its global state never reach the other tests."""
    import importlib.util
    import json

    if importlib.util.find_spec("keras") is None:
        require_or_skip("keras is not installed; install the test extras (parity with real Keras not checked)")
    made: dict[int, Path] = {}

    def make(seed: int) -> Path:
        if seed in made:
            return made[seed]
        out_dir = tmp_path_factory.mktemp(f"keras_reference_seed{seed}")
        env = {
            **os.environ,
            "KERAS_BACKEND": "torch",
            "KERAS_HOME": str(out_dir / "keras_home"),  # keras writes a config file there on import
            "CUDA_VISIBLE_DEVICES": "",
        }
        result = subprocess.run([sys.executable, str(KERAS_REFERENCE_SCRIPT), str(out_dir), str(seed)],
                                env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.fail(f"keras_reference.py failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        assert json.loads((out_dir / "info.json").read_text())["backend"] == "torch"
        made[seed] = out_dir
        return out_dir

    return make


@pytest.fixture(scope="session")
def keras_reference(keras_references: Callable[[int], Path]) -> Path:
    """The seed-0 folder of `keras_references`."""
    return keras_references(0)


@pytest.fixture(scope="session")
def postgres_database() -> Callable[[str], str]:
    """A factory of fresh, empty PostgreSQL databases on the server $MEDTRANSFER_TEST_POSTGRES_URL names (an admin
    database URL; `.ci/run` starts a throwaway server with `.ci/postgres.sh`). Returns each database's URL; every
    database made is dropped at the end of the session. Skips where no server is given."""
    import uuid

    admin = os.environ.get(POSTGRES_URL_ENV)
    if not admin:
        require_or_skip(f"no PostgreSQL server: set {POSTGRES_URL_ENV} (.ci/run starts one with .ci/postgres.sh)")
    import sqlalchemy
    made: list[str] = []

    def execute(statement: str) -> None:
        try:
            engine = sqlalchemy.create_engine(admin, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
        except ModuleNotFoundError as missing:
            require_or_skip(f"the PostgreSQL driver is missing ({missing}); install the test extras")
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(statement))
        finally:
            engine.dispose()

    def create(purpose: str) -> str:
        name = f"mt_{purpose}_{uuid.uuid4().hex[:8]}"
        execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{admin.rsplit('/', 1)[0]}/{name}"

    yield create
    for name in made:
        execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def exchange_supported(tmp_path) -> bool:
    """Whether tmp_path's file system swaps two folders in one step (RENAME_EXCHANGE: tmpfs, ext4, xfs, btrfs do)."""
    from medtransfer.atomic_files import exchange_paths

    (tmp_path / "probe_a").mkdir()
    (tmp_path / "probe_b").mkdir()
    try:
        return exchange_paths(tmp_path / "probe_a", tmp_path / "probe_b")
    finally:
        (tmp_path / "probe_a").rmdir()
        (tmp_path / "probe_b").rmdir()


@pytest.fixture(autouse=True)
def _no_store_overrides_from_the_caller(monkeypatch):
    """A developer's cluster settings must not redirect the tests' stores; nor may the $MLFLOW_TRACKING_URI that
    MLflow exports in this process whenever a test sets a tracking URI reach the next test's subprocesses."""
    import medtransfer

    for variable in ("MEDTRANSFER_TRACKING_URI", "MEDTRANSFER_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(medtransfer, "MLFLOW_TRACKING_URI_AT_START", None)


@contextlib.contextmanager
def mlflow_server(store_arguments: list[str]) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (one worker, no job execution) with `store_arguments` (backend store, artifact
    options); yields its URL once /health answers, and stops its whole process group at the end."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    process = subprocess.Popen(
        [str(BIN_DIR / "mlflow"), "server", *store_arguments, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the MLflow server did not start")
        time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def start_mlflow_server() -> Callable[[list[str]], contextlib.AbstractContextManager[str]]:
    return mlflow_server
