"""What a search shows in the MLflow UI: run names that carry source and regime, the parent's description and
search space, and Optuna's plots of the finished study."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from medtransfer.layout import OPTUNA_PLOTS_FOLDER
from medtransfer.config import Config, SearchParameter
from medtransfer.registry import finetuned_model_description, finetuned_version_description
from medtransfer.search.trials import complete_trials



def trial_run_name(source: str, regime: str, number: int) -> str:
    # Source and regime in the name: a comparison across searches otherwise shows identical column headers.
    return f"trial {number} {source}/{regime}"


def fit_run_name(source: str, regime: str, alias: str) -> str:
    return f"fit {source}/{regime} {alias}"


def describe_space(parameter: SearchParameter) -> str:
    """`float [1e-05, 0.01] log`, `int [1, 4]`, `categorical [16, 32]`."""
    if parameter.type == "categorical":
        return f"categorical {list(parameter.choices or [])}"
    return f"{parameter.type} [{parameter.low}, {parameter.high}]" + (" log" if parameter.log else "")


def search_space_params(config: Config, preset: str | None) -> dict[str, str]:
    """The space as parameters of the parent run (`space_<name>`); none for a preset, which searches nothing."""
    if preset is not None:
        return {}
    return {f"space_{name}": describe_space(parameter) for name, parameter in config.search.space.items()}


def search_description(config: Config, dataset: str, source: str, regime: str, preset: str | None) -> str:
    """The parent run's description (Markdown, the UI's `mlflow.note.content`)."""
    if preset is not None:
        how = f"No search: the fixed protocol `{preset}` is fit on every fold."
    else:
        space = ", ".join(f"`{name}` {describe_space(parameter)}" for name, parameter in config.search.space.items())
        # No trial count: a resumed search may ask for more trials than the run it reuses was created with.
        how = (f"Optuna TPE trials on fold {config.search.search_fold}, minimising the "
               f"validation loss; space: {space or 'none'}. Its children are the trials and the final fits.")
    return (f"Search for target `{dataset}`, source `{source}`, regime `{regime}`. {how} The best configuration is "
            f"then fit on every fold and registered as `{dataset}.{source}.{regime}`.")


def search_parent_tags(config: Config, request) -> dict[str, str]:
    """Tags of the parent run beyond its identity: the code and profile, and its description."""
    from medtransfer.tracking import run_identity_tags

    description = search_description(config, request.dataset, request.source, request.regime, request.preset)
    return {**run_identity_tags(config), "mlflow.note.content": description}


def fit_descriptions(request, fold: int, seed: int, trial: str, source_version, test_metrics: dict) -> dict[str, str]:
    """`register_logged_model`'s descriptions for a final fit: its model's, and its version's with a link to the
    source version it started from."""
    return {
        "model_description": finetuned_model_description(request.dataset, request.source, request.regime),
        "version_description": finetuned_version_description(
            request.source, request.regime, fold, seed, trial, str(source_version),
            test_metrics.get("test_auc", float("nan"))),
    }


#: Below this many complete trials the parameter-importance plot carries a caveat.
FEW_TRIALS = 10


def log_optuna_plots(study) -> list[str]:
    """Log Optuna's optimization history and, with two or more complete trials and parameters, the parameter
    importances as PNG artifacts of the active run; returns the artifact names logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import optuna.visualization.matplotlib as optuna_plots
    from optuna.exceptions import ExperimentalWarning

    complete = complete_trials(study)
    plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
    if len(complete) >= 2 and any(trial.params for trial in complete):
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    logged = []
    with tempfile.TemporaryDirectory() as folder:
        for name, plot in plots.items():
            try:
                with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental on every call
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                # Importances need variation across trials; a degenerate study must not fail a finished search.
                mlflow.set_tag(f"optuna_plot_skipped.{name}", str(error)[:200])
                continue
            if name == "param_importances.png" and len(complete) < FEW_TRIALS:
                # fANOVA on a handful of trials ranks parameters by chance: say so on the figure itself
                axes.set_title(f"{axes.get_title()}\nonly {len(complete)} complete trials: too few for a reliable "
                               f"ranking (about {FEW_TRIALS} or more)", fontsize=9)
                mlflow.set_tag("optuna_plot_caveat", f"importances from {len(complete)} complete trials; "
                                                     f"about {FEW_TRIALS} or more are needed to rank parameters")
            axes.figure.tight_layout()
            axes.figure.savefig(Path(folder) / name, dpi=100)
            plt.close(axes.figure)
            logged.append(name)
        mlflow.log_artifacts(folder, artifact_path=OPTUNA_PLOTS_FOLDER)
    return logged
