"""Which models the study runs and which pairs it compares: pure functions of the pointers and the random sources.

`study_models` turns the model pointers of one dataset (plus the registered version of every source of kind
`random`, in params order) into the list of models `extract` runs. `plan_pairs` turns that list into the pairs
`compare` computes; `extract` calls it too, to know which models each fold's images must go through. Both sides
read the same list (extract writes it into the activations manifest), so they always agree.

Roles: `source` (a non-random pretraining source a pointer starts from), `random` (a source of kind random:
the random baselines, and the start of random-init fine-tuning) and `finetuned` (a fold fit of a pointer). Of
the fits of one fold, the first seed is the fold's *primary* model; further seeds only enter seed-to-seed pairs.

Pair kinds, each on the held-out images of one fold (`fold`), for every fold of the study:

=============================  ===========================================================================
`source_vs_finetuned`          each source (random ones too) vs its fine-tuned primary model, per regime
`pretrained_vs_pretrained`     two non-random sources against each other, before fine-tuning
`finetuned_vs_finetuned`       their fine-tuned primaries, same regime (after fine-tuning)
`pretrained_vs_random`         each non-random source vs the first random source (before)
`finetuned_vs_random_init`     each non-random fine-tuned primary vs the random-init fine-tuned primary of the
                               same regime (exists when a pointer starts from a random source)
`random_vs_random`             the first two random sources: the random-vs-random noise floor; and the first
                               two of each further architecture that has two
`fold_to_fold`                 same source and regime, the primary of fold j vs that of the next fold k
                               (cyclically, j → k = the following fold of the pointer), on fold j's images
`seed_to_seed`                 same source, regime and fold: the first seed's model vs each further seed's
`identity`                     control: the fold's first source against itself (every measure is 1), and
                               the first model of each further architecture against itself
`shuffled`                     control: each `source_vs_finetuned` pair with one side's images permuted (each
                               image's positions kept together): the shuffled-image noise floor
=============================  ===========================================================================

Fold-to-fold takes K cyclic pairs per pointer instead of all K(K−1)/2, so that each fine-tuned model is run on
two folds' images (its own and the previous fold's) rather than on all of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from medtransfer.analysis.activations import model_key
from medtransfer.layout import (
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

ROLE_SOURCE = "source"
ROLE_RANDOM = "random"
ROLE_FINETUNED = "finetuned"



@dataclass(frozen=True)
class StudyModel:
    """One registered model the study runs.

    init_key: for a fine-tuned model, the key of the source version it started from; None for sources.
    arch: the architecture, where the caller knows it (one identity control per architecture of the study).
    fold, seed, seed_index, regime: set for fine-tuned models only (seed_index 0 = the fold's primary fit).
    random_init: the model is, or started from, a source of kind random.
    """

    key: str
    registered_model: str
    version: str
    weights_sha256: str
    role: str
    source: str
    random_init: bool
    regime: str | None = None
    fold: int | None = None
    seed: int | None = None
    seed_index: int | None = None
    init_key: str | None = None
    run_id: str | None = None
    test_auc: float | None = None
    arch: str | None = None  # the source's architecture (a fine-tuned model keeps its source's)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> StudyModel:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RandomSource:
    """A source of kind random and the registered version its `default` alias names."""

    name: str
    registered_model: str
    version: str
    weights_sha256: str


@dataclass(frozen=True)
class Pair:
    """Two models compared on fold `fold`'s images. `label` says which (e.g. 'natural' or 'natural vs medical')."""

    kind: str
    label: str
    model_a: str
    model_b: str
    fold: int
    regime: str = ""
    shuffled: bool = False


def study_models(pointers: Sequence, random_sources: Sequence[RandomSource],
                 architectures: Mapping[str, str] | None = None) -> list[StudyModel]:
    """Every model of the study, sources first: the source version each pointer starts from, the `default`
    version of every random source, then each pointer's fold fits (ordered by fold, then seed).

    pointers: `pointers.ModelPointer`s of one dataset; random_sources: every source of kind random, in params order;
    architectures: {source name: arch} (params' `sources`), recorded on every model.
    """
    arch_of = dict(architectures or {})
    random_names = {source.name for source in random_sources}
    models: dict[str, StudyModel] = {}
    for source in random_sources:
        key = model_key(source.registered_model, source.version)
        models.setdefault(key, StudyModel(key, source.registered_model, str(source.version), source.weights_sha256,
                                          ROLE_RANDOM, source.name, True, arch=arch_of.get(source.name)))
    for pointer in sorted(pointers, key=lambda p: (p.source, p.regime)):
        key = model_key(pointer.source_model, pointer.source_version)
        is_random = pointer.source in random_names
        models.setdefault(key, StudyModel(key, pointer.source_model, str(pointer.source_version),
                                          pointer.source_weights_sha256, ROLE_RANDOM if is_random else ROLE_SOURCE,
                                          pointer.source, is_random, arch=arch_of.get(pointer.source)))
    sources = list(models.values())
    finetuned: list[StudyModel] = []
    for pointer in sorted(pointers, key=lambda p: (p.source, p.regime)):
        init = model_key(pointer.source_model, pointer.source_version)
        fits = sorted(pointer.folds, key=lambda f: (f.fold, f.seed))
        for fold in sorted({fit.fold for fit in fits}):
            for index, fit in enumerate(f for f in fits if f.fold == fold):
                key = model_key(pointer.registered_model, fit.version)
                finetuned.append(StudyModel(
                    key, pointer.registered_model, str(fit.version), fit.weights_sha256, ROLE_FINETUNED, pointer.source,
                    pointer.source in random_names, regime=pointer.regime, fold=int(fit.fold), seed=int(fit.seed),
                    seed_index=index, init_key=init, run_id=fit.run_id, test_auc=fit.test_auc,
                    arch=arch_of.get(pointer.source),
                ))
    sources.sort(key=lambda m: (m.role != ROLE_SOURCE, _random_rank(m, random_sources), m.source, int(m.version)))
    return sources + finetuned


def _random_rank(model: StudyModel, random_sources: Sequence[RandomSource]) -> int:
    names = [source.name for source in random_sources]
    return names.index(model.source) if model.source in names else len(names)


def random_baseline_keys(random_sources: Sequence[RandomSource]) -> list[str]:
    """Keys of the random sources' `default` versions, in params order: [0] is "the" random source, [0] vs [1]
    the random-vs-random baseline."""
    return [model_key(source.registered_model, source.version) for source in random_sources]


def study_folds(models: Sequence[StudyModel]) -> list[int]:
    return sorted({m.fold for m in models if m.role == ROLE_FINETUNED and m.fold is not None})


def plan_pairs(models: Sequence[StudyModel], random_baselines: Sequence[str]) -> list[Pair]:
    """The pairs the study compares (see the module docstring), in a fixed order: by fold, then kind.

    models: `study_models(...)`; random_baselines: `random_baseline_keys(...)` (keys present in `models`).
    """
    by_key = {m.key: m for m in models}
    baselines = [key for key in random_baselines if key in by_key]
    finetuned = [m for m in models if m.role == ROLE_FINETUNED]
    # (source, regime) → fold → fits ordered by seed_index
    groups: dict[tuple[str, str], dict[int, list[StudyModel]]] = {}
    for m in finetuned:
        groups.setdefault((m.source, m.regime or ""), {}).setdefault(int(m.fold), []).append(m)
    for folds in groups.values():
        for fits in folds.values():
            fits.sort(key=lambda m: m.seed_index or 0)
    regimes = sorted({regime for _, regime in groups})
    # The non-random sources that pointers start from, and (per regime) the random-init group.
    pretrained_keys = sorted(
        {m.init_key for m in finetuned if not m.random_init and m.init_key in by_key},
        key=lambda key: (by_key[key].source, int(by_key[key].version)),
    )
    random_names = [by_key[key].source for key in baselines]

    random_groups = [group for group, folds in groups.items() if any(m.random_init for fits in folds.values() for m in fits)]

    def random_init_group(regime: str) -> tuple[str, str] | None:
        """The random-init group of `regime`: the first random source (params order) with a pointer in it."""
        candidates = sorted(
            (group for group in random_groups if group[1] == regime),
            key=lambda group: (random_names.index(group[0]) if group[0] in random_names else len(random_names), group[0]),
        )
        return candidates[0] if candidates else None

    pairs: list[Pair] = []
    for fold in study_folds(models):
        primaries = {group: folds[fold][0] for group, folds in groups.items() if fold in folds}
        kind_pairs: dict[str, list[Pair]] = {kind: [] for kind in PAIR_KINDS}

        for (source, regime), model in sorted(primaries.items()):
            if model.init_key in by_key:
                kind_pairs[SOURCE_VS_FINETUNED].append(Pair(SOURCE_VS_FINETUNED, source, model.init_key, model.key, fold, regime))
                kind_pairs[SHUFFLED].append(Pair(SHUFFLED, source, model.init_key, model.key, fold, regime, shuffled=True))

        for key_a, key_b in itertools.combinations(pretrained_keys, 2):
            a, b = by_key[key_a], by_key[key_b]
            if a.source != b.source:
                kind_pairs[PRETRAINED_VS_PRETRAINED].append(
                    Pair(PRETRAINED_VS_PRETRAINED, f"{a.source} vs {b.source}", key_a, key_b, fold))

        for regime in regimes:
            here = [model for (source, r), model in sorted(primaries.items()) if r == regime and not model.random_init]
            for a, b in itertools.combinations(here, 2):
                if a.source != b.source:
                    kind_pairs[FINETUNED_VS_FINETUNED].append(
                        Pair(FINETUNED_VS_FINETUNED, f"{a.source} vs {b.source}", a.key, b.key, fold, regime))
            reference_group = random_init_group(regime)
            reference = primaries.get(reference_group) if reference_group else None
            if reference is not None:
                for model in here:
                    kind_pairs[FINETUNED_VS_RANDOM_INIT].append(Pair(
                        FINETUNED_VS_RANDOM_INIT, f"{model.source} vs {reference.source}", model.key, reference.key,
                        fold, regime))

        if baselines:
            first_random = by_key[baselines[0]]
            for key in pretrained_keys:
                kind_pairs[PRETRAINED_VS_RANDOM].append(
                    Pair(PRETRAINED_VS_RANDOM, f"{by_key[key].source} vs {first_random.source}", key, first_random.key, fold))
        if len(baselines) >= 2:
            a, b = by_key[baselines[0]], by_key[baselines[1]]
            kind_pairs[RANDOM_VS_RANDOM].append(Pair(RANDOM_VS_RANDOM, f"{a.source} vs {b.source}", a.key, b.key, fold))
            # each further architecture with two random sources: its own floor (the first two of it, params order)
            covered = {a.arch} if a.arch == b.arch else set()
            for arch in dict.fromkeys(by_key[key].arch for key in baselines):
                same = [by_key[key] for key in baselines if by_key[key].arch == arch]
                if arch is not None and arch not in covered and len(same) >= 2:
                    kind_pairs[RANDOM_VS_RANDOM].append(Pair(
                        RANDOM_VS_RANDOM, f"{same[0].source} vs {same[1].source}", same[0].key, same[1].key, fold))

        for (source, regime), folds in sorted(groups.items()):
            order = sorted(folds)
            if fold in folds and len(order) >= 2:
                following = order[(order.index(fold) + 1) % len(order)]
                kind_pairs[FOLD_TO_FOLD].append(
                    Pair(FOLD_TO_FOLD, source, folds[fold][0].key, folds[following][0].key, fold, regime))
            for other in folds.get(fold, [])[1:]:
                kind_pairs[SEED_TO_SEED].append(Pair(SEED_TO_SEED, source, folds[fold][0].key, other.key, fold, regime))

        identity_key = next(iter(pretrained_keys), None) or next(iter(baselines), None)
        if identity_key is None and primaries:
            identity_key = next(iter(sorted(primaries.items())))[1].key
        if identity_key is not None:
            kind_pairs[IDENTITY].append(Pair(IDENTITY, by_key[identity_key].source, identity_key, identity_key, fold))
            # one more per further architecture: its first source (or random source, or fine-tuned primary)
            covered = {by_key[identity_key].arch}
            for key in [*pretrained_keys, *baselines, *(model.key for _, model in sorted(primaries.items()))]:
                if by_key[key].arch not in covered:
                    covered.add(by_key[key].arch)
                    kind_pairs[IDENTITY].append(Pair(IDENTITY, by_key[key].source, key, key, fold))
        for kind in PAIR_KINDS:
            pairs.extend(kind_pairs[kind])
    return pairs


def required_activations(pairs: Sequence[Pair]) -> dict[str, list[int]]:
    """{model key: the folds whose images it must be run on} for `pairs`."""
    needed: dict[str, set[int]] = {}
    for pair in pairs:
        needed.setdefault(pair.model_a, set()).add(pair.fold)
        needed.setdefault(pair.model_b, set()).add(pair.fold)
    return {key: sorted(folds) for key, folds in needed.items()}


def prediction_pairs(models: Sequence[StudyModel]) -> list[Pair]:
    """Pairs of fine-tuned primaries of different sources, same fold and regime, for prediction similarity
    (random-init fine-tuned models included). Kind: `finetuned_vs_finetuned`."""
    primaries = sorted(
        (m for m in models if m.role == ROLE_FINETUNED and (m.seed_index or 0) == 0),
        key=lambda m: (m.fold, m.regime or "", m.random_init, m.source),
    )
    pairs = []
    for (fold, regime), group in itertools.groupby(primaries, key=lambda m: (m.fold, m.regime or "")):
        for a, b in itertools.combinations(list(group), 2):
            if a.source != b.source:
                pairs.append(Pair(FINETUNED_VS_FINETUNED, f"{a.source} vs {b.source}", a.key, b.key, int(fold), regime))
    return pairs
