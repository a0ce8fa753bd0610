"""Issue 33: every params value is checked once, at load, and the YAML reader is bounded before objects are built.

Each bad value must fail `load_config` with one line naming its key, not later in NumPy or after all training;
a hostile file (alias bomb, deep nesting, a recursive alias) must fail in time and memory proportional to the file.
"""

from __future__ import annotations

import pytest

from medtransfer.cli import main
from medtransfer.config import load_config
from medtransfer.config_rules import SIMILARITY_MEASURES
from medtransfer.config_yaml import MAX_DEPTH, MAX_EXPANDED_NODES
from medtransfer.errors import ConfigError

DATASET = {"format": "medmnist", "path": "data/raw/x.npz", "classes": ["a", "b"]}
HEADER = "project: {profile: t}\ndatasets:\n  x: {format: medmnist, path: a.npz, classes: [a, b]}\n"
RANDOM_SOURCE = {"kind": "random", "arch": "resnet18"}


def refusal(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = caught.value.one_line()
    assert str(path) in message and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"project": {"profile": "t", "seed": -1}}, "project.seed"),
        ({"project": {"profile": "t", "seed": 2**32}}, "project.seed"),
        ({"train": {"seed": -3}}, "train.seed"),
        ({"search": {"seed": -1}}, "search.seed"),
        ({"search": {"seeds": [0, -2]}}, "search.seeds[1]"),
        ({"analysis": {"seed": -1}}, "analysis.seed"),
        ({"sources": {"s": {**RANDOM_SOURCE, "seed": -7}}}, "sources.s.seed"),
        ({"sources": {"s": {"kind": "pretrained", "arch": "resnet18", "dataset": "x", "train": {"seed": -1}}}},
         "sources.s.train.seed"),
        ({"project": {"profile": "t", "seed": 1.5}}, "project.seed"),
        ({"analysis": {"channel_repeats": 0}}, "analysis.channel_repeats"),
        ({"analysis": {"channel_sample": -5}}, "analysis.channel_sample"),
        ({"analysis": {"measures": ["foo"]}}, "analysis.measures"),
        ({"analysis": {"measures": []}}, "analysis.measures"),
        ({"analysis": {"images": 0}}, "analysis.images"),
        ({"analysis": {"batch_size": 0}}, "analysis.batch_size"),
        ({"analysis": {"positions_per_layer": 0}}, "analysis.positions_per_layer"),
        ({"analysis": {"bootstrap_resamples": 0}}, "analysis.bootstrap_resamples"),
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
        ({"train": {"weight_decay": float("inf")}}, "train.weight_decay"),
        ({"search": {"space": {"learning_rate": {"type": "float", "low": 1e-5, "high": float("inf")}}}},
         "search.space.learning_rate.high"),
        ({"sources": {"s": {"kind": "random", "arch": "convnext_atto", "model_args": {"drop_rate": float("nan")}}}},
         "sources.s.model_args.drop_rate"),
    ],
)
def test_bad_values_are_refused_at_load_naming_their_key(write_params, sections, key):
    message = refusal(write_params({"x": dict(DATASET)}, **sections))
    assert f": {key}:" in message


def test_a_bad_split_seed_is_refused_at_load(write_params):
    message = refusal(write_params({"x": {**DATASET, "split": {"scheme": "stratified_kfold", "seed": -1}}}))
    assert "datasets.x.split.seed" in message and "got -1" in message


def test_edge_values_that_the_code_accepts_still_load(write_params):
    config = load_config(write_params({"x": dict(DATASET)}, analysis={
        "channel_sample": 0, "channel_repeats": 1, "images": None, "measures": ["cka"], "seed": 2**32 - 1}))
    assert config.analysis.measures == ["cka"] and config.analysis.seed == 2**32 - 1


def test_known_measures_match_the_analysis():
    # config_rules repeats the names to keep NumPy and SciPy out of every load; this keeps the copy honest.
    from medtransfer.analysis.similarity import ALL_MEASURES

    assert SIMILARITY_MEASURES == ALL_MEASURES


def _alias_bomb(levels: int = 10, width: int = 10) -> list[str]:
    """A list of `levels` anchors, each `width` aliases of the one before: width**(levels-1) leaves, 10**9 here,
    which would need gigabytes if anything expanded them."""
    lines = ["- &a0 [lol]"]
    lines += [f"- &a{level} [{', '.join([f'*a{level - 1}'] * width)}]" for level in range(1, levels)]
    return lines


def test_alias_bomb_in_a_string_setting_is_refused_before_expansion(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("project:\n  profile: t\n  description:\n" + "".join(f"    {line}\n" for line in _alias_bomb()))
    assert path.stat().st_size < 1024
    message = refusal(path)
    assert f"more than {MAX_EXPANDED_NODES:,} values" in message and "alias" in message


def test_alias_bomb_in_model_args_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    body = "".join(f"        {line}\n" for line in _alias_bomb())
    path.write_text(HEADER + "sources:\n  s:\n    kind: random\n    arch: convnext_atto\n    model_args:\n"
                    "      x:\n" + body)
    assert "expands to more than" in refusal(path)


def test_a_few_aliases_are_fine(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("project: {profile: t}\ndatasets:\n  x: &d {format: medmnist, path: a.npz, classes: &c [a, b]}\n"
                    "  y: {format: medmnist, path: b.npz, classes: *c}\n")
    assert load_config(path).dataset("y").classes == ["a", "b"]


@pytest.mark.parametrize("nesting", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000])
def test_deep_nesting_is_refused_in_one_line(tmp_path, nesting):
    path = tmp_path / "params.yaml"
    path.write_text(f"project: {{profile: t, description: {nesting}}}\n")
    assert f"more than {MAX_DEPTH} levels deep" in refusal(path)


def test_aliases_cannot_nest_deeper_than_the_file_reads(tmp_path):
    # 60 levels written out, then 60 more by aliasing it inside itself once: 120 levels once expanded.
    path = tmp_path / "params.yaml"
    path.write_text("project: {profile: t, description: [&d " + "[" * 60 + "]" * 60 + ", "
                    + "[" * 60 + "*d" + "]" * 60 + "]}\n")
    assert "levels deep" in refusal(path)


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("project: {profile: t, description: &r [*r]}\n")
    assert "refers to a node that contains it" in refusal(path)


def test_a_merge_key_with_an_override_loads_and_the_override_wins(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("project: {profile: t}\n"
                    "datasets:\n"
                    "  x: &base {format: medmnist, path: a.npz, classes: [a, b]}\n"
                    "  y:\n"
                    "    <<: *base\n"
                    "    path: b.npz\n")
    config = load_config(path)
    assert config.dataset("y").path == "b.npz" and config.dataset("y").classes == ["a", "b"]
    assert config.dataset("x").path == "a.npz"


def test_a_real_duplicate_key_is_still_refused_beside_a_merge_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("project: {profile: t}\n"
                    "datasets:\n"
                    "  x: &base {format: medmnist, path: a.npz, classes: [a, b]}\n"
                    "  y:\n"
                    "    <<: *base\n"
                    "    path: b.npz\n"
                    "    path: c.npz\n")
    assert "duplicate key 'path' at line 7" in refusal(path)


@pytest.mark.parametrize("timeout", ["nan", "-1", "0", "inf", "soon"])
def test_download_timeout_must_be_finite_and_positive(capsys, timeout):
    with pytest.raises(SystemExit) as exited:
        main(["download", "--subset", "breastmnist", "--timeout", timeout])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "--timeout" in error and repr(timeout) in error
