"""`dvc exp run` as DVC users expect, on a tiny profile: every experiment commit holds its metrics (git tracks
results/metrics/), so `dvc exp show` compares experiments; `dvc metrics show` prints short rows; and DVC's rewrite
of params.yaml leaves the profile recognised. Nothing here depends on how well the tiny models learn."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from medtransfer.study_guard import process_identity

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow(minutes=4)

#: The tiny profile's analysis.bootstrap_resamples: the first experiment sets it to this same value (DVC rewrites
#: params.yaml all the same), the second to FEWER_RESAMPLES (compare, summary and report rerun).
RESAMPLES, FEWER_RESAMPLES = 100, 50
TARGET, SOURCES, REGIME = "target", ("tiny", "random"), "full"
#: `dvc metrics show`: one row per search and per study-level source row, each at most this wide.
ROW_LIMIT = 200
#: The README's lines for a 120-column terminal: which params each experiment changed (the deps' hashes and the
#: metrics' path-long column names dropped), and one experiment against the committed study, a row per change.
EXP_SHOW_README = ["exp", "show", "--md", "--only-changed", "--drop", "Created|src/|data/|activations/|results/"]
EXP_DIFF_README = ["exp", "diff", "HEAD", "fewer-resamples", "--md"]
TERMINAL = 120


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.pop("MEDTRANSFER_PARAMS", None)
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org"})
    return env


def _run(finish, project: Path, *command: str, timeout: float = 120) -> str:
    """Run `command` in `project` (bounded: past `timeout` its stacks are printed and it is killed); its stdout."""
    process = subprocess.Popen(list(command), cwd=project, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = finish(process, timeout)
    assert process.returncode == 0, f"{command} exited {process.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def _tiny_profile() -> dict:
    tiny = {"learning_rate": 3e-3, "batch_size": 16, "max_epochs": 1, "patience": 1, "augment": False, "seed": 0}
    return {
        "project": {"profile": "tiny", "seed": 0, "description": "a tiny study for dvc exp run"},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "tiny-exp",
                   "optuna_storage": "sqlite:///optuna.db"},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "train": tiny,
        "search": {"trials": 1, "space": {"learning_rate": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
                   "startup_trials": 1, "pruner_startup_trials": 1, "pruner_warmup_epochs": 1},
        "study": {"targets": [TARGET], "sources": list(SOURCES), "regimes": [REGIME], "protocol": "search"},
        # `images: null` and the flow-style lists below are what `dvc exp run -S` rewrites (empty, block lists)
        "analysis": {"positions_per_layer": 200, "images": None, "channel_sample": 0, "channel_repeats": 5,
                     "bootstrap_resamples": RESAMPLES, "measures": ["cca", "cka"], "gram_precision": "float64",
                     "batch_size": 32, "seed": 0},
        "sources": {"tiny": {"kind": "pretrained", "arch": "resnet18", "dataset": "pretext", "seed": 5, "train": tiny},
                    "random": {"kind": "random", "arch": "resnet18", "seed": 0},
                    "random_b": {"kind": "random", "arch": "resnet18", "seed": 1}},
        "datasets": {
            TARGET: {"format": "medmnist", "path": f"data/raw/{TARGET}.npz", "classes": ["a", "b"],
                     "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.25}},
            "pretext": {"format": "medmnist", "path": "data/raw/pretext.npz", "classes": ["q0", "q1", "q2", "q3"]},
        },
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root, blob_npz, process_waits) -> Path:
    """A git + DVC copy of the project whose only profile is the tiny one, active and committed."""
    root = tmp_path_factory.mktemp("exp_project")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(repo_root / name, root / name)
    shutil.copytree(repo_root / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    blob_npz(root / f"data/raw/{TARGET}.npz", 0)
    blob_npz(root / "data/raw/pretext.npz", 1, classes=4)
    (root / "profiles").mkdir()
    (root / "profiles/tiny.yaml").write_text(yaml.safe_dump(_tiny_profile(), sort_keys=False, default_flow_style=None))
    finish = process_waits.finish
    _run(finish, root, sys.executable, "-m", "medtransfer", "profile", "use", "tiny")
    _run(finish, root, "git", "init", "-q")
    _run(finish, root, str(BIN / "dvc"), "init", "-q")
    _run(finish, root, "git", "add", "-A")
    _run(finish, root, "git", "commit", "-q", "-m", "the tiny study")
    return root


#: What a search prints once its first trial has trained an epoch: the study is then killed mid-stage (in that
#: trial, or in the final fits after it when the trial ended first, its only epoch done).
MID_STAGE = re.compile(r"search \S+ trial 1/1")
#: How long a killed study's processes may outlive it (the issue's bound for every fault).
GONE_WITHIN_SECONDS = 30


def _descendants(pid: int) -> list[str]:
    """The process identities (`study_guard.process_identity`) of every live descendant of `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        identity = process_identity(child)
        if identity is not None:
            found.append(identity)
        stack.extend(children.get(child, []))
    return found


def _running(identity: str) -> bool:
    """Whether the process `identity` names runs (a zombie, already dead, does not)."""
    pid = int(identity.split(":", 1)[0])
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return process_identity(pid) == identity and stat[stat.rindex(")") + 2:].split()[0] != "Z"
    return False


@pytest.fixture(scope="module")
def killed_study(project, process_waits) -> SimpleNamespace:
    """`medtransfer study` killed by SIGKILL while its first search runs (as `kill -9 <pid>` would), and what was
    still running 0 to GONE_WITHIN_SECONDS later."""
    process = subprocess.Popen([str(BIN / "medtransfer"), "study"], cwd=project, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen = []  # no deadline here: the suite's per-test timeout bounds the wait (and prints the stacks)
    try:
        while not any(MID_STAGE.search(line) for line in seen[-1:]):
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1.0))
                continue
            assert process.poll() is None, f"the study ended (exit {process.returncode}) before its first search " \
                                           f"trained:\n{''.join(seen)[-3000:]}"
        stages = _descendants(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        killed_at = time.monotonic()
        while any(_running(identity) for identity in stages) and time.monotonic() - killed_at < GONE_WITHIN_SECONDS:
            time.sleep(0.5)
        survivors = [identity for identity in stages if _running(identity)]
    finally:
        process_waits.kill(process)  # the whole group, whatever happened above
    return SimpleNamespace(output="".join(seen), stages=stages, survivors=survivors, returncode=process.returncode,
                           runs_after_kill=_run_states(project))


def _run_states(project: Path) -> dict[str, tuple[str, str | None]]:
    """(status, step tag) of every run of the tiny study's experiment, by run id."""
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny-exp"]
    return {run.info.run_id: (run.info.status, run.data.tags.get("step"))
            for run in client.search_runs([experiment.experiment_id], max_results=1000)}


@pytest.fixture(scope="module")
def study(project, killed_study, process_waits) -> SimpleNamespace:
    """The whole tiny study, by `medtransfer study` run again after the kill, committed as the README says (`git add`
    of what git does not ignore)."""
    finish = process_waits.finish
    rerun = _run(finish, project, str(BIN / "medtransfer"), "study", timeout=1200)
    _run(finish, project, "git", "add", "-A")
    _run(finish, project, "git", "commit", "-q", "-m", "the study")
    return SimpleNamespace(root=project, rerun=rerun)


@pytest.fixture(scope="module")
def experiments(study, process_waits) -> SimpleNamespace:
    """Two `dvc exp run -S` experiments from the committed study, with params.yaml and `profile list` after each."""
    finish, dvc, study = process_waits.finish, str(BIN / "dvc"), study.root
    profile_list = [sys.executable, "-m", "medtransfer", "profile", "list"]
    before = (study / "params.yaml").read_text()
    _run(finish, study, dvc, "exp", "run", "-n", "same-resamples", "-S", f"analysis.bootstrap_resamples={RESAMPLES}",
         timeout=600)
    params_after_first, after_first = (study / "params.yaml").read_text(), _run(finish, study, *profile_list)
    _run(finish, study, dvc, "exp", "run", "-n", "fewer-resamples", "-S",
         f"analysis.bootstrap_resamples={FEWER_RESAMPLES}", timeout=900)
    after_second = _run(finish, study, *profile_list)
    return SimpleNamespace(params_before=before, params_after_first=params_after_first, after_first=after_first,
                           after_second=after_second, run=lambda *args: _run(finish, study, *args))


def _metric_files() -> list[str]:
    return sorted([*(f"results/metrics/{TARGET}.{source}.{REGIME}.json" for source in SOURCES),
                   *(f"results/metrics/study/{source}.{REGIME}.json" for source in SOURCES)])


def _leaves(value, prefix=""):
    """(dotted key, value) of every number or other leaf of a nested mapping."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def test_git_tracks_the_metrics_files_and_nothing_else_of_results(study, experiments):
    run = experiments.run
    assert run("git", "ls-files", "results").split() == _metric_files()
    exp_refs = run("git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    named = [ref for ref in exp_refs if ref.rsplit("/", 1)[-1] in ("same-resamples", "fewer-resamples")]
    assert len(named) == 2, exp_refs
    for ref in named:  # each experiment commit holds its own copy
        assert run("git", "ls-tree", "-r", "--name-only", ref, "results").split() == _metric_files(), ref


def test_dvc_exp_show_holds_numbers_for_every_metric_of_both_experiments(experiments):
    shown = json.loads(experiments.run(str(BIN / "dvc"), "exp", "show", "--json"))
    (baseline,) = [entry for entry in shown if entry["rev"] != "workspace"]
    revisions = {"baseline": baseline, **{experiment["name"]: experiment["revs"][0]
                                          for experiment in baseline["experiments"] or []}}
    assert {"same-resamples", "fewer-resamples"} <= set(revisions), sorted(revisions)
    for name, revision in revisions.items():
        assert revision.get("error") is None, (name, revision["error"])
        data = revision["data"]
        resamples = data["params"]["params.yaml"]["data"]["analysis"]["bootstrap_resamples"]
        assert resamples == {"fewer-resamples": FEWER_RESAMPLES}.get(name, RESAMPLES), name
        metrics = data["metrics"]
        assert sorted(metrics) == _metric_files(), (name, sorted(metrics))
        for path, content in metrics.items():
            assert "error" not in content, (name, path, content)
            values = dict(_leaves(content["data"]))
            for key, value in values.items():
                number_type = isinstance(value, (int, float)) and not isinstance(value, bool)
                assert number_type and math.isfinite(value), (name, path, key, value)
            if "/study/" in path:
                assert 0 <= values["test_auc_mean"] <= 1 and values.get("relative_gain", 0) >= -1, (name, path, values)
                assert set(values) <= {"test_auc_mean", "relative_gain"}, (name, path, values)
                assert ("relative_gain" in values) == (not path.endswith(f"/random.{REGIME}.json")), (path, values)
            else:
                assert set(values) == {"test_auc.fold0", "test_auc.fold1", "test_auc_mean", "test_auc_sd"}, values
                assert all(0 <= values[key] <= 1 for key in values if key != "test_auc_sd"), (path, values)
                assert values["test_auc_sd"] >= 0, (path, values)


def test_dvc_metrics_show_prints_a_short_row_per_search_and_per_source(experiments):
    lines = experiments.run(str(BIN / "dvc"), "metrics", "show").splitlines()
    assert sorted(line.split()[0] for line in lines[1:]) == _metric_files(), lines
    assert all(len(line) <= ROW_LIMIT for line in lines), [len(line) for line in lines]


def test_the_readmes_exp_show_and_exp_diff_lines_fit_a_120_column_terminal(experiments):
    table = experiments.run(str(BIN / "dvc"), *EXP_SHOW_README).splitlines()
    assert all(len(line) <= TERMINAL for line in table), "\n".join(table)
    assert "analysis.bootstrap_resamples" in table[0] and {"same-resamples", "fewer-resamples"} <= {
        word.strip("[]") for line in table for word in line.split()}, "\n".join(table)
    diff = experiments.run(str(BIN / "dvc"), *EXP_DIFF_README).splitlines()
    assert all(len(line) <= TERMINAL for line in diff), "\n".join(diff)
    assert any("analysis.bootstrap_resamples" in line and str(FEWER_RESAMPLES) in line for line in diff), diff


def test_the_profile_survives_dvcs_rewrite_of_params_and_an_edit_is_named(experiments):
    # DVC rewrote params.yaml in its own layout without changing a value: still the tiny profile
    assert experiments.params_after_first != experiments.params_before
    assert experiments.params_after_first.startswith("# Active profile: tiny")
    assert "* tiny" in experiments.after_first.splitlines()
    # a value that differs from the profile: no profile, and the edit is named
    assert "* tiny" not in experiments.after_second.splitlines()
    assert "it is tiny with edits to analysis.bootstrap_resamples" in experiments.after_second


# -- kill -9 of the study --------------------------------------------------------------------------------------------


def test_a_killed_study_leaves_no_stage_running(killed_study):
    """The outcome, whichever way each stage learns of the kill: its study gone (`study_guard.watch_study`, tested
    on a silent stage in tests/test_study_guard.py), SIGTERM to `dvc repro` from the kernel, or a broken pipe on
    its next line of output (the study read it)."""
    assert killed_study.returncode == -signal.SIGKILL
    assert killed_study.stages, "the study was killed before it started a stage"
    assert killed_study.survivors == [], (f"still running {GONE_WITHIN_SECONDS} s after the kill",
                                          killed_study.survivors)


def test_the_next_study_closes_the_killed_run_finishes_and_leaves_nothing_open_or_half_written(study, killed_study):
    closed = re.findall(r"study: closed run (\w+) as KILLED: the study that ran it was killed", study.rerun)
    assert len(closed) == 1, study.rerun[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{study.root / 'mlflow.db'}")
    killed = client.get_run(closed[0])
    assert killed.info.status == "KILLED" and killed.data.tags["step"] == "study", killed.info
    assert "was gone" in killed.data.tags["closed_because"]
    now = _run_states(study.root)
    assert [(run_id, step) for run_id, (status, step) in now.items() if status == "RUNNING"] == []
    # Every run the kill left open (the study's at least; a stage's too when the kill caught it before it could end
    # its own) is now closed as stopped, never reported FINISHED, with one exception: the next study went on in it.
    # That is a search's parent run, which the rerun of its search resumes (README: "Rerunning a killed search ...
    # reuses the parent run"), tags with how it had ended and ends with its own outcome. Which runs were open depends
    # on where the kill caught the study, which differs from machine to machine, so the test names none of them.
    left_open = {run_id: step for run_id, (status, step) in killed_study.runs_after_kill.items() if status == "RUNNING"}
    assert closed[0] in left_open, killed_study.runs_after_kill
    search_parents = {run_id for run_id, (_status, step) in killed_study.runs_after_kill.items() if step == "search"}
    assert {run_id: now[run_id] for run_id in left_open.keys() - search_parents
            if now[run_id][0] not in ("KILLED", "FAILED")} == {}
    # A search parent the kill caught is the one its rerun went on in and finished. Before, it had been ended as
    # stopped: by its stage when interrupted, else by the next study as its study's child (as KILLED). One that had
    # already finished (its stage ended before it saw the kill) is left finished, whether DVC runs it again or not.
    for run_id in search_parents:
        run, before = client.get_run(run_id), killed_study.runs_after_kill[run_id][0]
        assert run.info.status == "FINISHED", (run_id, before, run.info.status)
        if before != "FINISHED":
            ended = "KILLED" if before == "RUNNING" else before
            assert run.data.tags.get("resumed_after", "").startswith(f"{ended} at "), (before, run.data.tags)
    searches = [run_id for run_id, (_status, step) in now.items() if step == "search"]
    assert len(searches) == len(SOURCES), now  # one parent per search: none was started afresh beside a killed one
    leftovers = [str(path.relative_to(study.root)) for folder in ("data", "results", "activations", "reports")
                 for path in (study.root / folder).rglob(".*")
                 if re.search(r"\.(tmp|old|commit|commit-new|part)$", path.name)]
    assert leftovers == []
