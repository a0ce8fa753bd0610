"""`medtransfer study`: the whole pipeline of the active profile as one MLflow parent run, driven through DVC.

`dvc repro` runs the stages (demo data → prepare → sources → searches → extract → compare → summary → report) and skips
those whose inputs did not change. Every stage that runs logs a child of the pipeline's run (the stages read the
parent's id from the environment), the searches keep their trial children below their own parent, and the pipeline's
run records which stages ran and which were up to date, DVC's log, and the report.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medtransfer.config import Config
from medtransfer.errors import ConfigError, UserError
from medtransfer.layout import REPORT_ARTIFACT_FOLDER, REPORT_FILE, REPORT_FOLDER, STEP_PIPELINE
from medtransfer.study_guard import (HOST_TAG, PROCESS_TAG, STUDY_PROCESS_ENV, close_stale_study_runs,
                                     parent_death_signal, process_identity)

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


@dataclass(frozen=True)
class PipelineOutcome:
    run_id: str | None  # an up-to-date study's: the last run that did work (None when there is none)
    ran: list[str]
    skipped: list[str]
    report: Path | None
    launched: bool = False  # run_id is the run `mlflow run` created for this study (it stays, whatever ran)

    def describe(self) -> str:
        """What `medtransfer study` prints: how many stages ran, the pipeline's MLflow run, the report."""
        if self.ran:
            text = f"study: ran {len(self.ran)} stage(s), {len(self.skipped)} up to date; MLflow run {self.run_id}"
        elif self.launched:
            text = (f"study: every step was up to date ({len(self.skipped)} stages); only 'mlflow run' logged a run, "
                    f"{self.run_id}, which records that")
        else:
            where = f"the study's last MLflow run is {self.run_id}" if self.run_id else "no MLflow run was kept"
            text = f"study: every step was up to date ({len(self.skipped)} stages), nothing logged; {where}"
        return text if self.report is None else f"{text}\nreport: {self.report}"


class PipelineFailed(UserError):
    """A DVC stage failed; its own message is above in the output."""


def run_pipeline(config: Config, *, force: bool = False) -> PipelineOutcome:
    """`dvc repro` of the whole pipeline under one MLflow run, each stage that runs a child of it."""
    import mlflow

    from medtransfer.tracking import step_run

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    if not Path(dvc).exists():
        raise ConfigError("the 'dvc' command is not installed", fix="install medtransfer's dependencies (make install)")
    launcher_run = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run`'s own run: it stays, whatever ran
    # step_run tags it (as every run) with the profile and the code revision; the host and process identity let the
    # next study tell whether it is still running.
    identity = {HOST_TAG: socket.gethostname(), PROCESS_TAG: process_identity() or ""}
    with step_run(config, step=STEP_PIPELINE, run_name=f"study {config.project.profile}", tags=identity) as run:
        # this run carries this live process's identity, so only runs of killed studies are closed
        for stale in close_stale_study_runs(mlflow.MlflowClient(), run.info.experiment_id, STEP_PIPELINE):
            print(f"study: closed run {stale} as KILLED: the study that ran it was killed", flush=True)
        mlflow.log_params({"profile": config.project.profile, "targets": ",".join(config.study.targets),
                           "sources": ",".join(config.study.sources), "regimes": ",".join(config.study.regimes)})
        env = stage_environment(os.environ, run.info.run_id, mlflow.get_tracking_uri())
        command = [dvc, "repro", *(["--force"] if force else [])]
        output = _stream(command, cwd=config.root, env=env)
        ran, skipped = _RAN.findall(output.text), _SKIPPED.findall(output.text)
        mlflow.log_text(output.text, "dvc_repro.log")
        mlflow.log_metrics({"stages_run": float(len(ran)), "stages_up_to_date": float(len(skipped))})
        if output.returncode != 0:
            raise PipelineFailed(f"'dvc repro' failed (exit {output.returncode}) after running {len(ran)} stage(s)",
                                 fix="read the stage's error above; fix it and run again (finished stages are kept)")
        report = config.resolve(REPORT_FOLDER) / REPORT_FILE
        if report.is_file() and ran:
            mlflow.log_artifacts(str(report.parent), artifact_path=REPORT_ARTIFACT_FOLDER)
    report = report if report.is_file() else None
    if ran or force or run.info.run_id == launcher_run:
        return PipelineOutcome(run.info.run_id, ran, skipped, report, launched=run.info.run_id == launcher_run)
    # Nothing ran: an up-to-date study adds no run to the experiment (the UI would fill with copies of the last one).
    client = mlflow.MlflowClient()
    client.delete_run(run.info.run_id)
    previous = last_pipeline_run(client, run.info.experiment_id, config.project.profile)
    if previous is not None:
        client.set_tag(previous, "checked_up_to_date", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return PipelineOutcome(previous, ran, skipped, report)


def last_pipeline_run(client, experiment_id: str, profile: str) -> str | None:
    """The newest finished pipeline run of ``profile`` in the experiment (deleted runs are not searched)."""
    runs = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.step = '{STEP_PIPELINE}' and tags.profile = '{profile}' and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def stage_environment(base: dict[str, str], run_id: str, tracking_uri: str) -> dict[str, str]:
    """The environment `dvc repro` runs the stages in: the pipeline's run as their parent, its tracking store, and
    this interpreter's bin folder first on PATH — the stages call `medtransfer` by name, which must be the one beside
    this interpreter, also from a shell without the virtual environment on PATH (`.venv/bin/medtransfer study`)."""
    from medtransfer.tracking import PIPELINE_RUN_ENV

    env = {**base, PIPELINE_RUN_ENV: run_id, "MLFLOW_TRACKING_URI": tracking_uri,
           STUDY_PROCESS_ENV: process_identity() or ""}  # each stage stops once this study is gone
    env["PATH"] = os.pathsep.join(part for part in (str(Path(sys.executable).parent), base.get("PATH", "")) if part)
    env.pop("MLFLOW_RUN_ID", None)  # the stages are children of the pipeline's run, not that run itself
    return env


@dataclass(frozen=True)
class _Output:
    text: str
    returncode: int


def _stream(command: list[str], *, cwd: Path, env: dict[str, str]) -> _Output:
    """Run `command`, echoing its output as it comes, and return it."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=parent_death_signal)  # noqa: PLW1509 - one prctl call, no locks
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return _Output("".join(lines), process.wait())
