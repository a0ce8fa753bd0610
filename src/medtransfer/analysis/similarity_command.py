"""``medtransfer similarity X.npy Y.npy``: representation similarity of two activation matrices.

``X.npy`` is ``n x p`` and ``Y.npy`` is ``n x q`` (rows = datapoints, paired; columns = channels), saved with
``np.save``. Float16/32/64 arrays are used as they are; integer arrays are accepted and converted to float64
(exact up to 2**53); booleans, complex numbers, strings, structured and object arrays are refused.

The files are memory-mapped and streamed through `SimilarityAccumulator` in row chunks, so memory does not grow
with ``n``; it does grow with the channels, as a few ``(p+q) x (p+q)`` float64 matrices (their peak is
`peak_bytes`, refused up front when it exceeds the memory this process may still allocate). Every problem the user can fix raises `InputError` (one line: what, which file, how to fix) before
anything is printed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from medtransfer.analysis.cross_products import GRAM_PRECISIONS
from medtransfer.analysis.similarity import (
    ALL_MEASURES,
    CKA_MEASURES,
    DEFAULT_BLOCK_BYTES,
    REFUSED_WITH_CCA,
    NonFiniteInputError,
    SimilarityAccumulator,
    SimilarityResult,
)
from medtransfer.errors import InputError
from medtransfer.memory_budget import available_bytes, describe_shortfall

__all__ = ["add_arguments", "run", "parse_measures", "compute", "format_table", "to_json_dict"]

#: Bytes of input read per streamed chunk (per file, in the file's dtype); module-level so tests can shrink it.
CHUNK_BYTES = 64 << 20
#: The finalisation's peak, in (p+q) x (p+q) float64 matrices: the accumulated cross-products plus the working
#: copies of the CCA path (whitening, SVD) or of the CKA path; tests measure the real peak with tracemalloc against it.
CCA_PEAK_MATRICES = 5.0
CKA_PEAK_MATRICES = 3.5
_FEWER_CHANNELS = "reduce the channels first, e.g. average-pool spatial positions of convolutional activations"

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"

_DISPLAY = {
    "cca": "mean CCA",
    "svcca": "SVCCA",
    "pwcca": "PWCCA",
    "cka": "linear CKA",
    "cka_debiased": "debiased linear CKA",
    "procrustes_similarity": "Procrustes similarity, 1 - d^2/2",
    "shape_0": "angular shape similarity, alpha 0",
    "shape_0.5": "angular shape similarity, alpha 0.5",
    "shape_1": "angular shape similarity, alpha 1",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``similarity`` command's positional arguments and options to ``parser``."""
    parser.add_argument("x", metavar="X.npy", help="first activation matrix, n x p (rows = datapoints)")
    parser.add_argument("y", metavar="Y.npy", help="second activation matrix, n x q, rows paired with X.npy")
    parser.add_argument(
        "--measures",
        default=",".join(ALL_MEASURES),
        help=f"comma-separated measures to compute (default: all): {','.join(ALL_MEASURES)}",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--gram-precision",
        choices=GRAM_PRECISIONS,
        default="float64",
        help="cross products in float64 (default, the reference) or in float32 blocks summed in float64 "
        "(about twice as fast on wide layers; the error bound is in analysis/cross_products.py)",
    )


def run(args: argparse.Namespace) -> int:
    """Compute the requested measures for ``args.x`` and ``args.y``, print them to stdout and return 0.

    Raises:
        InputError: unreadable or unusable input files, or an unknown measure name, or too few rows for a
            requested CCA-family measure.
    """
    measures = parse_measures(args.measures)
    config = _launched_config(args)
    result = compute(Path(args.x), Path(args.y), measures, getattr(args, "gram_precision", "float64"))
    if args.json:
        print(json.dumps(to_json_dict(result, measures)))
    else:
        print(format_table(result, measures))
    if config is not None:
        _log_to_mlflow(config, args, measures, result)
    return 0


def _launched_config(args: argparse.Namespace):
    """The params under `mlflow run` (checked before any work), else None: on its own the command is a plain
    calculator that needs no params.yaml and logs nothing."""
    from medtransfer.mlflow_project import load_step_config
    from medtransfer.tracking import launched_by_mlflow_run

    return load_step_config(getattr(args, "params", None)) if launched_by_mlflow_run() else None


def _log_to_mlflow(config, args: argparse.Namespace, measures: list[str], result: SimilarityResult) -> None:
    import mlflow

    from medtransfer.tracking import step_run

    x, y = Path(args.x), Path(args.y)
    with step_run(config, step="similarity", run_name=f"similarity {x.name} vs {y.name}") as run:
        params = {"x": args.x, "y": args.y, "measures": args.measures,
                  "gram_precision": getattr(args, "gram_precision", "float64"),
                  "n": result.n, "p": result.p, "q": result.q,
                  "p_kept": result.p_kept, "q_kept": result.q_kept}
        # The launcher logged x, y and measures as typed (a.npy, not the absolute path it hands the command), and
        # MLflow refuses to change a logged parameter.
        logged = mlflow.get_run(run.info.run_id).data.params
        mlflow.log_params({key: value for key, value in params.items() if key not in logged})
        values = to_json_dict(result, measures)
        mlflow.log_metrics({name: values[name] for name in measures if values[name] is not None})


def parse_measures(text: str | None) -> list[str]:
    """``"cca, cka"`` -> ``["cca", "cka"]`` (order kept, duplicates dropped); unknown names raise `InputError`."""
    if text is None:
        return list(ALL_MEASURES)
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in ALL_MEASURES:
            raise InputError(
                f"unknown measure {name!r}", where="--measures", fix=f"use a comma-separated subset of {','.join(ALL_MEASURES)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise InputError("no measure given", where="--measures", fix=f"use a comma-separated subset of {','.join(ALL_MEASURES)}")
    return names


def compute(x_path: Path, y_path: Path, measures: list[str], gram_precision: str = "float64") -> SimilarityResult:
    """Validate both files, stream them through the accumulator (cross products in ``gram_precision``) and finalise
    the requested ``measures``."""
    x = _open_matrix(x_path)
    y = _open_matrix(y_path)
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"row counts differ: {x.shape[0]} rows in {x_path} but {y.shape[0]} rows in {y_path}",
            where=f"{x_path}, {y_path}",
            fix="rows are datapoints and must be paired: save both activation matrices for the same inputs",
        )
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    needed = peak_bytes(p, q, measures, gram_precision)
    _check_memory(needed, x_path, y_path, p, q)
    try:
        acc = SimilarityAccumulator(p, q, gram_precision=gram_precision)
        step = max(1, CHUNK_BYTES // max(x.dtype.itemsize * p, y.dtype.itemsize * q))
        for start in range(0, n, step):
            acc.update(x[start : start + step], y[start : start + step])
        result = acc.finalize(measures)
    except NonFiniteInputError as err:
        path = x_path if err.side == "x" else y_path
        raise InputError(
            f"contains NaN or infinite values (or values too large to square), first in row {err.row}",
            where=str(path),
            fix="remove or repair those rows in both files (rows must stay paired)",
        ) from None
    except MemoryError:
        raise InputError(
            f"ran out of memory for {p} + {q} channels (about {needed / 2**30:.1f} GiB needed)",
            where=f"{x_path}, {y_path}",
            fix=_FEWER_CHANNELS,
        ) from None
    for name in measures:
        if result.value(name) is not None:
            continue
        reason = result.undefined.get(name, "undefined")
        if name in REFUSED_WITH_CCA and result.cca_refused and min(result.p_kept, result.q_kept) > 0:
            raise InputError(
                f"cannot compute {name}: {reason}",
                where=f"{x_path}, {y_path}",
                fix="use more rows than channels (ideally 10x), or request only cka,cka_debiased via --measures",
            )
        raise InputError(
            f"cannot compute {name}: {reason}",
            where=f"{x_path}, {y_path}",
            fix="check that the activations vary across rows and that there are at least 4 rows",
        )
    return result


def peak_bytes(p: int, q: int, measures: list[str], gram_precision: str = "float64") -> int:
    """Bytes the command holds at its peak for ``p`` + ``q`` channels: the finalisation's matrices, plus the
    accumulator's cross-product block and one streamed chunk per file (in float32, also its float32 block product
    and row block)."""
    # Every measure but CKA decomposes (p, p), (q, q) or (p, q) blocks, like the CCA path.
    matrices = CKA_PEAK_MATRICES if all(name in CKA_MEASURES for name in measures) else CCA_PEAK_MATRICES
    if gram_precision == "float32":
        matrices += 0.5  # the (p+q)^2 float32 block product lives as long as the accumulator
    rows = DEFAULT_BLOCK_BYTES * (1.5 if gram_precision == "float32" else 1.0)
    return int(matrices * 8 * (p + q) ** 2 + rows) + 2 * CHUNK_BYTES


def _check_memory(needed: int, x_path: Path, y_path: Path, p: int, q: int) -> None:
    available = available_bytes()
    if available is not None and needed > available:
        needed_text, available_text = describe_shortfall(needed, available)
        raise InputError(
            f"{p} + {q} channels need about {needed_text} of memory, "
            f"but only {available_text} may be allocated here (memory limits and free memory)",
            where=f"{x_path}, {y_path}",
            fix=_FEWER_CHANNELS,
        )


def _open_matrix(path: Path) -> np.ndarray:
    """Memory-map a 2-D real ``.npy`` array, or raise `InputError` saying what is wrong with ``path``."""
    where = str(path)
    if not path.exists():
        raise InputError("file not found", where=where, fix="check the path")
    if not path.is_file():
        raise InputError("not a regular file", where=where, fix="give the path of a .npy file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_NPY_MAGIC))
    except OSError as err:
        raise InputError(f"cannot read file ({err.strerror})", where=where, fix="check the file's permissions") from None
    if magic.startswith(_ZIP_MAGIC):
        raise InputError("is an .npz archive, not a single array", where=where, fix="save each matrix with np.save to its own .npy file")
    if magic != _NPY_MAGIC:
        raise InputError("not a NumPy .npy file", where=where, fix="save the activation matrix with np.save(path, array)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        text = str(err)
        if "Python objects" in text or "pickled" in text or "allow_pickle" in text:
            raise InputError(
                "holds Python objects (a pickled object array), which are not loaded for safety",
                where=where,
                fix="save a numeric float array, e.g. np.save(path, np.asarray(acts, dtype=np.float32))",
            ) from None
        raise InputError(
            f"corrupt or truncated .npy file ({text.splitlines()[0] if text else 'unreadable'})",
            where=where,
            fix="re-create the file with np.save",
        ) from None
    except (OSError, EOFError) as err:
        raise InputError(f"corrupt or truncated .npy file ({err})", where=where, fix="re-create the file with np.save") from None
    if not isinstance(arr, np.ndarray):
        raise InputError("does not hold a single array", where=where, fix="save the activation matrix with np.save")
    dtype = arr.dtype
    if dtype.hasobject:
        raise InputError("holds Python objects", where=where, fix="save a numeric float array")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)) or dtype.fields is not None:
        raise InputError(
            f"has dtype {dtype}, not a real number type",
            where=where,
            fix="save activations as float32 or float64 (integers are also accepted)",
        )
    if arr.ndim != 2:
        raise InputError(
            f"is {arr.ndim}-D with shape {tuple(arr.shape)}, expected a 2-D matrix (rows = datapoints, columns = channels)",
            where=where,
            fix="flatten each datapoint's activations, e.g. acts.reshape(len(acts), -1), and save again",
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"is empty (shape {tuple(arr.shape)})", where=where, fix="save at least one row and one column")
    return arr


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.6f}"


def format_table(result: SimilarityResult, measures: list[str]) -> str:
    """The plain-text report: an aligned (measure, value) table, then n, p_kept, q_kept and any warning."""
    rows = [(f"{_DISPLAY[name]} ({name})", _fmt(result.value(name))) for name in measures]
    rows.append(("n", str(result.n)))
    rows.append(("p_kept", f"{result.p_kept} of {result.p}"))
    rows.append(("q_kept", f"{result.q_kept} of {result.q}"))
    if "svcca" in measures and result.svcca_dims is not None:
        rows.append(("svcca_dims", f"{result.svcca_dims[0]} (X), {result.svcca_dims[1]} (Y)"))
    wanted_cca = any(name in REFUSED_WITH_CCA for name in measures)
    width = max(len("measure"), *(len(label) for label, _ in rows))
    lines = [f"{'measure':<{width}}  value", f"{'-' * width}  {'-' * 9}"]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    if wanted_cca and result.warning:
        lines.append(f"warning: {result.warning}")
    return "\n".join(lines)


def to_json_dict(result: SimilarityResult, measures: list[str]) -> dict[str, object]:
    """The ``--json`` object: one number per requested measure under its name, plus sizes and reliability."""

    def num(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else float(value)

    out: dict[str, object] = {name: num(result.value(name)) for name in measures}
    out["canonical_correlations"] = [float(v) for v in result.canonical_correlations]
    if "svcca" in measures:
        out["svcca_dims"] = list(result.svcca_dims) if result.svcca_dims is not None else None
    out.update(n=result.n, p=result.p, q=result.q, p_kept=result.p_kept, q_kept=result.q_kept)
    wanted_cca = any(name in REFUSED_WITH_CCA for name in measures)
    out["reliable"] = bool(result.reliable) if wanted_cca else True
    out["warning"] = result.warning if wanted_cca else None
    return out
