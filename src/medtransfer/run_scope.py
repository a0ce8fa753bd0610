"""An MLflow run that ends with the outcome of the block it wraps, and takes any run left open inside it along.

MLflow's own ``with mlflow.start_run():`` ends the innermost active run, whichever that is. A nested run still open
when the block ends (an interrupt that lands after its ``start_run`` and before the code that would end it) is then
ended in the outer run's place, and the outer run is left RUNNING for good. ``ends_with_outcome`` ends every run
still open above the wrapped one, then the wrapped one, with the block's outcome:

- FINISHED when the block returns;
- KILLED when it is interrupted (Ctrl-C, or a study's stage whose study is gone: `study_guard.watch_study`);
- FAILED on any other exception.
"""

from __future__ import annotations

import contextlib

FINISHED, KILLED, FAILED = "FINISHED", "KILLED", "FAILED"
#: How deep a chain of nested runs is followed to tell whether an open run was started inside the wrapped one.
MAX_NESTING = 16


def outcome_status(caught: BaseException | None) -> str:
    """The MLflow status of a run whose block ended with ``caught`` (None: it returned)."""
    if caught is None:
        return FINISHED
    return KILLED if isinstance(caught, KeyboardInterrupt) else FAILED


@contextlib.contextmanager
def ends_with_outcome(active_run):
    """Around a run just opened by ``mlflow.start_run`` (the ``ActiveRun`` it returned): yields it, and ends it (and
    the runs still open above it) FINISHED, KILLED or FAILED as the block ends; the exception goes on."""
    try:
        yield active_run
    except BaseException as caught:
        end_runs_through(active_run.info.run_id, outcome_status(caught))
        raise
    end_runs_through(active_run.info.run_id, FINISHED)


def end_runs_through(run_id: str, status: str) -> None:
    """End, innermost first, the active runs nested in ``run_id``, then ``run_id`` itself, all with ``status``.
    Runs that are not nested in it (its caller's, when it was already ended) are left alone."""
    import mlflow

    while (active := mlflow.active_run()) is not None:
        if active.info.run_id == run_id:
            mlflow.end_run(status)
            return
        if not _nested_in(active, run_id):
            return
        mlflow.end_run(status)


def _nested_in(run, ancestor_id: str) -> bool:
    """Whether ``ancestor_id`` is among the parents of ``run`` (MLflow's ``mlflow.parentRunId`` tags)."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = run.data.tags.get("mlflow.parentRunId")
    for _level in range(MAX_NESTING):
        if parent is None:
            return False
        if parent == ancestor_id:
            return True
        parent = client.get_run(parent).data.tags.get("mlflow.parentRunId")
    return False
