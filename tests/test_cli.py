"""The `medtransfer` command as a user runs it: exit codes and one-line errors, whatever the subcommand."""

from __future__ import annotations

import json

import numpy as np

from medtransfer import __version__


def test_version_and_help(cli):
    assert cli("--version").stdout.strip() == f"medtransfer {__version__}"
    result = cli("--help")
    assert result.returncode == 0
    for command in ("prepare", "demo-data", "download", "profile", "similarity"):
        assert command in result.stdout


def test_usage_errors_are_one_line_with_exit_2(cli):
    for args in (["frobnicate"], ["prepare"], ["similarity", "only-one.npy"]):
        result = cli(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_similarity_command_end_to_end(cli, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "y.npy", x @ rng.standard_normal((8, 8)) + 5.0)  # an invertible linear map plus a shift
    result = cli("similarity", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--json")
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert abs(values["cca"] - 1.0) < 1e-6 and values["n"] == 2000 and values["p_kept"] == 8


def test_similarity_command_bad_inputs(cli, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 3)))
    np.save(tmp_path / "short.npy", np.zeros((9, 3)))
    (tmp_path / "text.npy").write_text("hello")
    cases = {
        ("x.npy", "short.npy"): "row",
        ("x.npy", "missing.npy"): "missing.npy",
        ("x.npy", "text.npy"): "text.npy",
    }
    for (left, right), expected in cases.items():
        result = cli("similarity", str(tmp_path / left), str(tmp_path / right))
        assert result.returncode == 2, (left, right)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


def test_an_empty_trials_means_params_yaml_and_a_bad_one_is_one_line(cli):
    """MLproject entry points always pass their parameters: `search` gets `--trials ''` when the user gave none."""
    from medtransfer.cli import build_parser

    search = ["search", "--dataset", "d", "--source", "s", "--trials"]
    assert build_parser().parse_args([*search, ""]).trials is None
    assert build_parser().parse_args([*search, "3"]).trials == 3
    for bad, message in (("0", "must be at least 1, got 0"), ("four", "expected a whole number, got 'four'")):
        result = cli(*search, bad)
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert "--trials" in line and message in line, line


def test_an_unknown_architecture_exits_2_with_one_line_naming_close_matches(cli, write_params):
    params = write_params({"x": {"format": "medmnist", "path": "x.npz", "classes": ["a", "b"]}},
                          sources={"s": {"kind": "random", "arch": "convnext_ato", "seed": 0}})
    result = cli("--params", str(params), "source", "--name", "s")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "unknown architecture 'convnext_ato'" in line and "sources.s.arch" in line and "convnext_atto" in line
