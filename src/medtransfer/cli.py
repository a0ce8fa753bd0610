"""`medtransfer <step>`: one subcommand per pipeline step. Parses arguments, calls the step, maps errors to exit codes.

Exit codes: 0 success; 2 bad input or configuration (one line on stderr, no traceback); 1 an internal error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medtransfer import __version__
from medtransfer.errors import UserError


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; we keep the promise of one stderr line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _config(args: argparse.Namespace):
    from medtransfer.config import load_config

    return load_config(args.params)


# -- prepare -----------------------------------------------------------------------------------------------------


def _add_prepare(commands) -> None:
    parser = commands.add_parser(
        "prepare",
        help="read, check, split and write one dataset to data/prepared/NAME/",
        description="Read a dataset declared in params.yaml, verify its pinned fingerprint, split it into folds, "
        "and write data/prepared/NAME/ atomically (images, labels, splits, manifest.json).",
    )
    parser.add_argument("--dataset", required=True, help="a name under 'datasets' in params.yaml")
    parser.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from medtransfer.data.prepare import prepare_dataset
    from medtransfer.tracking import launched_by_mlflow_run

    config = _config(args)
    manifest = prepare_dataset(config, args.dataset)
    folder = config.prepared_data_dir / args.dataset
    counts = ", ".join(
        f"fold {fold['fold']}: " + "/".join(f"{fold['counts'][part]}" for part in ("train", "val", "test"))
        for fold in manifest["folds"]
    )
    print(
        f"prepared {args.dataset}: {manifest['num_images']} images {tuple(manifest['image_shape'])}, "
        f"{manifest['num_classes']} classes, train/val/test {counts}\n"
        f"  fingerprint {manifest['fingerprint']}\n  -> {folder}"
    )
    if launched_by_mlflow_run():
        _log_prepare_to_mlflow(config, manifest, folder)
    return 0


def _log_prepare_to_mlflow(config, manifest: dict, folder: Path) -> None:
    import mlflow

    from medtransfer.tracking import log_prepared_dataset, use_tracking_store

    use_tracking_store(config)
    with mlflow.start_run():
        mlflow.set_tags({"step": "prepare", "dataset": manifest["dataset"]})
        mlflow.log_params(
            {
                "dataset": manifest["dataset"],
                "split_scheme": manifest["split"]["scheme"],
                "folds": manifest["split"]["folds"],
                "num_images": manifest["num_images"],
            }
        )
        mlflow.log_artifact(str(folder / "manifest.json"))
        log_prepared_dataset(manifest, folder, context="prepare")


# -- demo-data ---------------------------------------------------------------------------------------------------


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


# -- profile -----------------------------------------------------------------------------------------------------


def _add_profile(commands) -> None:
    parser = commands.add_parser(
        "profile",
        help="list profiles or make one the active params.yaml",
        description="Profiles live in profiles/NAME.yaml. DVC reads only params.yaml, so 'use' validates a "
        "profile and copies it over params.yaml.",
    )
    actions = parser.add_subparsers(dest="action", required=True, parser_class=_OneLineArgumentParser)
    listing = actions.add_parser("list", help="show the profiles and which one is active")
    listing.set_defaults(handler=_run_profile_list)
    use = actions.add_parser("use", help="make profiles/NAME.yaml the active params.yaml")
    use.add_argument("name")
    use.set_defaults(handler=_run_profile_use)


def _profile_root(args: argparse.Namespace) -> Path:
    from medtransfer.profiles import find_repository_root

    return Path(args.params).resolve().parent if args.params else find_repository_root()


def _run_profile_list(args: argparse.Namespace) -> int:
    from medtransfer.profiles import active_profile, available_profiles

    root = _profile_root(args)
    active = active_profile(root)
    for name in available_profiles(root):
        print(f"{'*' if name == active else ' '} {name}")
    if active is None:
        print("(params.yaml matches no profile: it was edited or written by hand)")
    return 0


def _run_profile_use(args: argparse.Namespace) -> int:
    from medtransfer.profiles import activate_profile

    target = activate_profile(_profile_root(args), args.name)
    print(f"active profile: {args.name} -> {target}")
    return 0


# -- entry -------------------------------------------------------------------------------------------------------

_SUBCOMMANDS: tuple[Callable, ...] = (_add_demo_data, _add_prepare, _add_profile)


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"medtransfer {args.command}: error: {error.one_line()}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"medtransfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
