"""Profiles: named parameter sets in `profiles/<name>.yaml`, one of which is the active `params.yaml`.

DVC reads only `params.yaml` and cannot pick a file by flag, so switching profile means copying the profile over
`params.yaml` (after validating it). The copy starts with a header naming its profile.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medtransfer.atomic_files import atomic_write_text
from medtransfer.config import PARAMS_FILE_NAME, config_from_mapping, read_yaml_mapping
from medtransfer.errors import ConfigError

PROFILES_DIR_NAME = "profiles"
HEADER_PREFIX = "# Active profile: "


def find_repository_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (cwd) holding a `profiles/` folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PROFILES_DIR_NAME).is_dir():
            return folder
    raise ConfigError(
        f"no '{PROFILES_DIR_NAME}/' folder in {here} or above it",
        fix="run this inside the medtransfer repository",
    )


def available_profiles(root: Path) -> list[str]:
    return sorted(path.stem for path in (root / PROFILES_DIR_NAME).glob("*.yaml"))


def active_profile(root: Path) -> str | None:
    """The profile named in params.yaml's header, if params.yaml still matches that profile's content."""
    name, text = _header_profile(root)
    if name is None:
        return None
    params, profile = root / PARAMS_FILE_NAME, root / PROFILES_DIR_NAME / f"{name}.yaml"
    if render_active_params(name, profile.read_text(encoding="utf-8")) == text:
        return name
    # Compared by content, not text: `dvc exp run -S …` rewrites params.yaml in its own layout (block lists, empty
    # for null, long lines folded; the header comment stays) even where it changed nothing, and that is still the
    # profile.
    return name if _same_content(params, profile) else None


def _header_profile(root: Path) -> tuple[str | None, str]:
    """The existing profile params.yaml's header names (None if none) and params.yaml's text."""
    params = root / PARAMS_FILE_NAME
    if not params.is_file():
        return None, ""
    try:
        text = params.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", where=str(params),
                          fix="save it as UTF-8 YAML, or 'medtransfer profile use NAME'") from None
    first_line = text.splitlines()[0] if text else ""
    words = first_line[len(HEADER_PREFIX):].split() if first_line.startswith(HEADER_PREFIX) else []
    name = words[0] if words else ""
    return (name if name and (root / PROFILES_DIR_NAME / f"{name}.yaml").is_file() else None), text


def edited_keys(root: Path) -> tuple[str | None, list[str]]:
    """The profile params.yaml's header names and the dotted keys whose values differ from it (`dvc exp run -S`
    edits, or a hand's); (None, []) when the header names no profile or either file does not parse."""
    name, _ = _header_profile(root)
    if name is None:
        return None, []
    try:
        params = read_yaml_mapping(root / PARAMS_FILE_NAME)
        profile = read_yaml_mapping(root / PROFILES_DIR_NAME / f"{name}.yaml")
    except ConfigError:
        return None, []
    return name, _differences(params, profile, "")


def _differences(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for name in dict.fromkeys([*a, *b])
                for key in _differences(a.get(name), b.get(name), f"{prefix}{name}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _same_content(a: Path, b: Path) -> bool:
    try:
        return read_yaml_mapping(a) == read_yaml_mapping(b)
    except ConfigError:
        return False


#: Where `profile use --force` sets aside a params.yaml that holds edits no profile has.
SET_ASIDE_NAME = "params.yaml.edited"


def activate_profile(root: Path, name: str, *, force: bool = False) -> Path:
    """Validate `profiles/<name>.yaml` and make it the active params.yaml; returns the params path.

    A params.yaml that matches no profile holds edits that would be lost: refused, unless `force`, which first
    copies it to `SET_ASIDE_NAME` beside it."""
    profile = root / PROFILES_DIR_NAME / f"{name}.yaml"
    if not profile.is_file():
        known = ", ".join(available_profiles(root)) or "none"
        raise ConfigError(f"unknown profile '{name}'", where=str(root / PROFILES_DIR_NAME), fix=f"choose one of: {known}")
    target = root / PARAMS_FILE_NAME
    # Validate as if it already were params.yaml, so relative paths resolve as they will once active; but the
    # fault is in the profile, so the message names the profile.
    try:
        config_from_mapping(read_yaml_mapping(profile), source_file=target)
    except ConfigError as error:
        where = str(profile) + error.where[len(str(target)):] if (error.where or "").startswith(str(target)) else error.where
        raise ConfigError(error.what, where=where, fix=error.fix) from None
    if target.is_file() and _holds_edits(root):
        if not force:
            raise ConfigError("params.yaml holds edits that no profile has; 'profile use' would overwrite them",
                              where=str(target), fix=f"copy them into a profile (profiles/NAME.yaml), or run "
                              f"'medtransfer profile use {name} --force' to set them aside in {SET_ASIDE_NAME}")
        atomic_write_text(root / SET_ASIDE_NAME, target.read_text(encoding="utf-8", errors="replace"))
    atomic_write_text(target, render_active_params(name, profile.read_text(encoding="utf-8")))
    return target


def _holds_edits(root: Path) -> bool:
    try:
        return active_profile(root) is None
    except ConfigError:  # not even text: nothing a profile could restore either
        return True


def render_active_params(name: str, profile_text: str) -> str:
    header = (
        f"{HEADER_PREFIX}{name}\n"
        f"# Copied from {PROFILES_DIR_NAME}/{name}.yaml by 'medtransfer profile use {name}'. DVC and every command\n"
        "# read this file; edit the profile and re-run that command, or edit here for a one-off experiment.\n"
    )
    return header + profile_text


# -- `medtransfer profile list | use NAME` ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser]) -> None:
    actions = parser.add_subparsers(dest="action", required=True, parser_class=parser_class)
    listing = actions.add_parser("list", help="show the profiles and which one is active")
    listing.set_defaults(handler=run_list)
    use = actions.add_parser("use", help="make profiles/NAME.yaml the active params.yaml")
    use.add_argument("name")
    use.add_argument("--force", action="store_true",
                     help=f"replace a params.yaml that holds edits no profile has (kept in {SET_ASIDE_NAME})")
    use.set_defaults(handler=run_use)


def _root(args: argparse.Namespace) -> Path:
    return Path(args.params).resolve().parent if args.params else find_repository_root()


def run_list(args: argparse.Namespace) -> int:
    root = _root(args)
    active = active_profile(root)
    for name in available_profiles(root):
        print(f"{'*' if name == active else ' '} {name}")
    if active is None:
        base, keys = edited_keys(root)
        if base is None or not keys:
            print("(params.yaml matches no profile: it was edited or written by hand)")
        else:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            print(f"(params.yaml matches no profile: it is {base} with edits to {shown}, by 'dvc exp run -S' or "
                  "by hand)")
    return 0


def run_use(args: argparse.Namespace) -> int:
    root = _root(args)
    edited = args.force and (root / PARAMS_FILE_NAME).is_file() and _holds_edits(root)
    target = activate_profile(root, args.name, force=args.force)
    if edited:
        print(f"the edited params.yaml is kept in {root / SET_ASIDE_NAME}")
    print(f"active profile: {args.name} -> {target}")
    return 0
