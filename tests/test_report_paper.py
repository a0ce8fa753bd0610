"""The report's comparison with the paper: numbers from the shipped reference file, ours from the study's tables,
each claim's verdict from those numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from medtransfer.paper_reference import REFERENCE_FILE, ReferenceError, load_paper_results
from medtransfer.report_paper import Twins, paper_section
from medtransfer.tables import write_table

SUMMARY_COLUMNS = ["pair_kind", "pair", "regime", "layer", "measure", "mean", "sd", "ci_low", "ci_high"]
PREDICTION_COLUMNS = ["pair", "fold", "regime", "error_agreement", "error_agreement_chance"]
PAIRED_COLUMNS = ["regime", "source_a", "source_b", "mean_difference", "low", "high"]
LAYERS = ["stem", "stage1", "stage2", "stage3", "stage4"]
TWINS = Twins(targets={"busi": "breast"}, sources={"inet": "imagenet", "rad": "radimagenet", "rnd": "random"})


def test_the_shipped_reference_holds_the_papers_tables():
    paper = load_paper_results()
    assert paper.targets == ("thyroid", "breast", "chest", "mammograms", "knee", "isic", "pcam_small")
    assert "Transactions on Machine Learning Research" in paper.citation
    # 7 targets × (ImageNet, RadImageNet) × (full, freeze) + random init without freezing
    assert len(paper.test_auc) == 7 * 5
    assert {pair.kind for pair in paper.cross_target_cca} >= {"source_vs_finetuned", "pretrained_vs_pretrained",
                                                             "finetuned_vs_finetuned", "random_vs_random"}
    assert set(paper.error_agreement) == set(paper.targets)
    assert all(0 < chance < 1 and 0 < observed <= 1 for observed, chance in paper.error_agreement.values())


def test_a_malformed_reference_is_refused_naming_the_entry(tmp_path):
    data = yaml.safe_load(REFERENCE_FILE.read_text())
    data["test_auc"]["breast"]["imagenet full"] = [90.5]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(ReferenceError, match=r"test_auc\.breast\.imagenet full must hold 2 numbers"):
        load_paper_results(broken)


def _reference_with(tmp_path: Path, breast_imagenet: list[float], floor: list[float], agreement: dict) -> Path:
    """The shipped reference with a few numbers replaced: the section must print these, not the paper's."""
    data = yaml.safe_load(REFERENCE_FILE.read_text())
    data["test_auc"]["breast"]["imagenet full"] = breast_imagenet
    for row in data["cross_target_cca"]:
        if row["kind"] == "random_vs_random":
            row["values"] = floor
    data["error_agreement"]["breast"] = agreement
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def _analysis_folder(tmp_path: Path, pretrained: list[float], floor: list[float], agreement: list[tuple[float, float]],
                     paired: tuple[float, float, float]) -> Path:
    folder = tmp_path / "analysis" / "busi"
    folder.mkdir(parents=True)
    rows = []
    for layer, value, level in zip(LAYERS, pretrained, floor):
        rows.append({"pair_kind": "pretrained_vs_pretrained", "pair": "inet vs rad", "regime": "", "layer": layer,
                     "measure": "cca", "mean": value, "sd": 0.01, "ci_low": value - 0.05, "ci_high": value + 0.05})
        rows.append({"pair_kind": "pretrained_vs_pretrained", "pair": "inet vs rad", "regime": "", "layer": layer,
                     "measure": "cka", "mean": 0.99, "sd": 0.01})  # another measure: must not be read as CCA
        rows.append({"pair_kind": "random_vs_random", "pair": "rnd vs rnd_b", "regime": "", "layer": layer,
                     "measure": "cca", "mean": level, "sd": 0.01})
    write_table(folder / "similarity_summary.csv", SUMMARY_COLUMNS, rows)
    write_table(folder / "predictions.csv", PREDICTION_COLUMNS,
                [{"pair": "inet vs rad", "fold": fold, "regime": "full", "error_agreement": observed,
                  "error_agreement_chance": chance} for fold, (observed, chance) in enumerate(agreement)]
                + [{"pair": "inet vs rnd", "fold": 0, "regime": "full", "error_agreement": 0.1,
                    "error_agreement_chance": 0.9}])  # a pair without a paper twin: not read
    mean, low, high = paired
    write_table(folder / "paired_comparison.csv", PAIRED_COLUMNS,
                [{"regime": "full", "source_a": "inet", "source_b": "rad", "mean_difference": mean, "low": low,
                  "high": high}])
    return folder


def _claims(section: str) -> dict[str, str]:
    table = section[section.index("### The paper's claims"):]
    return {cells[0].removeprefix("| "): cells[1] for cells in (line.split(" | ") for line in table.splitlines() if line.startswith("| ")
                                             and "---" not in line and not line.startswith("| claim"))}


def test_ours_theirs_and_the_difference_come_from_the_tables_and_the_reference_file(tmp_path):
    floor = [0.5, 0.4, 0.4, 0.4, 0.4]
    reference = load_paper_results(_reference_with(tmp_path, [77.7, 3.3], [0.61, 0.52, 0.43, 0.34, 0.25],
                                                   {"observed": 0.81, "chance": 0.71}))
    folder = _analysis_folder(tmp_path, pretrained=[0.6, 0.3, 0.3, 0.2, 0.2], floor=floor,
                              agreement=[(0.8, 0.6), (0.9, 0.7)], paired=(0.05, 0.01, 0.11))
    fold_aucs = {("busi", "inet", "full"): [0.80, 0.90], ("busi", "rad", "full"): [0.75, 0.85],
                 ("busi", "rnd", "full"): [0.50, 0.60], ("busi", "inet", "linear"): [0.7, 0.7]}
    section = paper_section(TWINS, fold_aucs, {"busi": folder}, paper=reference)
    # ImageNet: ours 85.0 ± 7.1 (sd of 80 and 90), the file's 77.7 ± 3.3, difference +7.3
    assert "| busi (breast) | inet (imagenet) | full | 85.0 ± 7.1 | 77.7 ± 3.3 | +7.3 |" in section
    assert "| busi (breast) | rnd (random) | full | 55.0 ± 7.1 | 51.2 ± 10.0 | +3.8 |" in section
    assert "linear" not in section.split("### Mean CCA")[0]  # the paper has no linear regime
    # one target, so the cross-target mean is the target's mean; the floor row pairs ours with the file's values
    assert "| random vs random | 1 | 0.50 / 0.61 | 0.40 / 0.52 | 0.40 / 0.43 | 0.40 / 0.34 | 0.40 / 0.25 |" in section
    assert "| ImageNet vs RadImageNet (pretrained) | 1 | 0.60 / 0.56 |" in section
    assert "| ImageNet-FT vs ImageNet | – | – / 0.89 |" in section  # no fine-tuned-vs-source rows here
    # error agreement: mean over the two folds, (0.85, 0.65), beside the file's
    assert "| busi (breast) | 0.85 / 0.65 | 0.81 / 0.71 |" in section
    claims = _claims(section)
    assert list(claims.values()) == ["supported", "supported", "supported"]


def test_each_claim_is_contradicted_when_its_interval_lies_on_the_other_side(tmp_path):
    # agreement below chance on every fold: excess −0.10, −0.09, −0.11, t interval (2 df) wholly below 0
    folder = _analysis_folder(tmp_path, pretrained=[0.6, 0.5, 0.3, 0.2, 0.2], floor=[0.5, 0.4, 0.4, 0.4, 0.4],
                              agreement=[(0.6, 0.7), (0.61, 0.7), (0.59, 0.7)], paired=(-0.1, -0.15, -0.05))
    fold_aucs = {("busi", "inet", "full"): [0.70, 0.80], ("busi", "rad", "full"): [0.80, 0.90]}
    section = paper_section(TWINS, fold_aucs, {"busi": folder})
    claims = _claims(section)
    assert list(claims.values()) == ["contradicted", "contradicted", "contradicted"]
    # the stage above its floor is named with its interval and the floor
    assert "stage1 0.50 [0.45, 0.55] vs floor 0.40 (contradicted)" in section
    assert "busi: ImageNet − RadImageNet -10.0 (95 % interval -15.0 to -5.0; contradicted)" in section


def test_a_negative_difference_whose_interval_holds_zero_is_inconclusive(tmp_path):
    """RadImageNet ahead by 2.0 with an interval from −8.0 to +4.0: neither a tie that supports the claim nor a
    contradiction; one fold of agreement gives no interval; the floor inside the pretrained interval decides nothing."""
    folder = _analysis_folder(tmp_path, pretrained=[0.6] * 5, floor=[0.62] * 5, agreement=[(0.9, 0.5)],
                              paired=(-0.02, -0.08, 0.04))
    fold_aucs = {("busi", "inet", "full"): [0.78, 0.80], ("busi", "rad", "full"): [0.80, 0.82]}
    section = paper_section(TWINS, fold_aucs, {"busi": folder})
    assert "busi: ImageNet − RadImageNet -2.0 (95 % interval -8.0 to +4.0; inconclusive)" in section
    assert list(_claims(section).values()) == ["inconclusive", "inconclusive", "inconclusive"]


def test_verdicts_follow_the_interval_alone():
    from medtransfer.report_paper import combined_verdict, verdict

    assert verdict(0.01, 0.3) == "supported" and verdict(-0.3, -0.01) == "contradicted"
    assert verdict(-0.01, 0.3) == verdict(-0.3, 0.01) == verdict(math.nan, math.nan) == "inconclusive"
    assert combined_verdict(["supported", "supported"]) == "supported"
    assert combined_verdict(["supported", "inconclusive"]) == "inconclusive"
    assert combined_verdict(["supported", "contradicted", "inconclusive"]) == "contradicted"
    assert combined_verdict([]) == "inconclusive"


def test_without_twins_the_section_says_so_and_checks_nothing(tmp_path):
    section = paper_section(Twins(targets={}, sources={}), {}, {"demo": tmp_path})
    assert "No target of this study names a twin" in section and "claims" not in section
    folder = _analysis_folder(tmp_path, pretrained=[0.6] * 5, floor=[0.5] * 5, agreement=[(0.9, 0.5)],
                              paired=(0.0, -0.1, 0.1))
    no_sources = paper_section(Twins(targets={"busi": "breast"}, sources={}), {}, {"busi": folder})
    assert list(_claims(no_sources).values()) == ["not checked"] * 3


def test_the_authors_pooled_gain_r_stands_beside_ours_per_source_and_layer(tmp_path):
    paper = load_paper_results()
    assert paper.gain_correlation["imagenet"] == (-0.16, -0.03, -0.07, -0.10, -0.13)
    assert paper.gain_correlation["radimagenet"] == (-0.15, -0.45, -0.43, -0.56, -0.47)
    folder = _analysis_folder(tmp_path, pretrained=[0.6] * 5, floor=[0.5] * 5, agreement=[(0.9, 0.5)],
                              paired=(0.0, -0.1, 0.1))
    rows = [{"source": source, "regime": regime, "layer": layer, "measure": measure, "points": "10", "targets": "2",
             "pearson_r": repr(r)}
            for source, base in (("inet", -0.2), ("rad", -0.5)) for regime in ("full", "freeze")
            for index, layer in enumerate(LAYERS) for measure, r in (("cca", base + 0.01 * index + (regime == "freeze")),
                                                                       ("cka", 0.9))]
    section = paper_section(TWINS, {}, {"busi": folder}, paper=paper, gain_rows=rows)
    table = section.split("### Similarity (mean CCA) to the source vs relative gain")[1]
    assert "Ours pooled over all 2 target(s) of this study" in table  # the summary's count, not the twins
    # ours: regime full and mean CCA only (the freeze rows and the CKA rows hold other values)
    assert "| inet (imagenet) | 10 | -0.20 / -0.16 | -0.19 / -0.03 | -0.18 / -0.07 | -0.17 / -0.10 | -0.16 / -0.13 |" in table
    assert "| rad (radimagenet) | 10 | -0.50 / -0.15 | -0.49 / -0.45 |" in table
