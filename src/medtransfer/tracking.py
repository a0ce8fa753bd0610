"""MLflow set-up: tracking store, experiment, dataset lineage.

The tracking URI and artifact root come from params.yaml (resolved against the repository root). Under
`mlflow run`, the launcher has already created the run and exported MLFLOW_RUN_ID / MLFLOW_TRACKING_URI /
MLFLOW_EXPERIMENT_ID; the step then logs into that run, once `mlflow_project.check_launched_run` has made sure
the launcher put it in the profile's store and experiment.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any

from medtransfer.config import Config
from medtransfer.layout import REPORT_ARTIFACT_FOLDER, STEP_REPORT, Tag
from medtransfer.experiment_tags import experiment_tags, tag_experiment
from medtransfer.mlflow_project import check_launched_run, launched_by_mlflow_run
from medtransfer.run_scope import ends_with_outcome

CODE_REVISION_TAG = "code_revision"
PROFILE_TAG = "profile"
#: Set by `medtransfer study` (the whole pipeline) for the steps it runs through DVC: the pipeline's run id.
PIPELINE_RUN_ENV = "MEDTRANSFER_STUDY_RUN_ID"

# MLflow digests are limited to 36 characters; the full sha256 goes into a tag.
_DIGEST_LENGTH = 32
DATA_FINGERPRINT_TAG = "data_fingerprint"


def run_identity_tags(config: Config) -> dict[str, str]:
    """Tags every run carries, so any two runs in the UI can be told apart by the code and profile behind them."""
    from medtransfer.revision import code_revision

    return {CODE_REVISION_TAG: code_revision(config.root), PROFILE_TAG: config.project.profile}


def pipeline_run_id() -> str | None:
    """The parent run of the whole pipeline (`medtransfer study`), when this step runs inside one."""
    return os.environ.get(PIPELINE_RUN_ENV) or None




@contextlib.contextmanager
def step_run(config: Config, *, step: str, run_name: str, tags: dict[str, str] | None = None,
             started: float | None = None):
    """The MLflow run a pipeline step logs into, opened and closed around the step:

    - inside an active run (the caller's): a nested child of it;
    - under `mlflow run` (the launcher exported MLFLOW_RUN_ID): the launcher's run;
    - under `medtransfer study` (the whole pipeline): a child of the pipeline's run, in its experiment;
    - otherwise a new run in the configured experiment.

    started: when the step's work began (`time.time()`), for a step that opens its run only to log what it made:
    the run then starts there, so its duration in the UI is the step's (a launcher's run started before anyway).
    """
    import mlflow

    use_tracking_store(config)
    tags = {Tag.STEP: step, **run_identity_tags(config), **(tags or {})}
    active = mlflow.active_run()
    resumes_launcher = active is None and launched_by_mlflow_run()  # read now: start_run() consumes MLFLOW_RUN_ID
    if resumes_launcher:
        context = mlflow.start_run()
    else:
        if active is not None:
            experiment_id, parent_id = active.info.experiment_id, active.info.run_id
        elif pipeline_run_id():
            parent = mlflow.MlflowClient().get_run(pipeline_run_id())
            experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
        else:
            experiment_id, parent_id = ensure_experiment(config), None
        if started is None:
            context = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                                       nested=active is not None, parent_run_id=None if active else parent_id)
        else:
            run_tags = {**tags, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
            created = mlflow.MlflowClient().create_run(experiment_id, start_time=int(started * 1000), tags=run_tags,
                                                       run_name=run_name)
            context = mlflow.start_run(run_id=created.info.run_id, nested=active is not None)
    # ended with the step's outcome (KILLED when interrupted), with any run the step left open inside it
    with ends_with_outcome(context) as run:
        mlflow.set_tags(tags)
        if resumes_launcher:
            mlflow.MlflowClient().update_run(run.info.run_id, name=run_name)  # the launcher named it at random
        yield run


def use_tracking_store(config: Config) -> str:
    """Point MLflow at the configured store (or the launcher's) and return the URI in use."""
    import mlflow

    from medtransfer.config import TRACKING_URI_ENV_VAR
    from medtransfer.relocate import check_store_location
    from medtransfer.store_check import bound_postgres_waits, check_server_reachable, check_sqlite_store

    configured = config.tracking_uri
    launcher = os.environ.get("MLFLOW_TRACKING_URI")
    if launched_by_mlflow_run() and launcher:
        uri, where = launcher, "$MLFLOW_TRACKING_URI"
    else:
        from_env = bool(os.environ.get(TRACKING_URI_ENV_VAR))
        uri = configured
        where = f"${TRACKING_URI_ENV_VAR}" if from_env else f"{config.source_file}: stores.tracking_uri"
    check_sqlite_store(uri, where)
    check_server_reachable(uri, where)
    bound_postgres_waits(uri)
    # A server that stops answering later: bounded retries instead of MLflow's minutes of back-off (a user's own
    # settings win).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    check_store_location(config)  # a copied study must not log into, or load from, the original's artifacts
    if launched_by_mlflow_run() and launcher:
        check_launched_run(config)  # the CLI checked already; library callers under a launcher are checked here
        mlflow.set_tracking_uri(launcher)
        return launcher
    name_an_unused_mlflow_uri(configured, where)
    mlflow.set_tracking_uri(configured)
    return configured


_NAMED_UNUSED_URI: set[str] = set()


def name_an_unused_mlflow_uri(uri_in_use: str, where: str) -> bool:
    """Say once, on stderr, that the $MLFLOW_TRACKING_URI this process was started with is not the store it logs
    to (medtransfer reads the profile's store, or $MEDTRANSFER_TRACKING_URI); True when it said so. Silent in a
    study's stages (the study exports its own store) and when both name the same store."""
    import sys

    import medtransfer
    from medtransfer.store_check import masked

    given = medtransfer.MLFLOW_TRACKING_URI_AT_START
    if not given or given in _NAMED_UNUSED_URI or os.environ.get(PIPELINE_RUN_ENV) or _same_store(given, uri_in_use):
        return False
    _NAMED_UNUSED_URI.add(given)
    print(f"medtransfer: note: $MLFLOW_TRACKING_URI ({masked(given)}) is not used; runs go to {masked(uri_in_use)} "
          f"({where}) -- to log there, set $MEDTRANSFER_TRACKING_URI or stores.tracking_uri instead", file=sys.stderr)
    return True


def _same_store(first: str, second: str) -> bool:
    """Whether two tracking URIs name one store: equal, or SQLite/file URIs of one file (relative to this folder,
    as MLflow reads them; `config.resolve_store_url`)."""
    from medtransfer.config import resolve_store_url

    def canonical(uri: str) -> str:
        return resolve_store_url(uri.rstrip("/").removeprefix("file://"), Path.cwd())

    return canonical(first) == canonical(second)


def ensure_experiment(config: Config) -> str:
    """The experiment id to log to: the launcher's under `mlflow run`, else the configured one (created with
    its artifact root under the repository, so artifacts never land in the working directory, and with
    `experiment_tags`)."""
    import mlflow

    launcher_experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if launcher_experiment:  # tagged by `mlflow_project.label_launched_run`
        return launcher_experiment
    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(config.stores.experiment)
    if existing is not None:
        tag_experiment(client, existing, config)
        return existing.experiment_id
    if mlflow.get_tracking_uri().startswith(("http://", "https://")):
        # A tracking server decides where artifacts go (proxied through it, or its default root): clients on other
        # hosts could not reach a folder of this repository anyway.
        location = None
    else:
        artifact_root = config.artifact_root
        location = Path(artifact_root).as_uri() if "://" not in artifact_root else artifact_root
    try:
        return client.create_experiment(config.stores.experiment, artifact_location=location,
                                        tags=experiment_tags(config))
    except mlflow.exceptions.MlflowException:
        # Another worker created it between our look-up and our create: use theirs.
        existing = client.get_experiment_by_name(config.stores.experiment)
        if existing is None:
            raise
        return existing.experiment_id


def _retry_once_on_race(log) -> None:
    """Run `log` again once if it fails. MLflow's SQL store records a dataset by looking it up and then inserting
    it; two workers logging the same new dataset at once both insert, and the second hits the unique key. On the
    retry the dataset exists and is reused."""
    try:
        log()
    except Exception:  # noqa: BLE001 - the retry re-raises whatever is not a passing race
        time.sleep(0.2)
        log()


def log_prepared_dataset(manifest: dict[str, Any], folder: Path, context: str) -> None:
    """Record a prepared dataset as an input of the active run: name, source folder, fingerprint."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # two registered local sources match a path; either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        source = resolve_dataset_source(str(folder))
    dataset = MetaDataset(
        source=source,
        name=manifest["dataset"],
        digest=manifest["fingerprint"][:_DIGEST_LENGTH],
    )
    _retry_once_on_race(
        lambda: mlflow.log_input(dataset, context=context, tags={DATA_FINGERPRINT_TAG: manifest["fingerprint"]})
    )
    mlflow.set_tag(f"{DATA_FINGERPRINT_TAG}.{manifest['dataset']}", manifest["fingerprint"])


def log_report(config: Config, report: Path, started: float | None = None) -> None:
    """Log a written report's folder (Markdown, HTML, figures) as the `report` artifacts of a `report` step run
    (starting at ``started``, see `step_run`)."""
    import mlflow

    with step_run(config, step=STEP_REPORT, run_name="report", started=started):
        mlflow.log_artifacts(str(report.parent), artifact_path=REPORT_ARTIFACT_FOLDER)
