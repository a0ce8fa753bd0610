"""Which models the study runs and which pairs it compares, from pointers alone."""

from __future__ import annotations

from collections import Counter

from medtransfer.analysis.pairs import (
    RandomSource,
    StudyModel,
    plan_pairs,
    prediction_pairs,
    random_baseline_keys,
    required_activations,
    study_models,
)
from medtransfer.layout import (
    CONTROL_KINDS,
    FINETUNED_VS_FINETUNED,
    FINETUNED_VS_RANDOM_INIT,
    FOLD_TO_FOLD,
    IDENTITY,
    PAIR_KINDS,
    PRETRAINED_VS_PRETRAINED,
    PRETRAINED_VS_RANDOM,
    RANDOM_VS_RANDOM,
    SEED_TO_SEED,
    SHUFFLED,
    SOURCE_VS_FINETUNED,
)
from medtransfer.pointers import FoldModel, ModelPointer

RANDOM_SOURCES = [RandomSource("random", "source.random", "1", "r1"), RandomSource("random_b", "source.random_b", "1", "r2")]


def _pointer(source: str, regime: str, source_version: str, fits: list[tuple[int, int, str]]) -> ModelPointer:
    return ModelPointer(
        registered_model=f"target.{source}.{regime}", dataset="target", source=source, regime=regime,
        source_model=f"source.{source}", source_version=source_version, source_weights_sha256=f"w-{source}",
        data_fingerprint="d" * 64, study="s", champion_version=fits[0][2],
        folds=[FoldModel(fold, seed, version, f"run-{source}-{version}", f"h-{version}", f"fold{fold}", 0.8)
               for fold, seed, version in fits],
    )


def _study(with_random_pointer: bool = True, random_sources=RANDOM_SOURCES):
    pointers = [
        _pointer("natural", "full", "3", [(0, 0, "1"), (1, 0, "2"), (2, 0, "3"), (0, 1, "4")]),
        _pointer("medical", "full", "2", [(0, 0, "1"), (1, 0, "2"), (2, 0, "3")]),
        _pointer("natural", "freeze", "3", [(0, 0, "1"), (1, 0, "2"), (2, 0, "3")]),
    ]
    if with_random_pointer:
        pointers.append(_pointer("random", "full", "1", [(0, 0, "1"), (1, 0, "2"), (2, 0, "3")]))
    return study_models(pointers, random_sources)


def test_study_models_name_sources_random_sources_and_every_fit():
    models = _study()
    keys = [m.key for m in models]
    assert keys[:4] == ["source.medical.v2", "source.natural.v3", "source.random.v1", "source.random_b.v1"]
    roles = Counter(m.role for m in models)
    assert roles == {"source": 2, "random": 2, "finetuned": 4 + 3 + 3 + 3}
    natural = [m for m in models if m.registered_model == "target.natural.full"]
    assert [(m.fold, m.seed_index) for m in natural] == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert all(m.init_key == "source.natural.v3" for m in natural)
    assert all(m.random_init for m in models if m.source == "random")
    assert StudyModel.from_dict(natural[1].to_dict()) == natural[1]


def test_every_pair_kind_is_planned_per_fold():
    models = _study()
    pairs = plan_pairs(models, random_baseline_keys(RANDOM_SOURCES))
    assert {pair.kind for pair in pairs} == set(PAIR_KINDS)
    per_fold = Counter((pair.fold, pair.kind) for pair in pairs)
    for fold in (0, 1, 2):
        assert per_fold[(fold, SOURCE_VS_FINETUNED)] == 4  # natural full + freeze, medical, random
        assert per_fold[(fold, SHUFFLED)] == 4
        assert per_fold[(fold, PRETRAINED_VS_PRETRAINED)] == 1
        assert per_fold[(fold, FINETUNED_VS_FINETUNED)] == 1  # natural vs medical in 'full' only
        assert per_fold[(fold, PRETRAINED_VS_RANDOM)] == 2
        assert per_fold[(fold, FINETUNED_VS_RANDOM_INIT)] == 2  # no random-init pointer for 'freeze'
        assert per_fold[(fold, RANDOM_VS_RANDOM)] == 1
        assert per_fold[(fold, FOLD_TO_FOLD)] == 4
        assert per_fold[(fold, IDENTITY)] == 1
    assert per_fold[(0, SEED_TO_SEED)] == 1 and per_fold[(1, SEED_TO_SEED)] == 0
    before = next(p for p in pairs if p.kind == PRETRAINED_VS_PRETRAINED)
    assert (before.model_a, before.model_b, before.label, before.regime) == (
        "source.medical.v2", "source.natural.v3", "medical vs natural", "")
    floor = next(p for p in pairs if p.kind == RANDOM_VS_RANDOM)
    assert (floor.model_a, floor.model_b) == ("source.random.v1", "source.random_b.v1")
    assert all(p.shuffled == (p.kind == SHUFFLED) for p in pairs)
    identity = [p for p in pairs if p.kind == IDENTITY]
    assert all(p.model_a == p.model_b for p in identity)
    assert set(CONTROL_KINDS) <= set(PAIR_KINDS)


def test_one_identity_control_per_architecture():
    pointers = [
        _pointer("natural", "full", "3", [(0, 0, "1"), (1, 0, "2")]),
        _pointer("medical", "full", "2", [(0, 0, "1"), (1, 0, "2")]),
    ]
    one = plan_pairs(study_models(pointers, RANDOM_SOURCES, {"natural": "resnet18", "medical": "resnet18",
                                                               "random": "resnet18", "random_b": "resnet18"}),
                     random_baseline_keys(RANDOM_SOURCES))
    assert [(p.fold, p.model_a) for p in one if p.kind == IDENTITY] == [(0, "source.medical.v2"), (1, "source.medical.v2")]
    models = study_models(pointers, RANDOM_SOURCES, {"natural": "convnext_atto", "medical": "resnet18",
                                                     "random": "resnet18", "random_b": "vit_tiny_patch16_224"})
    assert {m.arch for m in models if m.source == "natural"} == {"convnext_atto"}  # fine-tuned models too
    two = plan_pairs(models, random_baseline_keys(RANDOM_SOURCES))
    identity = [(p.fold, p.model_a) for p in two if p.kind == IDENTITY]
    assert identity == [(fold, key) for fold in (0, 1) for key in ("source.medical.v2", "source.natural.v3",
                                                                  "source.random_b.v1")]
    assert all(p.model_a == p.model_b for p in two if p.kind == IDENTITY)


def test_each_architecture_with_two_random_sources_gets_its_own_random_floor():
    pointers = [_pointer("natural", "full", "3", [(0, 0, "1")])]
    randoms = [*RANDOM_SOURCES, RandomSource("random_c", "source.random_c", "1", "r3"),
               RandomSource("random_d", "source.random_d", "1", "r4")]
    archs = {"natural": "resnet18", "random": "resnet18", "random_b": "resnet18", "random_c": "convnext_atto",
             "random_d": "convnext_atto"}
    floors = [p for p in plan_pairs(study_models(pointers, randoms, archs), random_baseline_keys(randoms))
              if p.kind == RANDOM_VS_RANDOM]
    assert [(p.model_a, p.model_b) for p in floors] == [("source.random.v1", "source.random_b.v1"),
                                                        ("source.random_c.v1", "source.random_d.v1")]
    # one random source of an architecture: no floor of its own; the first two keep theirs whatever they are
    archs["random_d"] = "vit_tiny_patch16_224"
    floors = [p for p in plan_pairs(study_models(pointers, randoms, archs), random_baseline_keys(randoms))
              if p.kind == RANDOM_VS_RANDOM]
    assert [(p.model_a, p.model_b) for p in floors] == [("source.random.v1", "source.random_b.v1")]


def test_fold_to_fold_is_cyclic_on_the_first_folds_images():
    pairs = plan_pairs(_study(), random_baseline_keys(RANDOM_SOURCES))
    natural = [p for p in pairs if p.kind == FOLD_TO_FOLD and p.label == "natural" and p.regime == "full"]
    assert [(p.fold, p.model_a, p.model_b) for p in natural] == [
        (0, "target.natural.full.v1", "target.natural.full.v2"),
        (1, "target.natural.full.v2", "target.natural.full.v3"),
        (2, "target.natural.full.v3", "target.natural.full.v1"),
    ]
    needs = required_activations(pairs)
    assert needs["target.natural.full.v2"] == [0, 1]  # its own fold and the previous fold
    assert needs["target.natural.full.v4"] == [0]  # the second seed: only seed-to-seed on fold 0
    assert needs["source.natural.v3"] == [0, 1, 2]


def test_without_a_random_pointer_or_a_second_random_source():
    models = _study(with_random_pointer=False, random_sources=RANDOM_SOURCES[:1])
    kinds = {pair.kind for pair in plan_pairs(models, random_baseline_keys(RANDOM_SOURCES[:1]))}
    assert FINETUNED_VS_RANDOM_INIT not in kinds and RANDOM_VS_RANDOM not in kinds
    assert PRETRAINED_VS_RANDOM in kinds and SHUFFLED in kinds


def test_prediction_pairs_are_fine_tuned_primaries_of_different_sources():
    pairs = prediction_pairs(_study())
    assert {(p.fold, p.regime, p.label) for p in pairs} == {
        (fold, "full", label) for fold in (0, 1, 2)
        for label in ("medical vs natural", "medical vs random", "natural vs random")
    }
    assert all("v4" not in p.model_a + p.model_b for p in pairs)  # the second seed is not a primary
