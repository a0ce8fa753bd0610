"""The paper's published results (`reference/juodelyte2024.yaml`), read and checked once into typed tables.

The report sets a study beside them (`report_paper.py`). The numbers live in the data file with their citation;
this module only reads them, so a corrected or extended reference is a data change, not a code change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REFERENCE_FILE = Path(__file__).with_name("reference") / "juodelyte2024.yaml"


class ReferenceError(ValueError):
    """The shipped reference file is malformed (a packaging bug, not a user's mistake)."""


@dataclass(frozen=True)
class CrossTargetPair:
    """One row of the paper's cross-target CCA table: `values[i]` is the mean over its targets at `layers[i]`."""

    title: str
    kind: str
    sources: tuple[str, ...]
    regime: str
    values: tuple[float, ...]


@dataclass(frozen=True)
class PaperResults:
    citation: str
    targets: tuple[str, ...]
    sources: tuple[str, ...]
    regimes: tuple[str, ...]
    layers: tuple[str, ...]
    #: (target, source, regime) -> (mean, sd), AUC ×100 over the paper's 5 folds
    test_auc: dict[tuple[str, str, str], tuple[float, float]]
    cross_target_cca: tuple[CrossTargetPair, ...]
    #: target -> (observed, chance) error agreement of the ImageNet and RadImageNet models, no freezing
    error_agreement: dict[str, tuple[float, float]]
    #: source -> Pearson r per layer of similarity to the source vs relative gain, pooled over targets and folds
    gain_correlation: dict[str, tuple[float, ...]] = field(default_factory=dict)


def load_paper_results(path: Path = REFERENCE_FILE) -> PaperResults:
    """Read and check the reference file; raises `ReferenceError` naming the entry that is wrong."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ReferenceError(f"{path}: cannot read the paper's reference results ({error})") from error
    if not isinstance(data, dict):
        raise ReferenceError(f"{path}: expected a mapping at the top level")

    def names(key: str) -> tuple[str, ...]:
        value = data.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            raise ReferenceError(f"{path}: '{key}' must be a non-empty list of names")
        return tuple(value)

    targets, sources, regimes, layers = names("targets"), names("sources"), names("regimes"), names("layers")
    citation = data.get("citation")
    if not isinstance(citation, str) or not citation.strip():
        raise ReferenceError(f"{path}: 'citation' is missing")

    test_auc: dict[tuple[str, str, str], tuple[float, float]] = {}
    for target, cells in _mapping(data, "test_auc", path).items():
        _known(target, targets, f"test_auc.{target}", path)
        for column, pair in _mapping(cells, None, path, f"test_auc.{target}").items():
            source, _, regime = str(column).partition(" ")
            _known(source, sources, f"test_auc.{target}.{column}", path)
            _known(regime, regimes, f"test_auc.{target}.{column}", path)
            mean, sd = _numbers(pair, 2, f"test_auc.{target}.{column}", path)
            test_auc[(target, source, regime)] = (mean, sd)

    rows = data.get("cross_target_cca")
    if not isinstance(rows, list) or not rows:
        raise ReferenceError(f"{path}: 'cross_target_cca' must be a non-empty list")
    cross_target = []
    for index, row in enumerate(rows):
        where = f"cross_target_cca[{index}]"
        if not isinstance(row, dict) or not {"pair", "kind", "sources", "regime", "values"} <= set(row):
            raise ReferenceError(f"{path}: {where} needs pair, kind, sources, regime and values")
        for source in row["sources"]:
            _known(source, sources, where, path)
        if row["regime"]:
            _known(row["regime"], regimes, where, path)
        values = _numbers(row["values"], len(layers), where, path)
        cross_target.append(CrossTargetPair(str(row["pair"]), str(row["kind"]), tuple(row["sources"]),
                                            str(row["regime"] or ""), values))

    agreement: dict[str, tuple[float, float]] = {}
    for target, cell in _mapping(data, "error_agreement", path).items():
        _known(target, targets, f"error_agreement.{target}", path)
        if not isinstance(cell, dict):
            raise ReferenceError(f"{path}: error_agreement.{target} needs observed and chance")
        observed, chance = _numbers([cell.get("observed"), cell.get("chance")], 2, f"error_agreement.{target}", path)
        agreement[target] = (observed, chance)
    gain_correlation: dict[str, tuple[float, ...]] = {}
    for source, values in (data.get("gain_correlation") or {}).items():
        _known(source, sources, f"gain_correlation.{source}", path)
        gain_correlation[source] = _numbers(values, len(layers), f"gain_correlation.{source}", path)
    return PaperResults(citation.strip(), targets, sources, regimes, layers, test_auc, tuple(cross_target), agreement,
                        gain_correlation)


def _mapping(data, key: str | None, path: Path, where: str | None = None) -> dict:
    value = data.get(key) if key is not None else data
    if not isinstance(value, dict) or not value:
        raise ReferenceError(f"{path}: '{where or key}' must be a non-empty mapping")
    return value


def _known(name: str, allowed: tuple[str, ...], where: str, path: Path) -> None:
    if name not in allowed:
        raise ReferenceError(f"{path}: {where} names '{name}', not one of {', '.join(allowed)}")


def _numbers(values, count: int, where: str, path: Path) -> tuple[float, ...]:
    if not isinstance(values, list) or len(values) != count:
        raise ReferenceError(f"{path}: {where} must hold {count} numbers")
    try:
        numbers = tuple(float(value) for value in values)
    except (TypeError, ValueError) as error:
        raise ReferenceError(f"{path}: {where} must hold {count} numbers") from error
    if not all(math.isfinite(number) for number in numbers):
        raise ReferenceError(f"{path}: {where} must hold finite numbers")
    return numbers
