"""Tests of the `medtransfer similarity` command logic (run() called directly; one memory-limit case in a subprocess)."""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest

from medtransfer.analysis import similarity_command
from medtransfer.memory_budget import describe_shortfall
from medtransfer.analysis.similarity import ALL_MEASURES, compute_similarity
from medtransfer.analysis.similarity_command import add_arguments, run
from medtransfer.errors import InputError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medtransfer similarity")
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def make_pair(n=400, p=6, q=5, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = z @ rng.standard_normal((3, p)) + 0.5 * rng.standard_normal((n, p)) + 2.0
    y = z @ rng.standard_normal((3, q)) + 0.5 * rng.standard_normal((n, q)) - 1.0
    return x, y


@pytest.fixture
def pair_files(tmp_path):
    x, y = make_pair()
    xp, yp = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(xp, x.astype(np.float32))
    np.save(yp, y)
    return xp, yp, x.astype(np.float32).astype(np.float64), y


def test_json_output_matches_library(pair_files, capsys, monkeypatch):
    xp, yp, x, y = pair_files
    monkeypatch.setattr(similarity_command, "CHUNK_BYTES", 4 * 6 * 37)  # force many uneven chunks
    assert run(parse(xp, yp, "--json")) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    data = json.loads(out)
    ref = compute_similarity(x, y)
    for name in ALL_MEASURES:
        assert data[name] == pytest.approx(ref.value(name), abs=1e-12), name
    np.testing.assert_allclose(data["canonical_correlations"], ref.canonical_correlations, atol=1e-12)
    assert (data["n"], data["p"], data["q"], data["p_kept"], data["q_kept"]) == (400, 6, 5, 6, 5)
    assert data["reliable"] is True and data["warning"] is None


def test_json_only_requested_measures(pair_files, capsys):
    xp, yp, _, _ = pair_files
    run(parse(xp, yp, "--json", "--measures", "pwcca, cka"))
    data = json.loads(capsys.readouterr().out)
    assert set(ALL_MEASURES) & set(data) == {"pwcca", "cka"}


def test_table_output(pair_files, capsys):
    xp, yp, x, y = pair_files
    assert run(parse(xp, yp)) == 0
    out = capsys.readouterr().out
    ref = compute_similarity(x, y)
    lines = out.splitlines()
    assert lines[0].split() == ["measure", "value"]
    for name in ALL_MEASURES:
        line = next(line for line in lines if f"({name})" in line)
        assert float(line.split()[-1]) == pytest.approx(ref.value(name), abs=1e-6)
    assert any(line.split()[:2] == ["n", "400"] for line in lines)
    assert any(line.startswith("p_kept") and "6 of 6" in line for line in lines)
    assert any(line.startswith("q_kept") and "5 of 5" in line for line in lines)
    assert "warning" not in out
    # values start in the same column: the table is aligned
    assert len({line.index(line.split()[-1]) for line in lines[2:2 + len(ALL_MEASURES)]}) == 1


def test_reliability_warning_in_table_and_json(tmp_path, capsys):
    x, y = make_pair(n=40, p=6, q=5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    run(parse(tmp_path / "x.npy", tmp_path / "y.npy"))
    assert "warning: CCA-family measures unreliable" in capsys.readouterr().out
    run(parse(tmp_path / "x.npy", tmp_path / "y.npy", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert data["reliable"] is False and "unreliable" in data["warning"]


def test_integer_input_is_accepted(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50, size=(300, 4)).astype(np.int16)
    y = x[:, :3].astype(np.int64) * 2 + rng.integers(0, 5, size=(300, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    run(parse(tmp_path / "x.npy", tmp_path / "y.npy", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert data["cka"] == pytest.approx(compute_similarity(x.astype(float), y.astype(float)).cka, abs=1e-12)


def test_fortran_ordered_and_float16_input(tmp_path, capsys):
    x, y = make_pair(n=300)
    x16 = x.astype(np.float16)
    np.save(tmp_path / "x.npy", x16)
    np.save(tmp_path / "y.npy", np.asfortranarray(y))
    run(parse(tmp_path / "x.npy", tmp_path / "y.npy", "--json"))
    data = json.loads(capsys.readouterr().out)
    ref = compute_similarity(x16.astype(np.float64), y)
    for name in ALL_MEASURES:
        assert data[name] == pytest.approx(ref.value(name), abs=1e-12), name


def test_cka_only_request_works_with_too_few_rows(tmp_path, capsys):
    x, y = make_pair(n=6, p=6, q=5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    run(parse(tmp_path / "x.npy", tmp_path / "y.npy", "--json", "--measures", "cka,cka_debiased"))
    data = json.loads(capsys.readouterr().out)
    assert data["cka"] == pytest.approx(compute_similarity(x, y, ["cka"]).cka, abs=1e-12)
    assert data["cka_debiased"] is not None


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: InputError, one line, naming the file, nothing printed
# ----------------------------------------------------------------------------------------------------------------


def _expect_input_error(capsys, args, *needles):
    with pytest.raises(InputError) as info:
        run(args)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    assert capsys.readouterr().out == ""
    return message


def test_different_row_counts(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((10, 3)))
    np.save(tmp_path / "y.npy", np.zeros((11, 3)))
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "x.npy", "y.npy", "10", "11")


@pytest.mark.parametrize(("bad", "value"), [("x", np.nan), ("y", np.inf), ("y", -np.inf)])
def test_non_finite_values_found_while_streaming(tmp_path, capsys, monkeypatch, bad, value):
    x, y = make_pair(n=500)
    (x if bad == "x" else y)[437, 2] = value
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    monkeypatch.setattr(similarity_command, "CHUNK_BYTES", 8 * 6 * 50)  # the bad row is in a late chunk
    message = _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy", "--json"), f"{bad}.npy", "NaN", "row 437")
    other = "y.npy" if bad == "x" else "x.npy"
    assert other not in message


@pytest.mark.parametrize("shape", [(20,), (4, 5, 3), ()])
def test_not_two_dimensional(tmp_path, capsys, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape))
    np.save(tmp_path / "y.npy", np.zeros((4, 3)))
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "x.npy", "2-D")


def test_not_a_numpy_file(tmp_path, capsys):
    (tmp_path / "x.npy").write_text("1,2,3\n4,5,6\n")
    np.save(tmp_path / "y.npy", np.zeros((2, 3)))
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "x.npy", "not a NumPy .npy file")


def test_npz_archive(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", a=np.zeros((2, 3)))
    np.save(tmp_path / "y.npy", np.zeros((2, 3)))
    _expect_input_error(capsys, parse(tmp_path / "x.npz", tmp_path / "y.npy"), "x.npz", ".npz")


def test_plain_pickle_file(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    (tmp_path / "y.npy").write_bytes(pickle.dumps(np.zeros((2, 3))))
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "y.npy", "not a NumPy")


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_file(tmp_path, capsys, damage):
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    path = tmp_path / "y.npy"
    np.save(path, np.ones((100, 10)))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:500]
    elif damage == "header":
        raw[20:30] = b"!!!!!!!!!!"
    else:
        raw = raw[:0]
    path.write_bytes(bytes(raw))
    needle = "not a NumPy" if damage == "empty" else "corrupt"
    _expect_input_error(capsys, parse(tmp_path / "x.npy", path), "y.npy", needle)


def test_missing_file(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "nope.npy"), "nope.npy", "not found")


def test_directory_instead_of_file(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    (tmp_path / "d.npy").mkdir()
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "d.npy"), "d.npy")


def test_pickled_object_array(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.array([[1.0, None], [2.0, 3.0]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "y.npy", np.zeros((2, 3)))
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "x.npy", "Python objects")


@pytest.mark.parametrize(
    "array",
    [np.zeros((3, 2), dtype=bool), np.zeros((3, 2), dtype=complex), np.array([["a", "b"]] * 3), np.zeros((3, 2), dtype=[("a", "f4")])],
    ids=["bool", "complex", "str", "structured"],
)
def test_non_float_dtype(tmp_path, capsys, array):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    np.save(tmp_path / "y.npy", array)
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "y.npy", "dtype")


@pytest.mark.parametrize("spec", ["cca,foo", "CKA", ",,"])
def test_unknown_measure(pair_files, capsys, spec):
    xp, yp, _, _ = pair_files
    _expect_input_error(capsys, parse(xp, yp, "--measures", spec), "--measures")


def test_too_few_rows_for_cca(tmp_path, capsys):
    x, y = make_pair(n=7, p=6, q=5)  # n = max(p, q) + 1: refused
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    message = _expect_input_error(
        capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy", "--measures", "cka,svcca"), "x.npy", "y.npy", "svcca"
    )
    assert "cka" in message  # the fix suggests a CKA-only request


def test_too_many_channels_for_the_memory_left(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((3, 300)))
    np.save(tmp_path / "y.npy", np.zeros((3, 200)))
    needed = similarity_command.peak_bytes(300, 200, list(ALL_MEASURES))
    monkeypatch.setattr(similarity_command, "available_bytes", lambda: needed - 1)
    message = _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "x.npy", "y.npy", "channels")
    needed_text, left_text = describe_shortfall(needed, needed - 1)
    assert f"need about {needed_text} of memory, but only {left_text} may be allocated" in message
    assert needed_text != left_text


def test_peak_estimate_covers_the_finalisation_it_guards():
    # The refusal is only as good as the estimate: measure the accumulator's real peak while finalising (tracemalloc
    # sees numpy's buffers) with a tiny row buffer, so that what remains is the (p+q)^2 matrices the estimate counts,
    # for more rows than channels (the CCA path, its largest case) and for fewer (CCA refused, CKA only).
    import tracemalloc

    from medtransfer.analysis.similarity import SimilarityAccumulator

    cases = [(p, q, n, measures, matrices) for p, q, n in ((300, 200, 1200), (300, 200, 3))
             for measures, matrices in ((list(ALL_MEASURES), similarity_command.CCA_PEAK_MATRICES),
                                        (["cka", "cka_debiased"], similarity_command.CKA_PEAK_MATRICES))]
    for p, q, n, measures, matrices in cases:
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((n, p)), rng.standard_normal((n, q))
        tracemalloc.start()
        try:
            acc = SimilarityAccumulator(p, q, block_bytes=8 * (p + q) * 16)
            acc.update(x, y)
            tracemalloc.reset_peak()
            acc.finalize(measures)
            _, finalize_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert finalize_peak < matrices * 8 * (p + q) ** 2, (p, q, n, measures)


def test_out_of_memory_in_the_maths_is_one_line(tmp_path, capsys, monkeypatch):
    from medtransfer.analysis.similarity import SimilarityAccumulator

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((40, 3)))
    np.save(tmp_path / "y.npy", np.random.default_rng(1).standard_normal((40, 3)))

    def no_memory(self, measures):
        raise MemoryError

    monkeypatch.setattr(SimilarityAccumulator, "finalize", no_memory)
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "out of memory", "x.npy", "GiB")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork") or __import__("sys").platform != "linux",
                    reason="address-space limits (RLIMIT_AS) are a Linux feature")
def test_a_wide_pair_under_an_address_space_limit_is_refused_with_one_line(tmp_path, cap_address_space):
    # 3 rows x 13000 channels each: the (p+q)^2 matrices alone need about 25 GiB; with 3 GB of address space left
    # (`ulimit -v`) the command must refuse up front (exit 2, one line) instead of dying in numpy with a traceback.
    # The cap is set once the libraries are loaded, at what they mapped plus 3 GB (`cap_address_space`).
    import subprocess
    import sys
    import textwrap

    np.save(tmp_path / "x.npy", np.zeros((3, 13000), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.zeros((3, 13000), dtype=np.float32))
    code = textwrap.dedent(f"""
        import argparse, sys
        from medtransfer.analysis.similarity_command import add_arguments, run
        from medtransfer.errors import InputError
        {cap_address_space(3 * 10**9)}
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        try:
            run(parser.parse_args(sys.argv[1:]))
        except InputError as error:
            print(error, file=sys.stderr)
            sys.exit(2)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "13000 + 13000 channels need about" in lines[0] and "GiB" in lines[0]


def test_all_constant_channels(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.full((50, 3), 2.0))
    np.save(tmp_path / "y.npy", np.random.default_rng(0).standard_normal((50, 3)))
    _expect_input_error(capsys, parse(tmp_path / "x.npy", tmp_path / "y.npy"), "x.npy", "constant")
