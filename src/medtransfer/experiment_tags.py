"""The tags that make an MLflow experiment open as what it is: MLflow 3's model-training view, with a description."""

from __future__ import annotations

from medtransfer.config import Config

#: MLflow 3's UI opens an experiment by its kind: without it, an experiment with no runs yet or one created by
#: `mlflow run --experiment-name` opens the GenAI (traces) view. This value opens the model-training runs view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_DESCRIPTION_TAG = "mlflow.note.content"


def experiment_tags(config: Config) -> dict[str, str]:
    """The experiment's kind and its description (Markdown, shown above the runs): what the study compares."""
    study = config.study
    lines = [f"**medtransfer study** (profile `{config.project.profile}`)"]
    if config.project.description:
        lines.append(config.project.description)
    lines.append(f"Targets: {', '.join(study.targets) or '-'}; sources: {', '.join(study.sources) or '-'}; "
                 f"regimes: {', '.join(study.regimes) or '-'}.")
    lines.append("Final fits: filter `tags.step = 'final_fit' and tags.superseded = 'false'`, add the `test_auc` "
                 "metric as a column, group by `source`.")
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, EXPERIMENT_DESCRIPTION_TAG: "\n\n".join(lines)}


def tag_experiment(client, experiment, config: Config) -> None:
    """Give an experiment made elsewhere (`mlflow run --experiment-name`, an older version) its kind and a
    description; what a user set is kept."""
    for key, value in experiment_tags(config).items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
