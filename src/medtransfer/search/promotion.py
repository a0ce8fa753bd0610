"""Promoting a search's winner: the best configuration fit on every fold (and seed), each fit registered as
`<dataset>.<source>.<regime>` with alias `fold<k>`, alias `champion` on the fit with the lowest validation loss,
and the pointer file that records the versions for DVC.

One worker fits and registers under the search's final-fit lock; the others wait, then find the registered
versions (by study, trial, fold and seed tags) and reuse them, so nothing is registered twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medtransfer.config import Config
from medtransfer.layout import STEP_FINAL_FIT
from medtransfer.pointers import FoldModel, ModelPointer, fold_model_alias, write_pointer
from medtransfer.layout import ROLE_FINETUNED
from medtransfer.registry import (ALIAS_CHAMPION, Tag, finetuned_model_name, registered_versions,
                                  source_model_name)
from medtransfer.run_scope import ends_with_outcome
from medtransfer.search.parent_run import fit_descriptions, fit_run_name
from medtransfer.search.workers import close_orphaned_fits, final_fit_lock
from medtransfer.train.finetune import FinetuneRequest, run_finetune
from medtransfer.train.protocols import PROTOCOL_SEARCH

if TYPE_CHECKING:  # annotations only: the study loop imports this module
    from medtransfer.search.study import SearchRequest


def fit_every_fold_once(config: Config, request: SearchRequest, settings, best_trial: str, best_params: dict,
                        name: str, prepared, source_version, client, experiment_id: str) -> list[FoldModel]:
    """The final fits of the best configuration, fit and registered by one worker at a time (orphans of a dead
    worker closed first); a fit already registered is reused."""
    with final_fit_lock(config, name):
        close_orphaned_fits(client, experiment_id, name)
        fits = _final_fits(config, request, settings, best_trial, best_params, name, prepared, source_version)
        mark_superseded(client, experiment_id, request, {fit.run_id for fit in fits})
        return fits


def mark_superseded(client, experiment_id: str, request: SearchRequest, current: set[str]) -> None:
    """Tag the final-fit runs of this dataset, source and regime: `superseded=false` on ``current`` (the run ids of
    the fits the pointer will name), `true` on every other one. Only tags that change are written."""
    query = (f"tags.{Tag.STEP} = '{STEP_FINAL_FIT}' and tags.{Tag.DATASET} = '{request.dataset}' "
             f"and tags.{Tag.SOURCE} = '{request.source}' and tags.{Tag.REGIME} = '{request.regime}'")
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        for run in page:
            wanted = "false" if run.info.run_id in current else "true"
            if run.data.tags.get(Tag.SUPERSEDED) != wanted:
                client.set_tag(run.info.run_id, Tag.SUPERSEDED, wanted)
        token = page.token
        if not token:
            break


def log_test_auc_summary(fits: list[FoldModel]) -> dict[str, float]:
    """Mean and SD of the fits' test AUC, logged to the active run with each fit's own; returns the summary."""
    import mlflow

    aucs = np.array([fit.test_auc for fit in fits if fit.test_auc is not None], dtype=float)
    summary = {
        "test_auc_mean": float(aucs.mean()) if aucs.size else float("nan"),
        "test_auc_sd": float(aucs.std(ddof=1)) if aucs.size > 1 else 0.0,
    }
    mlflow.log_metrics({k: v for k, v in summary.items() if np.isfinite(v)})
    for fit in fits:
        if fit.test_auc is not None:
            mlflow.log_metric(f"test_auc_{fit.alias}", fit.test_auc)
    return summary


def write_search_pointer(config: Config, request: SearchRequest, name: str, fits: list[FoldModel],
                         summary: dict[str, float], best_params: dict, prepared, source_version,
                         client) -> tuple[ModelPointer, Path]:
    """Elect the champion among the fits and write results/models/<dataset>.<source>.<regime>.json."""
    registered_name = finetuned_model_name(request.dataset, request.source, request.regime)
    pointer = ModelPointer(
        registered_model=registered_name,
        dataset=request.dataset,
        source=request.source,
        regime=request.regime,
        source_model=source_model_name(request.source),
        source_version=str(source_version.version),
        source_weights_sha256=source_version.tags.get(Tag.WEIGHTS_SHA256, ""),
        data_fingerprint=prepared.fingerprint,
        study=name,
        champion_version=_champion(client, fits, registered_name),
        folds=fits,
        test_auc_mean=summary["test_auc_mean"] if np.isfinite(summary["test_auc_mean"]) else None,
        test_auc_sd=summary["test_auc_sd"],
        best_params=best_params,
        protocol=request.preset or PROTOCOL_SEARCH,
    )
    return pointer, write_pointer(config, pointer)


def _final_fits(config, request, settings, best_trial: str, best_params: dict, name: str, prepared, source_version) -> list[FoldModel]:
    import mlflow

    from medtransfer.models.mlflow_models import register_logged_model

    client = mlflow.MlflowClient()
    registered_name = finetuned_model_name(request.dataset, request.source, request.regime)
    folds = config.search.folds if config.search.folds is not None else list(range(prepared.num_folds))
    fits = []
    total = len(folds) * len(config.search.seeds)
    for fold in folds:
        for seed_index, seed in enumerate(config.search.seeds):
            label = (f"search {registered_name} final fit fold {fold}"
                     + (f" seed {seed}" if len(config.search.seeds) > 1 else "") + f" ({len(fits) + 1}/{total})")
            alias = fold_model_alias(fold, seed_index)
            version = _registered_fit(client, registered_name, name, best_trial, fold, seed)
            if version is None:
                # ended FINISHED, or KILLED when interrupted, FAILED on an error
                with ends_with_outcome(mlflow.start_run(
                        experiment_id=mlflow.active_run().info.experiment_id, nested=True,
                        run_name=fit_run_name(request.source, request.regime, alias),
                        tags={Tag.STEP: STEP_FINAL_FIT, Tag.STUDY: name, Tag.TRIAL: best_trial,
                              Tag.FOLD: str(fold), Tag.SEED: str(seed)})):
                    result = run_finetune(
                        config,
                        FinetuneRequest(request.dataset, request.source, request.regime, fold,
                                        dataclasses.replace(settings, seed=seed), preset=request.preset,
                                        source_version=str(source_version.version)),
                        use_active_run=True,
                        run_name=label,
                        extra_tags={Tag.STEP: STEP_FINAL_FIT, Tag.STUDY: name, Tag.TRIAL: best_trial},
                    )
                    tags = {
                        Tag.ROLE: ROLE_FINETUNED,
                        Tag.DATASET: request.dataset,
                        Tag.SOURCE: request.source,
                        Tag.REGIME: request.regime,
                        Tag.ARCH: result.model.arch,
                        Tag.WEIGHTS_SHA256: result.weights_sha256,
                        Tag.DATA_FINGERPRINT: prepared.fingerprint,
                        Tag.PREPROCESSING: source_version.tags.get(Tag.PREPROCESSING, ""),
                        Tag.STUDY: name,
                        Tag.TRIAL: best_trial,
                        "params": json.dumps(best_params, sort_keys=True),
                        Tag.FOLD: str(fold),
                        Tag.SEED: str(seed),
                        "source_version": str(source_version.version),
                        # full precision: the champion is elected from this tag, and rounding would make ties
                        "best_val_loss": repr(float(result.best_val_loss)),
                        Tag.TEST_AUC: f"{result.test_metrics.get('test_auc', float('nan')):.6g}",
                    }
                    version = register_logged_model(result.model_uri, registered_name, tags, **fit_descriptions(
                        request, fold, seed, best_trial, source_version.version, result.test_metrics))
                    mlflow.set_tag("registered_version", version.version)
            client.set_registered_model_alias(registered_name, alias, str(version.version))
            auc = float(version.tags.get(Tag.TEST_AUC, "nan"))
            fits.append(FoldModel(fold=fold, seed=seed, version=str(version.version), run_id=version.run_id,
                                  weights_sha256=version.tags[Tag.WEIGHTS_SHA256], alias=alias,
                                  test_auc=auc if np.isfinite(auc) else None))
    return fits


def _registered_fit(client, registered_name: str, study: str, trial: str, fold: int, seed: int):
    """The version already registered for this study, trial, fold and seed (a resumed search reuses it)."""
    for version in registered_versions(client, registered_name):
        tags = version.tags
        if (tags.get(Tag.STUDY), tags.get(Tag.TRIAL), tags.get(Tag.FOLD), tags.get(Tag.SEED)) == (study, trial, str(fold),
                                                                                         str(seed)):
            return version
    return None


def _champion(client, fits: list[FoldModel], registered_name: str) -> str:
    """Alias `champion` on the fit with the lowest validation loss (never chosen by test AUC); an exact tie goes
    to the first fit (the lowest fold)."""
    losses = {}
    for fit in fits:
        version = client.get_model_version(registered_name, fit.version)
        losses[fit.version] = float(version.tags.get("best_val_loss", "inf"))
    champion = min(losses, key=losses.get)
    client.set_registered_model_alias(registered_name, ALIAS_CHAMPION, champion)
    return champion
