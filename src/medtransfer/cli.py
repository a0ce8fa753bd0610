"""`medtransfer <step>`: one subcommand per pipeline step. Parses arguments, calls the step, maps errors to exit codes.

Exit codes: 0 success; 2 bad input or configuration (one line on stderr, no traceback); 1 an internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medtransfer import __version__
from medtransfer.errors import UserError, as_user_error
from medtransfer.layout import DEFAULT_REGIME, REGIMES
from medtransfer.train.protocols import PRESET_NAMES
from medtransfer.study_guard import watch_study


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; we keep the promise of one stderr line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _config(args: argparse.Namespace):
    from medtransfer.mlflow_project import label_launched_run, load_step_config

    config = load_step_config(args.params)
    label_launched_run(config, args.command, [getattr(args, key, None) for key in ("dataset", "source", "name", "regime")])
    return config


def _add_prepare(commands) -> None:
    parser = commands.add_parser(
        "prepare",
        help="read, check, split and write one dataset to data/prepared/NAME/",
        description="Read a dataset declared in params.yaml, verify its pinned fingerprint, split it into folds, "
        "and write data/prepared/NAME/ atomically (images, labels, splits, manifest.json).",
    )
    parser.add_argument("--dataset", required=True, help="a name under 'datasets' in params.yaml")
    parser.add_argument("--allow-duplicates", action="store_true",
                        help="keep identical images that fall on both sides of a split (train or val vs test) "
                        "instead of refusing them; manifest.json records that and their count")
    parser.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from medtransfer.data.prepare import describe_prepared, log_prepare_run, prepare_dataset

    config = _config(args)
    manifest = prepare_dataset(config, args.dataset, allow_duplicates=args.allow_duplicates)
    folder = config.prepared_data_dir / args.dataset
    print(describe_prepared(manifest, folder))
    log_prepare_run(config, manifest, folder)
    return 0


def _add_demo_data(commands) -> None:
    parser = commands.add_parser(
        "demo-data",
        help="write the offline demo datasets (natural, medical, fundus_vessels) from scikit-image's sample images",
        description="Cut three small 32 px datasets from the sample images that ship with scikit-image "
        "(real pixels, synthetic tasks) and write them as MedMNIST-layout .npz files. Needs no network.",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <paths.raw_data>/demo)")
    parser.set_defaults(handler=_run_demo_data)


def _run_demo_data(args: argparse.Namespace) -> int:
    from medtransfer.data.demo import write_demo_datasets

    config = _config(args)
    folder = Path(args.out) if args.out else config.raw_data_dir / "demo"
    for name, path in write_demo_datasets(folder, seed=config.project.seed).items():
        print(f"wrote {name} -> {path}")
    return 0


def _add_download(commands) -> None:
    parser = commands.add_parser(
        "download",
        help="fetch MedMNIST files from their published record, verified by the official MD5",
        description="Download MedMNIST .npz files into data/raw/medmnist/ (or where the dataset's 'path' points), "
        "verified against the official MD5 checksums. Offline it fails fast and says where to put the file.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", help="a medmnist dataset of params.yaml whose path is named after a MedMNIST file")
    which.add_argument("--all", action="store_true", help="every such dataset of params.yaml")
    which.add_argument("--subset", help="a MedMNIST subset by name (e.g. breastmnist), saved under <raw_data>/medmnist/")
    parser.add_argument("--size", type=int, default=28, help="resolution for --subset: 28, 64, 128 or 224 (default 28)")
    parser.add_argument("--timeout", type=_timeout_seconds, default=30.0,
                        help="seconds to wait for an answer (default 30)")
    parser.set_defaults(handler=_run_download)


def _timeout_seconds(text: str) -> float:
    """A finite, positive number of seconds: NaN would crash the socket layer with a traceback, 0 or less means
    no wait at all (argparse turns the error into its one-line usage error, exit 2)."""
    import math

    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text!r}")
    return seconds


def _run_download(args: argparse.Namespace) -> int:
    from medtransfer.data.download import download_medmnist, download_targets

    config = _config(args)
    targets = download_targets(config, dataset=args.dataset, subset=args.subset, size=args.size)
    for file, path in targets:
        outcome = download_medmnist(file, path, timeout=args.timeout)
        print(f"{file.file_name}: {outcome}, MD5 {file.md5} verified -> {path}")
    return 0


def _add_source(commands) -> None:
    parser = commands.add_parser(
        "source",
        help="register a pretraining source as source.NAME in the MLflow Model Registry (idempotent)",
        description="Build the source declared under 'sources' in params.yaml (random init, timm ImageNet, a Keras "
        "HDF5 such as RadImageNet, or a safetensors file), package it safely (safetensors + JSON spec) and "
        "register it as source.NAME with alias 'default'. The same weights never make a second version. Writes "
        "the pointer results/sources/NAME.json for DVC.",
    )
    parser.add_argument("--name", required=True, help="a name under 'sources' in params.yaml")
    parser.set_defaults(handler=_run_source)


def _run_source(args: argparse.Namespace) -> int:
    from medtransfer.models.sources import register_source

    config = _config(args)
    _report_source(config, args.name, register_source(config, args.name))
    return 0


def _report_source(config, name: str, registered) -> None:
    from medtransfer.models.sources import write_source_pointer

    pointer = write_source_pointer(config, name, registered)
    print(f"{registered.describe()}\n  -> {pointer}")


def _add_pretrain(commands) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="pretrain a declared source on a prepared dataset and register it as source.NAME",
        description="Supervised training from a seeded Keras-like initialisation on the dataset's fold 0, with the "
        "source's 'train' settings (else the top-level ones); registered as source.NAME with its provenance. "
        "Reuses the registered version when nothing in its recipe changed.",
    )
    parser.add_argument("--dataset", required=True, help="the prepared dataset to pretrain on")
    parser.add_argument("--source-name", required=True, help="a source of kind 'pretrained' in params.yaml")
    parser.set_defaults(handler=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from medtransfer.train.pretrain import check_pretrain_request, pretrain_source

    config = _config(args)
    check_pretrain_request(config, args.source_name, args.dataset)
    _report_source(config, args.source_name, pretrain_source(config, args.source_name))
    return 0


def _add_finetune(commands) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune one registered source on one fold of a prepared dataset, logged to MLflow",
        description="Load source.SOURCE@default, replace its head, train with the regime's phases (early stopping "
        "on the fold's validation part), report on its test part, and log metrics, predictions, plots and the "
        "model to one MLflow run.",
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--source", required=True, help="a registered source (see 'medtransfer source')")
    parser.add_argument("--regime", default=DEFAULT_REGIME, choices=REGIMES)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: train.seed in params.yaml)")
    parser.add_argument("--preset", choices=PRESET_NAMES, help="a fixed protocol instead of params.yaml's 'train'")
    parser.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from medtransfer.train.finetune import FinetuneRequest, run_finetune
    from medtransfer.train.presets import train_settings

    config = _config(args)
    request = FinetuneRequest(
        dataset=args.dataset,
        source=args.source,
        regime=args.regime,
        fold=args.fold,
        settings=train_settings(config.train, args.preset, args.seed),
        preset=args.preset,
    )
    print(run_finetune(config, request).describe(request))
    return 0


def _add_search(commands) -> None:
    from medtransfer.mlflow_project import optional_count

    parser = commands.add_parser(
        "search",
        help="train one (dataset, source, regime) by the study's protocol (a preset or an Optuna search) on every fold",
        description="With protocol 'search', run (or resume) the Optuna study of one (dataset, source, regime); with "
        "a preset such as 'paper', fit that fixed protocol instead. Trials are nested MLflow runs "
        "under one parent per study; the best configuration is fit on every fold (and seed), registered as "
        "DATASET.SOURCE.REGIME with aliases fold<k> and champion, and results/models/DATASET.SOURCE.REGIME.json "
        "records the versions for DVC. Several processes may work on one study (journal or database storage).",
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--regime", default=DEFAULT_REGIME, choices=REGIMES)
    parser.add_argument("--trials", type=optional_count,
                        help="COMPLETE trials wanted (default, or when empty: search.trials in params.yaml)")
    parser.add_argument("--protocol", help="'search' (Optuna) or a fixed preset fit on every fold, such as 'paper' "
                        "(default: study.protocol in params.yaml)")
    parser.add_argument("--preset", dest="protocol", help="the same as --protocol (kept for older scripts)")
    parser.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from medtransfer.search.study import SearchRequest, run_search
    from medtransfer.train.protocols import preset_for_protocol

    config = _config(args)
    preset = preset_for_protocol(args.protocol or config.study.protocol, where="--protocol")
    outcome = run_search(config, SearchRequest(args.dataset, args.source, args.regime, args.trials, preset))
    print(outcome.describe())
    return 0


def _add_extract(commands) -> None:
    parser = commands.add_parser(
        "extract",
        help="run every model the study names once over held-out images and save sampled stage activations",
        description="Pull each source and each registered fold model of the dataset's pointers "
        "(results/models/DATASET.*.json) plus the random sources from the registry, run each once in eval mode "
        "over its folds' held-out images, capture the five named stages with forward hooks, and write sampled "
        "spatial positions to activations/DATASET/ (memory-mappable) with a manifest.",
    )
    parser.add_argument("--dataset", required=True)
    parser.set_defaults(handler=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from medtransfer.analysis.extract import run_extract

    run_extract(_config(args), args.dataset)
    return 0


def _add_compare(commands) -> None:
    parser = commands.add_parser(
        "compare",
        help="compare every pair x layer x measure from the saved activations, with noise floors and predictions",
        description="From activations/DATASET/ only (no network is run): mean CCA, SVCCA, PWCCA and CKA for every "
        "pair the study defines, on every layer, with identity, random-vs-random and shuffled-image controls; "
        "prediction similarity of the fine-tuned models; similarity vs gain. Writes results/analysis/DATASET/ "
        "(CSVs and PNGs) and logs one MLflow run.",
    )
    parser.add_argument("--dataset", required=True)
    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from medtransfer.analysis.compare import run_compare

    run_compare(_config(args), args.dataset)
    return 0


def _add_summary(commands) -> None:
    parser = commands.add_parser(
        "summary",
        help="pool every target's analysis: similarity vs gain per source, cross-target means, the AUC table",
        description="Writes results/summary/ from every target's compare tables and model pointers (the authors' "
        "similarity-vs-gain correlation pooled over targets and folds, cross-target similarity means with the "
        "random-vs-random floor, test AUC with the relative gain over random init) and logs it to MLflow.",
    )
    parser.set_defaults(handler=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from medtransfer.analysis.study_summary import run_summary

    print(f"wrote {run_summary(_config(args))}")
    return 0


def _add_report(commands) -> None:
    parser = commands.add_parser(
        "report",
        help="write reports/report.md and report.html (AUC table, similarity with noise floors, predictions, provenance)",
        description="Build reports/report.md and its figures from the pointer files and the analysis outputs of the "
        "study's targets, and log them to MLflow. No number in it is typed by hand.",
    )
    parser.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from medtransfer.report import write_and_log_report

    print(f"wrote {write_and_log_report(_config(args))}")
    return 0


def _add_study(commands) -> None:
    parser = commands.add_parser(
        "study",
        help="run the whole study of the active profile through DVC, as one MLflow parent run",
        description="demo data → prepare → sources (pretraining the demo's own) → searches → extract → compare → "
        "report, as 'dvc repro' under one MLflow parent run with a child per stage that runs. Stages whose inputs "
        "did not change are skipped.",
    )
    parser.add_argument("--force", action="store_true", help="rerun every stage (dvc repro --force)")
    parser.set_defaults(handler=_run_pipeline)


def _run_pipeline(args: argparse.Namespace) -> int:
    from medtransfer.pipeline import run_pipeline

    config = _config(args)
    print(run_pipeline(config, force=args.force).describe())
    return 0


def _add_convert_keras(commands) -> None:
    parser = commands.add_parser(
        "convert-keras",
        help="convert a Keras ResNet50 HDF5 file (RadImageNet, Keras ImageNet) to a keras_resnet50 safetensors file",
        description="Read a Keras ResNet50 HDF5 weight file (whole-model or weights-only legacy layout), check that "
        "every tensor fits keras_resnet50, and write its state dict as safetensors (no pickle).",
    )
    parser.add_argument("h5", help="the Keras .h5 file")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--ignore-top", action="store_true", help="skip a classifier top (e.g. 'predictions')")
    parser.set_defaults(handler=_run_convert_keras)


def _run_convert_keras(args: argparse.Namespace) -> int:
    from medtransfer.models.keras_h5 import convert_keras_h5_to_safetensors

    digest = convert_keras_h5_to_safetensors(Path(args.h5), Path(args.out), ignore_top=args.ignore_top)
    print(f"wrote {args.out} (sha256 {digest}); declare it as kind: safetensors, arch: keras_resnet50")
    return 0


def _add_profile(commands) -> None:
    from medtransfer import profiles

    parser = commands.add_parser(
        "profile",
        help="list profiles or make one the active params.yaml",
        description="Profiles live in profiles/NAME.yaml. DVC reads only params.yaml, so 'use' validates a "
        "profile and copies it over params.yaml.",
    )
    profiles.add_arguments(parser, parser_class=_OneLineArgumentParser)


def _add_similarity(commands) -> None:
    from medtransfer.analysis import similarity_command

    parser = commands.add_parser(
        "similarity",
        help="mean CCA, SVCCA, PWCCA and linear CKA of two activation matrices (.npy)",
        description="Compare two activation matrices saved as .npy (rows: datapoints, columns: channels; "
        "n×p and n×q, float32 or float64), streaming them through the float64 engine.",
    )
    similarity_command.add_arguments(parser)
    parser.set_defaults(handler=similarity_command.run)


def _add_relocate(commands) -> None:
    from medtransfer import relocate

    parser = commands.add_parser(
        "relocate",
        help="after copying or moving a study folder: point its MLflow SQLite store at the folder's own artifacts",
        description="Rewrite the absolute paths the MLflow SQLite store records (artifact locations of experiments, "
        "runs, logged and registered models) from the folder the study was copied or moved from to the folder "
        "holding params.yaml. The store is copied, rewritten and renamed into place.",
    )
    relocate.add_arguments(parser)
    parser.set_defaults(handler=relocate.run)


# -- entry -------------------------------------------------------------------------------------------------------

_SUBCOMMANDS: tuple[Callable, ...] = (
    _add_compare, _add_convert_keras, _add_demo_data, _add_download, _add_extract, _add_finetune, _add_prepare,
    _add_pretrain, _add_profile, _add_relocate, _add_report, _add_search, _add_similarity, _add_source, _add_study,
    _add_summary,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineArgumentParser(
        prog="medtransfer",
        description="ImageNet vs RadImageNet transfer learning for medical imaging, tracked in MLflow and DVC.",
    )
    parser.add_argument("--version", action="version", version=f"medtransfer {__version__}")
    parser.add_argument(
        "--params",
        metavar="FILE",
        help="params file (default: $MEDTRANSFER_PARAMS, else the nearest params.yaml at or above the working folder)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_OneLineArgumentParser)
    for add in _SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # MLflow logs store migrations at INFO on stderr; keep stderr for our own one-line messages.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    if args.command != "study":
        watch_study(args.command)  # a stage of a study: stops once the study is gone (kill -9 included)
    try:
        return int(args.handler(args) or 0)
    except (UserError, OSError) as caught:
        error = as_user_error(caught)  # an OSError that is not the environment's fault is re-raised as it was
        print(f"medtransfer {args.command}: error: {error.one_line()}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"medtransfer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as caught:  # noqa: BLE001 -- only a database's failure is translated; anything else re-raised
        from medtransfer.store_check import database_fault

        fault = database_fault(caught)
        if fault is None:
            raise
        print(f"medtransfer {args.command}: error: {fault.one_line()}", file=sys.stderr)
        return fault.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
