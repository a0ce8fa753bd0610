"""Which stage is compared with which: by name within an architecture, by reduction across, sizes checked."""

from __future__ import annotations

from medtransfer.analysis.stage_matching import (
    cross_architecture_matches,
    is_compared,
    model_stages,
    paired_layers,
    stage_match_rows,
)

RESNET = {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}
CONVNEXT = {"stages.0": 4, "stages.1": 8, "stages.2": 16, "stages.3": 32}
SIZES_32PX = {"stem": (16, 16), "stage1": (8, 8), "stage2": (4, 4), "stage3": (2, 2), "stage4": (1, 1),
              "stages.0": (8, 8), "stages.1": (4, 4), "stages.2": (2, 2), "stages.3": (1, 1)}


def _manifest(**models):
    return {"layers": list(RESNET), "models": {key: {"arch": arch, "stages": stages} for key, (arch, stages)
                                               in models.items()}}


def test_the_same_stages_pair_by_name_in_forward_order():
    assert paired_layers(RESNET, dict(RESNET), SIZES_32PX) == [(s, s) for s in RESNET]


def test_other_architectures_pair_by_reduction_and_a_size_mismatch_is_left_out():
    assert paired_layers(CONVNEXT, RESNET, SIZES_32PX) == [("stages.0", "stage1"), ("stages.1", "stage2"),
                                                            ("stages.2", "stage3"), ("stages.3", "stage4")]
    odd = {**SIZES_32PX, "stages.3": (0, 0)}  # a stem that rounds differently at an odd input size
    assert ("stages.3", "stage4") not in paired_layers(CONVNEXT, RESNET, odd)
    rows = stage_match_rows(_manifest(c=("convnext_atto", CONVNEXT), r=("resnet18", RESNET)), [("c", "r")], odd)
    mismatch = next(row for row in rows if row["stage_a"] == "stages.3")
    assert mismatch["stage_b"] == "stage4" and mismatch["status"].startswith("maps differ in size (0x0 vs 1x1)")
    assert not is_compared(mismatch)


def test_a_manifest_without_recorded_stages_reads_as_one_architecture():
    manifest = {"layers": list(RESNET), "models": {"a": {"arch": "resnet18"}, "b": {"arch": "resnet50"}}}
    assert list(model_stages(manifest, "a")) == list(RESNET)
    assert paired_layers(model_stages(manifest, "a"), model_stages(manifest, "b"), SIZES_32PX) == [(s, s) for s in RESNET]


def test_cross_architecture_summary_names_the_compared_and_the_lonely_stages_once_per_pairing():
    manifest = _manifest(c=("convnext_atto", CONVNEXT), c2=("convnext_atto", CONVNEXT), r=("resnet18", RESNET),
                         r2=("resnet18", RESNET))
    rows = stage_match_rows(manifest, [("c", "r"), ("c2", "r2"), ("r", "r2")], SIZES_32PX)
    assert len(rows) == 5 + 5  # convnext vs resnet once (4 pairs + the stem), resnet vs resnet once (by name)
    assert cross_architecture_matches(rows) == [
        ("convnext_atto", "resnet18", ["stages.0~stage1 (/4)", "stages.1~stage2 (/8)", "stages.2~stage3 (/16)",
                                       "stages.3~stage4 (/32)"], ["stem"])]
