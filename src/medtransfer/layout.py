"""Every name the project's outputs and runs are known by, defined once.

DVC output folders and file names, MLflow tag keys and run steps, the fine-tuning regimes, and the pair kinds of
the analysis with the human titles that tables, figures and CSVs share. Modules import these names; none spells
them again. Pure constants: this module imports nothing from the project, so anything may import it.
"""

from __future__ import annotations

# Regimes ---------------------------------------------------------------------------------------------------------
#: How a source is fine-tuned: every layer, the backbone frozen (head only, then all), or a linear probe.
REGIMES: tuple[str, ...] = ("full", "freeze", "linear")
DEFAULT_REGIME = "full"

# Output folders and files (paths relative to the study's root) ---------------------------------------------------
#: results/models/<dataset>.<source>.<regime>.json: the registered model a search elected (a DVC output).
POINTER_FOLDER = "results/models"
#: results/metrics/<dataset>.<source>.<regime>.json: the fold metrics of that pointer, for `dvc metrics`.
METRICS_FOLDER = "results/metrics"
#: results/sources/<name>.json: the registered version and weights hash of a pretraining source.
SOURCE_POINTER_FOLDER = "results/sources"
#: activations/<dataset>/: every model's activations on the held-out images, written by extract.
ACTIVATIONS_FOLDER = "activations"
CONV1_FOLDER = "conv1"
PREDICTIONS_FOLDER = "predictions"
#: results/analysis/<dataset>/: the CSV tables and figures compare writes.
ANALYSIS_FOLDER = "results/analysis"
#: results/curves/<dataset>/<measure>.csv: plot-ready layer curves for `dvc plots show`.
CURVES_FOLDER = "results/curves"
SIMILARITY_FILE = "similarity.csv"
SIMILARITY_SUMMARY_FILE = "similarity_summary.csv"
PREDICTIONS_FILE = "predictions.csv"
GAIN_FILE = "similarity_vs_gain.csv"
AUC_INTERVAL_FILE = "auc_intervals.csv"
PAIRED_FILE = "paired_comparison.csv"
#: Which stage of one architecture was compared with which of another (and which stages have no partner).
STAGE_MATCH_FILE = "stage_matches.csv"
#: results/summary/: the study across targets.
SUMMARY_FOLDER = "results/summary"
GAIN_CORRELATION_FILE = "gain_correlation.csv"
CROSS_TARGET_FILE = "cross_target_similarity.csv"
AUC_TABLE_FILE = "auc_table.csv"
#: results/metrics/study/<source>.<regime>.json: the study-level numbers `dvc metrics show` prints beside the
#: searches' rows (the rest of the summary is in its CSV tables). Git tracks results/metrics/ (.gitignore).
STUDY_METRICS_FOLDER = "results/metrics/study"
#: reports/report.md (+ report.html and figures).
REPORT_FOLDER = "reports"
REPORT_FILE = "report.md"
REPORT_HTML_FILE = "report.html"

# Run artifacts ---------------------------------------------------------------------------------------------------
TEST_PREDICTIONS_FILE = "test_predictions.csv"
CONFUSION_FILE = "confusion_matrix.json"
ROC_FILE = "roc_curve.png"
PREDICTIONS_ARTIFACT_DIR = "predictions"
OPTUNA_PLOTS_FOLDER = "optuna"
MODEL_PACKAGE_FOLDER = "package"
MODEL_SPEC_FILE = "spec.json"
MODEL_WEIGHTS_FILE = "weights.safetensors"


# MLflow tag keys -------------------------------------------------------------------------------------------------
class Tag:
    """Tag keys on runs and registered model versions."""

    ROLE = "role"  # "source" or "finetuned"
    DATASET = "dataset"
    SOURCE = "source"
    REGIME = "regime"
    ARCH = "arch"
    ORIGIN = "origin"  # where the weights came from: "random(seed=0)", "timm:resnet50.a1_in1k", "keras_h5:<sha256>"
    WEIGHTS_SHA256 = "weights_sha256"
    PREPROCESSING = "preprocessing"
    DATA_FINGERPRINT = "data_fingerprint"
    STUDY = "study"  # the Optuna study's name
    STEP = "step"  # one of the STEP_* values below
    TRIAL = "trial"
    FOLD = "fold"
    SEED = "seed"
    TEST_AUC = "test_auc"
    #: On final-fit runs: "false" on the fits a search's pointer names now, "true" on every earlier final fit of the
    #: same dataset, source and regime (a rerun search replaced it), so a UI filter returns current models only.
    SUPERSEDED = "superseded"


ROLE_SOURCE = "source"
ROLE_FINETUNED = "finetuned"

#: Values of Tag.STEP: the parent run of a search, one run per trial, one run per final fit.
STEP_SEARCH = "search"
STEP_TRIAL = "trial"
STEP_FINAL_FIT = "final_fit"

# Pair kinds of the analysis, with their titles -------------------------------------------------------------------
SOURCE_VS_FINETUNED = "source_vs_finetuned"
PRETRAINED_VS_PRETRAINED = "pretrained_vs_pretrained"
FINETUNED_VS_FINETUNED = "finetuned_vs_finetuned"
PRETRAINED_VS_RANDOM = "pretrained_vs_random"
FINETUNED_VS_RANDOM_INIT = "finetuned_vs_random_init"
RANDOM_VS_RANDOM = "random_vs_random"
FOLD_TO_FOLD = "fold_to_fold"
SEED_TO_SEED = "seed_to_seed"
IDENTITY = "identity"
SHUFFLED = "shuffled"

#: Every pair kind, in the order tables list them, with the words a reader sees.
PAIR_KIND_TITLES: dict[str, str] = {
    SOURCE_VS_FINETUNED: "fine-tuned vs its initialisation",
    PRETRAINED_VS_PRETRAINED: "sources against each other, before fine-tuning",
    FINETUNED_VS_FINETUNED: "their fine-tuned models, after fine-tuning",
    PRETRAINED_VS_RANDOM: "each source vs a random initialisation",
    FINETUNED_VS_RANDOM_INIT: "each fine-tuned model vs the random-init fine-tuned model",
    RANDOM_VS_RANDOM: "noise floor: two random initialisations",
    FOLD_TO_FOLD: "fold-to-fold (same source and regime)",
    SEED_TO_SEED: "seed-to-seed (same source, regime and fold)",
    IDENTITY: "identity: a model against itself",
    SHUFFLED: "noise floor: shuffled images",
}
PAIR_KINDS: tuple[str, ...] = tuple(PAIR_KIND_TITLES)
#: The rows that say what "no similarity" and "full similarity" look like.
CONTROL_KINDS: tuple[str, ...] = (IDENTITY, RANDOM_VS_RANDOM, SHUFFLED)


#: The pair groups the layer figures draw, one panel each, in this order (the floors are drawn in every panel).
FIGURE_PAIR_KINDS: tuple[str, ...] = (SOURCE_VS_FINETUNED, PRETRAINED_VS_PRETRAINED, FINETUNED_VS_FINETUNED,
                                      PRETRAINED_VS_RANDOM, FINETUNED_VS_RANDOM_INIT, FOLD_TO_FOLD, SEED_TO_SEED)


def pair_kind_title(kind: str) -> str:
    return PAIR_KIND_TITLES.get(kind, kind.replace("_", " "))


# Added for the analysis split -------------------------------------------------------------------------------------
#: activations/<dataset>/manifest.json: what extract saved and every fact compare needs (see analysis/extract.py).
ACTIVATIONS_MANIFEST_FILE = "manifest.json"
#: Figures of results/analysis/<dataset>/ (compare draws them, the report embeds them): str.format patterns.
LAYER_FIGURE_FILE = "layers_{measure}.png"
#: the first-layer filters of every source and random initialisation, side by side
CONV1_FIGURE_FILE = "conv1_filters.png"
PREDICTION_FIGURE_FILE = "prediction_agreement.png"
GAIN_FIGURE_FILE = "similarity_vs_gain.png"
#: reports/figures/: the analysis figures the report embeds, copied beside it.
REPORT_FIGURES_FOLDER = "figures"

# Added for the core split -----------------------------------------------------------------------------------------
#: Values of Tag.STEP for the steps that log one run each (a search's runs are STEP_SEARCH/TRIAL/FINAL_FIT above).
STEP_PREPARE = "prepare"
STEP_SOURCE = "source"
STEP_PRETRAIN = "pretrain"
STEP_FINETUNE = "finetune"
STEP_REPORT = "report"
#: The whole pipeline's run (`medtransfer study`), the parent of every stage's run.
STEP_PIPELINE = "study"
#: The artifact folder a logged report goes to, in its report run and in the pipeline's run.
REPORT_ARTIFACT_FOLDER = "report"
#: Under the repository: the lock files by which the workers of one host take turns at a search's final fits.
LOCK_FOLDER = ".medtransfer-locks"
