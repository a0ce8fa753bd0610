"""A study folder that was copied or moved, and its MLflow SQLite store.

MLflow records absolute artifact locations in its store (experiments.artifact_location, runs.artifact_uri,
logged_models.artifact_location, model_versions.storage_location, ...). In a copy of a study those still name
the original folder: the copy would read the original's models and write its runs into the original's artifact
root, silently, or fail once the original is deleted. So every step that opens the store first checks that the
study's experiment keeps its artifacts inside the folder holding params.yaml (`check_store_location`), and
`medtransfer relocate` rewrites the recorded paths from the old folder to the new one (`relocate_store`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from medtransfer.errors import ConfigError

_SQLITE_PREFIX = "sqlite:///"
_TEXT_AFFINITY = ("CHAR", "CLOB", "TEXT")  # SQLite's rule for a column's text affinity, plus untyped columns


@dataclass(frozen=True)
class Relocation:
    store: Path
    old_root: Path
    new_root: Path
    values: int  # how many recorded values changed


def sqlite_store_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:////abs/path.db` tracking URI; None for any other store."""
    if not tracking_uri.startswith(_SQLITE_PREFIX):
        return None
    rest = tracking_uri[len(_SQLITE_PREFIX):]
    return Path(rest) if rest.startswith("/") else None


def _local_path(location: str | None) -> Path | None:
    """An artifact location as a local absolute path; None for remote locations (s3://, mlflow-artifacts:, ...)."""
    if not location:
        return None
    if location.startswith("file://"):
        location = unquote(location[len("file://"):])
    elif "://" in location or location.startswith(("file:", "mlflow-artifacts:")):
        return None
    path = Path(location)
    return path if path.is_absolute() else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _recorded_artifact_location(store: Path, experiment: str) -> Path | None:
    """The experiment's artifact location as recorded, read without opening MLflow (no migration, no writes)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as connection:
            row = connection.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
    except sqlite3.Error:
        return None  # not an MLflow store yet (or not one we can read): MLflow reports that itself
    return _local_path(row[0]) if row else None


def _study_store(config) -> tuple[Path, Path] | None:
    """(store file, configured artifact root) when both are local and inside the study folder: the case a copy of
    the folder carries along. A store or artifact root kept elsewhere on purpose is shared, not copied."""
    store = sqlite_store_file(config.tracking_uri)
    artifact_root = _local_path(config.artifact_root)
    root = config.root.resolve()
    if store is None or artifact_root is None or not _inside(store, root) or not _inside(artifact_root, root):
        return None
    return store, artifact_root


def check_store_location(config) -> None:
    """Raise `ConfigError` when the study's SQLite store records the experiment's artifacts outside the folder
    holding params.yaml (the folder was copied or moved)."""
    found = _study_store(config)
    if found is None or not found[0].is_file():
        return
    store, _ = found
    recorded = _recorded_artifact_location(store, config.stores.experiment)
    root = config.root.resolve()
    if recorded is not None and not _inside(recorded, root):
        raise ConfigError(
            f"the tracking store keeps experiment '{config.stores.experiment}' artifacts in {recorded}, outside this "
            f"study's folder {root} (was the study copied or moved?)",
            where=str(store),
            fix=f"run 'medtransfer relocate' in {root} to point the store at this folder's artifacts",
        )
    other = _other_study_between(recorded, root) if recorded is not None else None
    if other is not None:  # a study copied into a folder above the original: both are "inside" the copy
        raise ConfigError(
            f"the tracking store keeps experiment '{config.stores.experiment}' artifacts in {recorded}, inside "
            f"another study's folder {other}, not this study's (was the study copied into a folder above it?)",
            where=str(store),
            fix=f"run 'medtransfer relocate --from {other}' in {root} to point the store at this folder's artifacts",
        )


def _other_study_between(recorded: Path, root: Path) -> Path | None:
    """The nearest folder strictly between `root` and `recorded` that holds its own params.yaml, if any."""
    for folder in recorded.parents:
        if folder == root or not _inside(folder, root):
            return None
        if (folder / "params.yaml").is_file():
            return folder
    return None


def _old_root(recorded: Path, artifact_root: Path, root: Path) -> Path | None:
    """The folder the store was made in: the recorded artifact location less the artifact root's place in the study
    (`/old/study/mlartifacts` with artifact root `mlartifacts` → `/old/study`)."""
    relative = artifact_root.relative_to(root).parts
    if relative and recorded.parts[-len(relative):] != relative:
        return None
    return Path(*recorded.parts[: len(recorded.parts) - len(relative)])


def _rewriter(old_root: Path, new_root: Path):
    """old → new at the start of every recorded path: a whole path component, as a plain path or inside a file://
    URI or a JSON string, never the middle of another path (`/x/old/...` stays)."""
    replacements = {str(old_root): str(new_root), old_root.as_uri()[len("file://"):]: new_root.as_uri()[len("file://"):]}
    patterns = [
        (re.compile(r"(?:^|(?<=file://)|(?<=[\"'\s=,\[(]))" + re.escape(old) + r"(?=$|/|[\"'\s,\])])"), new)
        for old, new in replacements.items()
    ]

    def rewrite(value):
        if not isinstance(value, str):
            return value
        for pattern, new in patterns:
            value = pattern.sub(lambda _match: new, value)
        return value

    return rewrite, sorted(replacements)


def _rewrite_database(connection: sqlite3.Connection, old_root: Path, new_root: Path) -> int:
    rewrite, needles = _rewriter(old_root, new_root)
    connection.create_function("medtransfer_relocate", 1, rewrite, deterministic=True)
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    changed = 0
    for table in tables:
        for column in connection.execute(f'PRAGMA table_info("{table}")').fetchall():
            name, declared = column[1], (column[2] or "").upper()
            if declared and not any(kind in declared for kind in _TEXT_AFFINITY):
                continue
            matches = " OR ".join(f'instr("{name}", ?) > 0' for _ in needles)
            cursor = connection.execute(
                f'UPDATE "{table}" SET "{name}" = medtransfer_relocate("{name}") '
                f'WHERE typeof("{name}") = \'text\' AND ({matches}) AND medtransfer_relocate("{name}") != "{name}"',
                needles,
            )
            changed += cursor.rowcount
    return changed


def relocate_store(config, old_root: Path | None = None) -> Relocation:
    """Rewrite every path the study's SQLite store records under `old_root` (default: derived from the experiment's
    artifact location) to the same path under the folder holding params.yaml. The database is copied, rewritten
    and renamed over the original, so a failure leaves it as it was."""
    uri = config.tracking_uri
    where = f"{config.source_file}: stores.tracking_uri"
    store = sqlite_store_file(uri)
    if store is None:
        raise ConfigError(
            f"relocate rewrites a SQLite tracking store, and this study's is {uri}",
            where=where,
            fix="a tracking server or database keeps its own artifact locations: move its artifacts with its tools",
        )
    if not store.is_file():
        raise ConfigError("the tracking store does not exist", where=str(store), fix="nothing to relocate")
    if Path(f"{store}-wal").exists() or Path(f"{store}-journal").exists():
        raise ConfigError("the tracking store is in use (it has a journal file)", where=str(store),
                          fix="stop every medtransfer, mlflow and dvc process of this study, then run relocate again")
    new_root = config.root.resolve()
    found = _study_store(config)
    if found is None:
        raise ConfigError(
            f"the tracking store and artifact root must both lie inside {new_root} to move with it",
            where=f"{config.source_file}: stores",
            fix="point stores.tracking_uri and stores.artifact_root at paths inside the study folder",
        )
    explicit = old_root is not None
    if old_root is None:
        recorded = _recorded_artifact_location(store, config.stores.experiment)
        if recorded is None:
            raise ConfigError(f"the tracking store has no experiment '{config.stores.experiment}' with local artifacts",
                              where=str(store), fix="pass --from OLD_FOLDER, the folder the study was copied from")
        old_root = _old_root(recorded, found[1], new_root)
        if old_root is None:
            raise ConfigError(
                f"cannot tell which folder the store was made in from its artifact location {recorded}",
                where=str(store), fix="pass --from OLD_FOLDER, the folder the study was copied from",
            )
    old_root = Path(os.path.abspath(Path(old_root).expanduser()))
    if old_root == new_root:
        return Relocation(store, old_root, new_root, 0)
    handle, temporary = tempfile.mkstemp(prefix=f".{store.name}.", suffix=".tmp", dir=store.parent)
    os.close(handle)
    try:
        with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as source, \
                contextlib.closing(sqlite3.connect(temporary)) as copy:
            source.backup(copy)
            with copy:  # one transaction: the copy is rewritten whole or not at all
                changed = _rewrite_database(copy, old_root, new_root)
        if changed == 0:  # nothing recorded there: the store stays as it was, and a wrong --from is said so
            if explicit:
                raise ConfigError(f"the tracking store records no path under {old_root}; nothing was changed",
                                  where=str(store), fix="pass --from the folder the study was copied from")
            return Relocation(store, old_root, new_root, 0)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, os.stat(store).st_mode & 0o7777)  # mkstemp's file is owner-only
        os.replace(temporary, store)
    except sqlite3.Error as error:
        raise ConfigError(f"could not rewrite the tracking store ({error}); it was left unchanged", where=str(store),
                          fix="check that it is an MLflow store and not in use") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return Relocation(store, old_root, new_root, changed)


# -- the `medtransfer relocate` command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="old_root", metavar="OLD_FOLDER",
        help="the folder the study was copied or moved from (default: read from the tracking store)",
    )


def run(args: argparse.Namespace) -> int:
    from medtransfer.config import load_config

    config = load_config(args.params)
    relocation = relocate_store(config, Path(args.old_root) if args.old_root else None)
    if relocation.old_root == relocation.new_root:
        print(f"{relocation.store} already records this folder, {relocation.new_root}: nothing to do")
    else:
        print(f"relocated {relocation.store}: {relocation.values} recorded values now under {relocation.new_root} "
              f"instead of {relocation.old_root}")
    return 0
