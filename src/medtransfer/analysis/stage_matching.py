"""Which stage of one model is compared with which stage of another: pure functions of the stage names, their
reductions (stride from the input) and their spatial sizes.

Two models that name the same stages in the same order (every ResNet of the study; two ConvNeXts) are compared
stage by stage, by name, as always. Two architectures that name different stages (a ResNet and a ConvNeXt, a
ConvNeXt and a vision transformer) are matched by reduction: the stages of both at the same stride see the input at
the same resolution. Where one side has several stages at a reduction (a ViT's blocks all sit at its patch size;
a ResNet's `stem` and `stage1` do not), the deepest stage of each side there is paired, the one that hands its
features on; the other stages have no partner and are reported as such (`stage_match_rows`, `stage_matches.csv`).
A matched pair whose maps differ in size (odd input sizes round differently in different stems) cannot pair
positions and is reported too.

No torch: `compare` plans with these and never loads a network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "STAGE_MATCH_COLUMNS",
    "StageMatch",
    "cross_architecture_matches",
    "is_compared",
    "match_stages_by_reduction",
    "model_stages",
    "paired_layers",
    "stage_match_rows",
    "stage_sizes",
]

#: `stage_matches.csv`: one row per stage of either side of each architecture pairing the study compares.
STAGE_MATCH_COLUMNS = ["arch_a", "arch_b", "stage_a", "reduction_a", "stage_b", "reduction_b", "status"]

PAIRED = "paired"
SAME_NAME = "paired by name"


@dataclass(frozen=True)
class StageMatch:
    """Stages of two architectures paired by reduction, and those without a partner."""

    pairs: tuple[tuple[str, str, int], ...]  # (stage of a, stage of b, reduction)
    unmatched_a: tuple[str, ...]
    unmatched_b: tuple[str, ...]


def match_stages_by_reduction(a: Mapping[str, int], b: Mapping[str, int]) -> StageMatch:
    """Pair the stages of `a` and `b` (stage name → reduction, in forward order) that share a reduction.

    Where one side has several stages at a reduction, the deepest stage of each side at that reduction is paired
    and the others are unmatched: each side's last stage at a resolution is the one that hands its features on."""
    last_a = {reduction: stage for stage, reduction in a.items()}
    last_b = {reduction: stage for stage, reduction in b.items()}
    shared = [reduction for reduction in dict.fromkeys(a.values()) if reduction in last_b]
    pairs = tuple((last_a[reduction], last_b[reduction], reduction) for reduction in shared)
    paired_a = {stage for stage, _, _ in pairs}
    paired_b = {stage for _, stage, _ in pairs}
    return StageMatch(pairs, tuple(s for s in a if s not in paired_a), tuple(s for s in b if s not in paired_b))


def stage_sizes(fold_info: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """{stage: (h, w)} of one fold of the activations manifest (`manifest["folds"][k]`)."""
    return {layer: (int(info["height"]), int(info["width"])) for layer, info in fold_info["layers"].items()}


def model_stages(manifest: Mapping[str, Any], key: str) -> dict[str, int | None]:
    """{stage: reduction} of model `key` in forward order, as extract recorded it. Manifests written before
    models recorded their stages held one architecture: every model has the manifest's layers (reductions
    unknown, None)."""
    record = manifest["models"].get(key) or {}
    stages = record.get("stages")
    if isinstance(stages, Mapping) and stages:
        return {str(name): (None if reduction is None else int(reduction)) for name, reduction in stages.items()}
    return {str(layer): None for layer in manifest.get("layers") or []}


def _matches(stages_a: Mapping[str, int | None], stages_b: Mapping[str, int | None]
             ) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, str]]:
    """([(stage of a, stage of b)], {unpaired stage of a: why}, {unpaired stage of b: why})."""
    if list(stages_a) == list(stages_b):
        return [(stage, stage) for stage in stages_a], {}, {}
    if any(r is None for r in stages_a.values()) or any(r is None for r in stages_b.values()):
        common = [stage for stage in stages_a if stage in stages_b]
        why = "no stage of that name on the other side (reductions unrecorded: run extract again to match by stride)"
        return ([(stage, stage) for stage in common], {s: why for s in stages_a if s not in stages_b},
                {s: why for s in stages_b if s not in stages_a})
    match = match_stages_by_reduction(stages_a, stages_b)  # type: ignore[arg-type]

    def reason(stage: str, own: Mapping[str, int | None], other: Mapping[str, int | None]) -> str:
        if own[stage] in other.values():
            return f"a deeper stage at reduction {own[stage]} is paired"
        return f"no stage at reduction {own[stage]} on the other side"

    return ([(a, b) for a, b, _ in match.pairs], {s: reason(s, stages_a, stages_b) for s in match.unmatched_a},
            {s: reason(s, stages_b, stages_a) for s in match.unmatched_b})


def paired_layers(stages_a: Mapping[str, int | None], stages_b: Mapping[str, int | None],
                  sizes: Mapping[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """The (stage of a, stage of b) pairs to compare, in a's forward order: by name when both sides name the same
    stages, else by reduction; a pair whose maps differ in size (`sizes`: stage → (h, w)) is left out."""
    pairs, _, _ = _matches(stages_a, stages_b)
    return [(a, b) for a, b in pairs if sizes.get(a) == sizes.get(b)]


def stage_match_rows(manifest: Mapping[str, Any], model_pairs: Sequence[tuple[str, str]],
                     sizes: Mapping[str, tuple[int, int]]) -> list[dict]:
    """`STAGE_MATCH_COLUMNS` rows for every distinct pairing of architectures among `model_pairs` ((key a, key b)):
    each stage of a with its partner (or why it has none), then each unpaired stage of b."""
    rows: list[dict] = []
    seen: set[tuple] = set()
    for key_a, key_b in model_pairs:
        stages_a, stages_b = model_stages(manifest, key_a), model_stages(manifest, key_b)
        arch_a = str((manifest["models"].get(key_a) or {}).get("arch") or "")
        arch_b = str((manifest["models"].get(key_b) or {}).get("arch") or "")
        signature = (arch_a, tuple(stages_a.items()), arch_b, tuple(stages_b.items()))
        if signature in seen:
            continue
        seen.add(signature)
        pairs, alone_a, alone_b = _matches(stages_a, stages_b)
        partner = dict(pairs)
        same_names = list(stages_a) == list(stages_b)
        for stage, reduction in stages_a.items():
            other = partner.get(stage)
            status = alone_a.get(stage, SAME_NAME if same_names else PAIRED)
            if other is not None and sizes.get(stage) != sizes.get(other):
                status = f"maps differ in size ({_size(sizes.get(stage))} vs {_size(sizes.get(other))}): not compared"
            rows.append({"arch_a": arch_a, "arch_b": arch_b, "stage_a": stage, "reduction_a": _cell(reduction),
                         "stage_b": other or "", "reduction_b": _cell(stages_b.get(other)) if other else "",
                         "status": status})
        for stage, why in alone_b.items():
            rows.append({"arch_a": arch_a, "arch_b": arch_b, "stage_a": "", "reduction_a": "", "stage_b": stage,
                         "reduction_b": _cell(stages_b[stage]), "status": why})
    return rows


def is_compared(row: Mapping[str, Any]) -> bool:
    """Whether a `stage_match_rows` row's two stages were compared (by name or by reduction)."""
    return row.get("status") in (PAIRED, SAME_NAME)


def cross_architecture_matches(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[str], list[str]]]:
    """From `stage_match_rows` rows (or the CSV's), each pairing of architectures that is not by name:
    (arch a, arch b, ["stage_a~stage_b (/reduction)" compared], [stages without a partner, or not compared])."""
    combos: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        combos.setdefault((str(row["arch_a"]), str(row["arch_b"])), []).append(row)
    result = []
    for (arch_a, arch_b), members in combos.items():
        if all(row.get("status") == SAME_NAME for row in members):
            continue
        compared = [f"{row['stage_a']}~{row['stage_b']} (/{row['reduction_a']})" for row in members if is_compared(row)]
        alone = [str(row["stage_a"] or row["stage_b"]) for row in members if not is_compared(row)]
        result.append((arch_a, arch_b, compared, alone))
    return result


def _cell(reduction: int | None) -> str:
    return "" if reduction is None else str(reduction)


def _size(size: tuple[int, int] | None) -> str:
    return "?" if size is None else f"{size[0]}x{size[1]}"
