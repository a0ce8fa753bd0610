"""Shared fixtures: a params file in a temp folder, MedMNIST-layout npz files, the real BreastMNIST copy."""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import os
import resource
import signal
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test files marked `slow` run first, longest first (`pytest.mark.slow(minutes=...)`, a rough serial estimate),
    so that under `make test`'s parallel workers (`--dist loadfile` hands out files in collection order) the quick
    files fill the gaps instead of one long file starting last. The order inside each file is kept."""
    minutes: dict = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            minutes[item.path] = max(minutes.get(item.path, 0), marker.kwargs.get("minutes", 1))
    items.sort(key=lambda item: -minutes.get(item.path, 0))
    _size_the_timeouts(config, items)


# -- no test waits without a bound ----------------------------------------------------------------------------------
# pytest-timeout fails a test that runs past its timeout (pyproject.toml: a default, method "signal": the test fails
# with the traceback of the line it hung on, other threads' stacks are printed, and the session goes on). A test
# marked `slow(minutes=N)` gets SECONDS_PER_SLOW_MINUTE per minute of its estimate when that exceeds the default:
# a loaded 2-core CI machine takes up to three times the quiet time. A hang that the signal cannot break (a C call
# that never returns to Python, SIGALRM blocked) meets the backstop BACKSTOP_SECONDS later: faulthandler prints every
# thread's stack and ends the process. Under xdist the dead worker's unfinished file goes to a fresh worker, the hung
# test included; `worker_guard` (loaded as a plugin below) fails that test at setup there instead of running it again.
SECONDS_PER_SLOW_MINUTE = 5 * 60
BACKSTOP_SECONDS = 120
_ORIGINAL_STDERR = pytest.StashKey[int]()
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


def pytest_configure(config: pytest.Config) -> None:
    # The terminal's stderr, taken while output capture is suspended: the backstop's stack dump must outlive the
    # process that the capture files die with.
    config.stash[_ORIGINAL_STDERR] = os.dup(2)
    spec = importlib.util.spec_from_file_location("medtransfer_worker_guard", Path(__file__).parent / "worker_guard.py")
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    config.pluginmanager.register(guard, "medtransfer-worker-guard")


def _default_timeout(config: pytest.Config) -> float:
    """pytest-timeout's default per-test timeout: --timeout, else $PYTEST_TIMEOUT, else pyproject.toml; 0 is none."""
    for value in (config.getoption("timeout", None), os.environ.get("PYTEST_TIMEOUT"), config.getini("timeout")):
        if value not in (None, ""):
            return float(value)
    return 0.0


def _size_the_timeouts(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A timeout marker on every `slow(minutes=N)` test without its own: the default or N minutes times
    SECONDS_PER_SLOW_MINUTE, whichever is longer. Nothing when timeouts are off (--timeout=0, for a debugger)."""
    default = _default_timeout(config)
    if default <= 0:
        return
    for item in items:
        slow = item.get_closest_marker("slow")
        if slow is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(max(default, SECONDS_PER_SLOW_MINUTE * slow.kwargs.get("minutes", 1))))


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is None:
        return _default_timeout(item.config)
    return float(marker.kwargs.get("timeout", marker.args[0] if marker.args else 0) or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """The backstop: BACKSTOP_SECONDS after the test's own timeout, dump every thread's stack and exit."""
    seconds = _timeout_of(item)
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds + BACKSTOP_SECONDS, exit=True,
                                          file=item.config.stash[_ORIGINAL_STDERR])
    try:
        yield
    finally:
        if seconds > 0:
            faulthandler.cancel_dump_traceback_later()


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


# -- bounded waits on subprocesses ----------------------------------------------------------------------------------
STACK_DUMP_SECONDS = 15  # for a process group sent SIGABRT to print its stacks and die
DRAIN_SECONDS = 30  # for the pipes of a killed process group to close


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def kill_process_group(process: subprocess.Popen, signum: int = signal.SIGKILL,
                       drain_seconds: float = DRAIN_SECONDS) -> str:
    """Send `signum` to the process group of `process` (started with start_new_session=True) and return all its output
    (stdout, then stderr), bounded: a descendant that left the group can hold a pipe open forever, so after
    `drain_seconds` the pipes are closed and the process itself is waited for as long again."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
        if signum != signal.SIGKILL:
            os.killpg(process.pid, signal.SIGCONT)  # a stopped process takes no other signal until continued
    try:
        out, err = process.communicate(timeout=drain_seconds)
    except subprocess.TimeoutExpired as held:
        out, err = held.output, held.stderr
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL never takes that long; the caller sends it
            process.wait(timeout=drain_seconds)
    return _text(out) + _text(err)


def finish_process(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait at most `timeout` for `process` (started with start_new_session=True, output piped) and return its stdout
    and stderr. Past `timeout` its process group gets SIGABRT, so that its Python processes print their stacks
    (PYTHONFAULTHANDLER), then SIGKILL; everything they printed, stacks last, goes to this test's captured stderr
    (shown with the failure) and TimeoutExpired is raised. Any other way out of the wait (the test's own timeout)
    kills the group as well: no child outlives a failed test."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = kill_process_group(process, signal.SIGABRT, drain_seconds=STACK_DUMP_SECONDS)
        output = kill_process_group(process) or output
        sys.stderr.write(f"{process.args} ran out of its {timeout:g} s; what it printed, its stacks last:\n{output}\n")
        raise subprocess.TimeoutExpired(process.args, timeout, output=output) from None
    except BaseException:
        kill_process_group(process)
        raise
    return _text(out), _text(err)


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
    return SimpleNamespace(finish=finish_process, kill=kill_process_group)


def _run_bounded(command: list[str], cwd: Path | None, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout)`, except that a command out of time
    prints its stacks first (`finish_process`); TimeoutExpired is raised as before."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    out, err = finish_process(process, timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `medtransfer` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{BIN_DIR}{os.pathsep}{full_env.get('PATH', '')}"
    return _run_bounded([sys.executable, "-m", "medtransfer", *args], cwd, full_env, timeout)


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
        return _run_bounded([*prefix, sys.executable, "-m", "medtransfer", *args], cwd, full_env, timeout)

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
