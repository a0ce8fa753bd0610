"""The report's section that sets the study beside the paper it re-implements (Juodelyte et al., TMLR 2024).

A dataset names its twin among the paper's targets with `paper_target:`, a source its twin among the paper's
sources (imagenet, radimagenet, random) with `paper_source:`. For the twins the section prints ours, the paper's
and the difference (test AUC; mean CCA per layer averaged over the twin targets; error agreement against chance),
then gives each of the paper's three headline claims a verdict from a 95 % interval: supported, contradicted or
inconclusive. The paper's numbers are read from the shipped reference file (`paper_reference.py`); ours from the
study's own outputs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medtransfer.analysis.paired_statistics import t_interval
from medtransfer.layout import (
    GAIN_CORRELATION_FILE,
    PAIRED_FILE,
    PREDICTIONS_FILE,
    PRETRAINED_VS_PRETRAINED,
    RANDOM_VS_RANDOM,
    SIMILARITY_SUMMARY_FILE,
    SUMMARY_FOLDER,
)
from medtransfer.paper_reference import PaperResults, load_paper_results
from medtransfer.tables import read_table

SECTION_TITLE = "## Beside the paper (Juodelyte et al., TMLR 2024)"


@dataclass(frozen=True)
class Twins:
    """Our names for the paper's: target -> paper target, source -> paper source (only those that name one)."""

    targets: Mapping[str, str]
    sources: Mapping[str, str]

    def ours(self, paper_source: str) -> list[str]:
        """Our sources that stand for `paper_source`, in a fixed order."""
        return sorted(name for name, twin in self.sources.items() if twin == paper_source)


@dataclass(frozen=True)
class Claim:
    statement: str
    verdict: str  # "supported", "contradicted", "inconclusive" or "not checked"
    evidence: str


def paper_section_for_study(config, pointers: Mapping[str, Sequence], analysis_root: Path) -> str | None:
    """The section for a study whose params name twins (`paper_target:` / `paper_source:`), else None.

    pointers: target -> its model pointers (each fold's test AUC); analysis_root: `results/analysis/`."""
    targets = {name: dataset.paper_target for name, dataset in config.datasets.items()
               if dataset.paper_target and name in pointers}
    sources = {name: source.paper_source for name, source in config.sources.items() if source.paper_source}
    if not targets and not sources:
        return None
    fold_aucs = {(pointer.dataset, pointer.source, pointer.regime): [fit.test_auc for fit in pointer.folds]
                 for target_pointers in pointers.values() for pointer in target_pointers}
    gain_file = config.resolve(SUMMARY_FOLDER) / GAIN_CORRELATION_FILE
    return paper_section(Twins(targets, sources), fold_aucs, {target: analysis_root / target for target in targets},
                         gain_rows=read_table(gain_file) if gain_file.is_file() else [])


def paper_section(twins: Twins, fold_aucs: Mapping[tuple[str, str, str], Sequence[float]],
                  analysis_folders: Mapping[str, Path], paper: PaperResults | None = None,
                  gain_rows: Sequence[Mapping[str, str]] = ()) -> str:
    """Markdown for the section. fold_aucs: (target, source, regime) -> each fold's test AUC (0–1);
    analysis_folders: target -> its `results/analysis/<target>/` folder (similarity summary, predictions, paired
    comparison); gain_rows: the study summary's pooled similarity-vs-gain correlations (`gain_correlation.csv`)."""
    paper = paper or load_paper_results()
    lines = [SECTION_TITLE, "", f"Reference: {paper.citation}", ""]
    targets = {ours: twin for ours, twin in twins.targets.items() if ours in analysis_folders}
    if not targets:
        lines.append("No target of this study names a twin among the paper's targets (`paper_target:` in its "
                     "dataset entry, one of " + ", ".join(paper.targets) + "), so there is nothing to set beside "
                     "the paper.")
        return "\n".join(lines)
    lines.append("Twins: " + "; ".join(f"target `{ours}` ↔ paper's {twin}" for ours, twin in targets.items())
                 + "; " + ("; ".join(f"source `{ours}` ↔ paper's {twin}" for ours, twin in sorted(twins.sources.items()))
                           or "no source names a `paper_source:`") + ".")
    lines += ["", *_auc_table(targets, twins, fold_aucs, paper)]
    summaries = {target: read_table(analysis_folders[target] / SIMILARITY_SUMMARY_FILE) for target in targets}
    cross_target = _cross_target_ours(summaries, twins, paper)
    lines += ["", *_cca_table(cross_target, len(targets), paper)]
    agreement = {target: _agreement_ours(read_table(analysis_folders[target] / PREDICTIONS_FILE), twins)
                 for target in targets}
    lines += ["", *_agreement_table(targets, agreement, paper)]
    lines += ["", *_gain_correlation_table(gain_rows, twins, paper)]
    paired = {target: read_table(analysis_folders[target] / PAIRED_FILE) for target in targets}
    excess = {target: _agreement_excess(read_table(analysis_folders[target] / PREDICTIONS_FILE), twins)
              for target in targets}
    claims = [_claim_imagenet_at_least_radimagenet(targets, twins, fold_aucs, paired),
              _claim_cca_at_or_below_floor(summaries, twins, paper),
              _claim_agreement_above_chance(agreement, excess)]
    lines += ["", "### The paper's claims, checked on this run", "",
              "Each verdict rests on a 95 % interval: *supported* when it lies wholly on the claim's side, "
              "*contradicted* when wholly on the other, *inconclusive* when it holds the boundary (0, or the floor) "
              "or none can be given (a single fold or target).", "",
              "| claim | this run | evidence |", "|---|---|---|"]
    lines += [f"| {claim.statement} | {claim.verdict} | {claim.evidence} |" for claim in claims]
    return "\n".join(lines)


# -- test AUC ------------------------------------------------------------------------------------------------------


def _auc_table(targets: Mapping[str, str], twins: Twins, fold_aucs, paper: PaperResults) -> list[str]:
    lines = ["### Test AUC ×100: ours, the paper's, the difference", "",
             "Ours: mean ± sd over this study's folds; the paper's: over its 5 folds. Difference: ours − paper's mean.",
             "", "| target | source | regime | ours | paper | difference |", "|---|---|---|---|---|---|"]
    rows = 0
    for target, paper_target in targets.items():
        for (auc_target, source, regime), aucs in sorted(fold_aucs.items()):
            reference = paper.test_auc.get((paper_target, twins.sources.get(source, ""), regime))
            finite = [100 * value for value in _finite(aucs)]
            if auc_target != target or reference is None or not finite:
                continue
            mean = statistics.fmean(finite)
            ours = f"{mean:.1f} ± {statistics.stdev(finite):.1f}" if len(finite) > 1 else f"{mean:.1f}"
            lines.append(f"| {target} ({paper_target}) | {source} ({twins.sources[source]}) | {regime} | {ours} | "
                         f"{reference[0]:.1f} ± {reference[1]:.1f} | {mean - reference[0]:+.1f} |")
            rows += 1
    if not rows:
        lines.append("| (no source of this study names a `paper_source:` the paper fine-tuned in these regimes) "
                     "| | | | | |")
    return lines


# -- mean CCA across targets -----------------------------------------------------------------------------------


def _matches(row: Mapping[str, str], kind: str, our_sources: Sequence[str], regime: str) -> bool:
    if row["pair_kind"] != kind or row["measure"] != "cca" or (row["regime"] or "") != regime:
        return False
    if kind == RANDOM_VS_RANDOM:
        return True  # the study's one random-vs-random pair, whatever its random sources are named
    return sorted(row["pair"].split(" vs ")) == sorted(our_sources)


def _cross_target_ours(summaries: Mapping[str, list[dict[str, str]]], twins: Twins,
                       paper: PaperResults) -> dict[str, tuple[list[float], int]]:
    """Paper pair title -> (our mean CCA per paper layer, averaged over the twin targets that have the pair; the
    number of those targets). Pairs whose sources have no twin here are left out."""
    ours: dict[str, tuple[list[float], int]] = {}
    for pair in paper.cross_target_cca:
        if pair.kind == RANDOM_VS_RANDOM:
            names: list[str] = []
        else:
            picks = [twins.ours(source) for source in pair.sources]
            if any(not pick for pick in picks):
                continue
            names = [pick[0] for pick in picks]
        per_layer: dict[str, list[float]] = {layer: [] for layer in paper.layers}
        targets_with_pair = 0
        for rows in summaries.values():
            found = {row["layer"]: float(row["mean"]) for row in rows if _matches(row, pair.kind, names, pair.regime)}
            if found:
                targets_with_pair += 1
            for layer in paper.layers:
                if layer in found and math.isfinite(found[layer]):
                    per_layer[layer].append(found[layer])
        if targets_with_pair:
            ours[pair.title] = ([statistics.fmean(v) if v else math.nan for v in per_layer.values()], targets_with_pair)
    return ours


def _cca_table(ours: Mapping[str, tuple[list[float], int]], targets: int, paper: PaperResults) -> list[str]:
    lines = ["### Mean CCA per layer, averaged over targets: ours / the paper's", "",
             f"Ours over this study's {targets} twin target(s), each the mean over its folds; the paper's over its "
             f"{len(paper.targets)} targets (64 sampled channels, 5 repeats). Each cell: ours / paper's.", "",
             "| pair | targets | " + " | ".join(paper.layers) + " |", "|---|---|" + "---|" * len(paper.layers)]
    for pair in paper.cross_target_cca:
        if pair.title not in ours:
            lines.append(f"| {pair.title} | – | " + " | ".join(f"– / {value:.2f}" for value in pair.values) + " |")
            continue
        values, count = ours[pair.title]
        cells = [f"{_fmt(mine)} / {theirs:.2f}" for mine, theirs in zip(values, pair.values)]
        lines.append(f"| {pair.title} | {count} | " + " | ".join(cells) + " |")
    return lines


# -- error agreement ---------------------------------------------------------------------------------------------


def _agreement_ours(rows: list[dict[str, str]], twins: Twins) -> tuple[float, float] | None:
    """(observed, chance) error agreement of our ImageNet and RadImageNet twins fine-tuned in `full`, mean over
    folds; None when the study has no such pair."""
    imagenet, radimagenet = twins.ours("imagenet"), twins.ours("radimagenet")
    if not imagenet or not radimagenet:
        return None
    wanted = sorted([imagenet[0], radimagenet[0]])
    selected = [row for row in rows if row["regime"] == "full" and sorted(row["pair"].split(" vs ")) == wanted]
    if not selected:
        return None
    return (statistics.fmean(float(row["error_agreement"]) for row in selected),
            statistics.fmean(float(row["error_agreement_chance"]) for row in selected))


def _agreement_excess(rows: list[dict[str, str]], twins: Twins) -> list[float]:
    """Per fold: error agreement − its chance level of our ImageNet and RadImageNet twins in `full`."""
    imagenet, radimagenet = twins.ours("imagenet"), twins.ours("radimagenet")
    if not imagenet or not radimagenet:
        return []
    wanted = sorted([imagenet[0], radimagenet[0]])
    return [_float(row["error_agreement"]) - _float(row["error_agreement_chance"]) for row in rows
            if row["regime"] == "full" and sorted(row["pair"].split(" vs ")) == wanted]


def _agreement_table(targets: Mapping[str, str], agreement, paper: PaperResults) -> list[str]:
    lines = ["### Error agreement of the ImageNet and RadImageNet models (no freezing): observed / chance", "",
             "The two chance levels differ in formula: ours is p₁p₂ + (1−p₁)(1−p₂) with each model's own accuracy; "
             "the paper's, as the authors computed it, uses the ImageNet model's accuracy for both models.", "",
             "| target | ours (own accuracies) | paper (ImageNet accuracy for both) |", "|---|---|---|"]
    for target, paper_target in targets.items():
        mine = agreement.get(target)
        theirs = paper.error_agreement.get(paper_target)
        lines.append(f"| {target} ({paper_target}) | {_pair(mine)} | {_pair(theirs)} |")
    return lines


# -- similarity vs gain ------------------------------------------------------------------------------------------


def _gain_correlation_table(rows: Sequence[Mapping[str, str]], twins: Twins, paper: PaperResults) -> list[str]:
    """Pearson r per layer of mean CCA to the source vs relative gain: ours pooled over every target of the study
    and its folds (regime full, each source its own r; twins or not, as the summary pools them) beside the
    authors' over their 7 targets × 5 folds."""
    if not paper.gain_correlation:
        return []
    targets = max((int(_float(row.get("targets"))) for row in rows if math.isfinite(_float(row.get("targets")))),
                  default=0)
    lines = ["### Similarity (mean CCA) to the source vs relative gain: Pearson r per source, ours / the authors'", "",
             f"Ours pooled over all {targets} target(s) of this study and their folds, twins of the paper's or not "
             "(fine-tuned without freezing; each gain over the random init of the same fold); the authors' over "
             "their 7 targets × 5 folds.", "",
             "| source | points | " + " | ".join(paper.layers) + " |", "|---|---|" + "---|" * len(paper.layers)]
    for paper_source, theirs in paper.gain_correlation.items():
        ours = twins.ours(paper_source)
        mine = {row["layer"]: row for row in rows if ours and row["source"] == ours[0]
                and row["regime"] == "full" and row["measure"] == "cca"}
        points = max((int(row["points"]) for row in mine.values()), default=0)
        cells = [f"{_fmt(_float(mine[layer]['pearson_r'])) if layer in mine else '–'} / {value:.2f}"
                 for layer, value in zip(paper.layers, theirs)]
        label = f"{ours[0]} ({paper_source})" if ours else f"– ({paper_source})"
        lines.append(f"| {label} | {points or '–'} | " + " | ".join(cells) + " |")
    return lines


# -- claims ------------------------------------------------------------------------------------------------------
#
# Three-way verdicts, each on a 95 % interval of a quantity the claim says is positive: supported when the whole
# interval lies above 0, contradicted when it lies below, inconclusive when it holds 0 (or no interval can be
# given: one fold, one target). A point estimate alone never decides a claim.

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_CHECKED = "supported", "contradicted", "inconclusive", "not checked"


def verdict(low: float, high: float) -> str:
    """The verdict on "the quantity is positive" from its interval [low, high]."""
    if math.isfinite(low) and low > 0:
        return SUPPORTED
    if math.isfinite(high) and high < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def combined_verdict(verdicts: Sequence[str]) -> str:
    """A claim made for every target (or stage): contradicted by any, supported only by all."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return SUPPORTED if verdicts and all(item == SUPPORTED for item in verdicts) else INCONCLUSIVE


def _claim_imagenet_at_least_radimagenet(targets, twins: Twins, fold_aucs, paired) -> Claim:
    statement = "ImageNet initialisation matches or beats RadImageNet on every target (no freezing)"
    imagenet, radimagenet = twins.ours("imagenet"), twins.ours("radimagenet")
    if not imagenet or not radimagenet:
        return Claim(statement, NOT_CHECKED, "needs a source naming `paper_source: imagenet` and one naming "
                                             "`paper_source: radimagenet`")
    findings, verdicts = [], []
    for target in targets:
        a = _finite(fold_aucs.get((target, imagenet[0], "full"), ()))
        b = _finite(fold_aucs.get((target, radimagenet[0], "full"), ()))
        if not a or not b:
            findings.append(f"{target}: not fine-tuned in full")
            continue
        difference = statistics.fmean(a) - statistics.fmean(b)
        low, high = _paired_interval(paired.get(target, []), imagenet[0], radimagenet[0])
        verdicts.append(verdict(low, high))
        interval = f"95 % interval {100 * low:+.1f} to {100 * high:+.1f}" if math.isfinite(high) else "no interval"
        findings.append(f"{target}: ImageNet − RadImageNet {100 * difference:+.1f} ({interval}; {verdicts[-1]})")
    if not verdicts:
        return Claim(statement, NOT_CHECKED, "; ".join(findings))
    return Claim(statement, combined_verdict(verdicts), "; ".join(findings) + " (AUC ×100; an interval holding 0 "
                                                                              "cannot tell the sources apart)")


def _paired_interval(rows: list[dict[str, str]], imagenet: str, radimagenet: str) -> tuple[float, float]:
    """The 95 % interval of ImageNet − RadImageNet from the paired comparison table (regime full)."""
    for row in rows:
        if row["regime"] != "full":
            continue
        if (row["source_a"], row["source_b"]) == (imagenet, radimagenet):
            return _float(row["low"]), _float(row["high"])
        if (row["source_a"], row["source_b"]) == (radimagenet, imagenet):
            return -_float(row["high"]), -_float(row["low"])
    return math.nan, math.nan


def _claim_cca_at_or_below_floor(summaries: Mapping[str, list[dict[str, str]]], twins: Twins,
                                 paper: PaperResults) -> Claim:
    """Per stage from stage 1 on: floor − pretrained mean CCA must be ≥ 0. One target: the pretrained pair's own
    interval (over folds, or channel draws) against the floor's mean; several: a t interval over the targets of
    each target's difference."""
    statement = "ImageNet and RadImageNet representations are at or below the random-vs-random floor from stage 1 on"
    imagenet, radimagenet = twins.ours("imagenet"), twins.ours("radimagenet")
    if not imagenet or not radimagenet:
        return Claim(statement, NOT_CHECKED, "needs sources naming `paper_source: imagenet` and `radimagenet`")
    names = [imagenet[0], radimagenet[0]]
    per_layer: dict[str, list[tuple[float, float, float, float]]] = {}
    for rows in summaries.values():
        pretrained = {row["layer"]: row for row in rows if _matches(row, PRETRAINED_VS_PRETRAINED, names, "")}
        floor = {row["layer"]: row for row in rows if _matches(row, RANDOM_VS_RANDOM, [], "")}
        for layer in list(paper.layers)[1:]:
            if layer in pretrained and layer in floor:
                mine, level = pretrained[layer], floor[layer]
                per_layer.setdefault(layer, []).append((_float(mine["mean"]), _float(mine.get("ci_low")),
                                                        _float(mine.get("ci_high")), _float(level["mean"])))
    if not any(floor for floor in per_layer.values()):
        return Claim(statement, NOT_CHECKED, "needs the pretrained pair and two random sources (the random-vs-random "
                                             "floor) in the similarity tables")
    verdicts, evidence = [], []
    for layer, values in per_layer.items():
        usable = [v for v in values if math.isfinite(v[0]) and math.isfinite(v[3])]
        if not usable:
            continue
        if len(usable) == 1:
            mean, low, high, level = usable[0]
            low_diff, high_diff = level - high, level - low  # floor − pretrained
            what = f"{mean:.2f} [{_fmt(low)}, {_fmt(high)}] vs floor {level:.2f}"
        else:
            differences = [level - mean for mean, _, _, level in usable]
            centre = statistics.fmean(differences)
            low_diff, high_diff = t_interval(centre, statistics.stdev(differences), len(differences))
            what = (f"floor − pretrained {centre:+.2f} [{_fmt(low_diff)}, {_fmt(high_diff)}] over "
                    f"{len(differences)} targets")
        verdicts.append(verdict(low_diff, high_diff))
        evidence.append(f"{layer} {what} ({verdicts[-1]})")
    if not verdicts:
        return Claim(statement, NOT_CHECKED, "no stage from stage 1 on has both values")
    return Claim(statement, combined_verdict(verdicts), "; ".join(evidence) + " (mean CCA, 95 % intervals)")


def _claim_agreement_above_chance(agreement: Mapping[str, tuple[float, float] | None],
                                  excess: Mapping[str, list[float]]) -> Claim:
    """Error agreement − chance must be > 0 on every target: a t interval over each target's folds."""
    statement = "The ImageNet and RadImageNet models' errors agree more often than chance"
    known = {target: pair for target, pair in agreement.items() if pair is not None}
    if not known:
        return Claim(statement, NOT_CHECKED, "needs fine-tuned ImageNet and RadImageNet twins in regime full")
    verdicts, evidence = [], []
    for target, (observed, chance) in known.items():
        values = _finite(excess.get(target, []))
        low, high = (t_interval(statistics.fmean(values), statistics.stdev(values), len(values))
                     if len(values) > 1 else (math.nan, math.nan))
        verdicts.append(verdict(low, high))
        interval = f"excess 95 % interval {low:+.2f} to {high:+.2f}" if math.isfinite(high) else "one fold: no interval"
        evidence.append(f"{target}: {observed:.2f} vs chance {chance:.2f} ({interval}; {verdicts[-1]})")
    return Claim(statement, combined_verdict(verdicts), "; ".join(evidence))


def _finite(values: Sequence[float | None]) -> list[float]:
    return [value for value in values if value is not None and math.isfinite(value)]


def _pair(values: tuple[float, float] | None) -> str:
    return "–" if values is None else f"{values[0]:.2f} / {values[1]:.2f}"


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "–"
