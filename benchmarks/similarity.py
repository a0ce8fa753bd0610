"""Benchmark of the streaming similarity measures (medtransfer.analysis.similarity), both Gram precisions.

Usage: python benchmarks/similarity.py [--quick] [--size N P]

For each size (n rows, p = q channels per side) it times, in one run on this machine:
  * a plain GEMM X^T Y (n x p by n x q), float64 and float32, on in-memory arrays, and the plain float64 GEMM
    Z^T Z of Z = [X Y] (n x (p+q)): the same products the accumulator must form (X^T X, Y^T Y and X^T Y);
  * accumulation: rows streamed through SimilarityAccumulator in chunks generated on the fly with a seeded RNG
    (generation time excluded), so the benchmark never holds n x p while measuring it; once with
    gram_precision="float64" (the reference) and once with "float32" (the fast path: float32 blocks summed in
    float64, see medtransfer/analysis/cross_products.py);
  * finalisation: every measure together (both paths), and each measure alone on the fast path;
  * svcca's mean CCA, the reference time: google/svcca's `get_cca_similarity` with its defaults, every step as
    published (Raghu et al. 2017, github.com/google/svcca, cca_core.py; written here from the algorithm, float64, in
    memory): np.cov of [X Y], each covariance divided by its largest entry, near-constant channels dropped, epsilon
    on the diagonal, pseudo-inverse square roots, the full SVD of the whitened cross-covariance and the coefficient
    bookkeeping the call returns; the mean of all the canonical correlations (see `svcca_mean_cca`);
  * a textbook in-memory float64 route (centre, QR of each side, SVD of Qx^T Qy) computing mean CCA alone.

Under the goals it prints the floor of this design on this machine: the float32 ``ssyrk`` calls alone (no shifting,
scaling or adding) plus the finalisation's CPU time (all threads) divided by the usable cores, i.e. the time with
no accumulation overhead and no idle core during the decompositions; and a lower floor for any finalisation: the
dense steps the nine measures need whatever the design (three eigendecompositions with vectors, two SVDs for the
nuclear norms, three products and a Gram of p x p matrices), timed alone on one core each (`dense_work_seconds`).

The measure table gives, per measure: its value on the fast path, the largest |fast - float64| difference, its
seconds on the fast path (the shared accumulation plus its own finalisation) and that time as a multiple of svcca's
mean CCA. The issue's goal (50,000 x 2,048 per side, the full mode's largest size): all measures together within
0.35 x svcca's time, every value within 1e-6 of the float64 path.

Peak memory is measured with tracemalloc (NumPy reports its buffers to it). For the accumulator it is the peak
during update() calls minus what was allocated before (the input chunk itself excluded), i.e. its state plus
temporaries, from a run of its own: tracemalloc hooks every allocation, so accumulation times come from runs
without it (the finalisation, a few large LAPACK calls, is timed under it); a second, larger n for one size shows
that the peak does not grow with n (its time there is a traced run's).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc

import numpy as np
from scipy.linalg.blas import sgemm

from medtransfer.analysis.cross_products import FLOAT32_BLOCK_ROWS, float32_product
from medtransfer.analysis.similarity import ALL_MEASURES, SimilarityAccumulator

CHUNK_ROWS = 4096
LATENT = 32
MIB = float(1 << 20)
SVCCA_EPSILON = 1e-12
#: The issue's goals for the fast path at the largest size.
GOAL_RATIO, GOAL_DIFFERENCE = 0.35, 1e-6


class Source:
    """Deterministic paired activations, generated chunk by chunk: shared latent signal plus noise, float32."""

    def __init__(self, n: int, p: int, q: int, seed: int = 0) -> None:
        self.n, self.p, self.q, self.seed = n, p, q, seed
        rng = np.random.default_rng(seed)
        self.ax = rng.standard_normal((LATENT, p)).astype(np.float32)
        self.ay = rng.standard_normal((LATENT, q)).astype(np.float32)
        self.offset_x = rng.uniform(0.0, 5.0, p).astype(np.float32)
        self.offset_y = rng.uniform(0.0, 5.0, q).astype(np.float32)

    def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start = index * CHUNK_ROWS
        m = min(CHUNK_ROWS, self.n - start)
        rng = np.random.default_rng([self.seed, index])
        z = rng.standard_normal((m, LATENT), dtype=np.float32)
        # (a^T z^T)^T through SciPy's BLAS, as the accumulator uses: NumPy's separate OpenBLAS would leave threads
        # spinning into the timed update() calls. Transposed operands avoid copies and give a C-ordered chunk.
        x = sgemm(1.0, self.ax.T, z.T).T
        x += rng.standard_normal((m, self.p), dtype=np.float32)
        x += self.offset_x
        y = sgemm(1.0, self.ay.T, z.T).T
        y += rng.standard_normal((m, self.q), dtype=np.float32)
        y += self.offset_y
        return x, y

    def chunks(self):
        for index in range((self.n + CHUNK_ROWS - 1) // CHUNK_ROWS):
            yield self.chunk(index)

    def materialise(self, dtype) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((self.n, self.p), dtype=dtype)
        y = np.empty((self.n, self.q), dtype=dtype)
        for index, (cx, cy) in enumerate(self.chunks()):
            rows = slice(index * CHUNK_ROWS, index * CHUNK_ROWS + len(cx))
            x[rows], y[rows] = cx, cy
        return x, y


def accumulate(source: Source, precision: str = "float64", traced: bool = False
               ) -> tuple[float, float | None, SimilarityAccumulator]:
    """(seconds inside update(), accumulator peak bytes or None when not ``traced``, accumulator)."""
    gc.collect()
    if traced:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if traced else 0
    acc = SimilarityAccumulator(source.p, source.q, gram_precision=precision)
    seconds, peak = 0.0, 0
    for x, y in source.chunks():
        if traced:
            tracemalloc.reset_peak()
        t0 = time.perf_counter()
        acc.update(x, y)
        seconds += time.perf_counter() - t0
        if traced:
            peak = max(peak, tracemalloc.get_traced_memory()[1] - base - x.nbytes - y.nbytes)
        del x, y
    if traced:
        tracemalloc.stop()
    return seconds, (peak if traced else None), acc


def best_accumulation(source: Source, precision: str) -> tuple[float, float, SimilarityAccumulator]:
    """(seconds, peak bytes, accumulator): the peak from a run under tracemalloc, the time from runs without it
    (tracemalloc hooks every allocation, which doubled the accumulation's time on narrow layers)."""
    _seconds, peak, _acc = accumulate(source, precision, traced=True)
    seconds, _peak, acc = accumulate(source, precision)
    if seconds < 1.0:  # tiny sizes: best of three
        for _ in range(2):
            seconds = min(seconds, accumulate(source, precision)[0])
    return seconds, peak, acc


def finalise(acc: SimilarityAccumulator, measures=None):
    """(seconds, peak bytes, result, the process's CPU seconds over all its threads)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    c0, t0 = os.times(), time.perf_counter()
    result = acc.finalize(measures)
    seconds, c1 = time.perf_counter() - t0, os.times()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return seconds, peak, result, (c1.user - c0.user) + (c1.system - c0.system)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gram_floor(x32: np.ndarray, y32: np.ndarray) -> float:
    """Seconds of the fast path's float32 ``ssyrk`` calls alone (`cross_products.float32_product` on blocks of
    `FLOAT32_BLOCK_ROWS` rows of ``[X Y]``, in memory, nothing shifted, scaled or added): what no float32 accumulation
    of this design can beat."""
    d = x32.shape[1] + y32.shape[1]
    rows = min(FLOAT32_BLOCK_ROWS, x32.shape[0])
    block = np.empty((rows, d), dtype=np.float32)
    product = np.zeros((d, d), dtype=np.float32, order="F")
    seconds = 0.0
    for start in range(0, x32.shape[0], rows):
        m = min(rows, x32.shape[0] - start)
        block[:m, : x32.shape[1]], block[:m, x32.shape[1]:] = x32[start:start + m], y32[start:start + m]
        t0 = time.perf_counter()
        float32_product(product, block[:m])
        seconds += time.perf_counter() - t0
    return seconds


def dense_work_seconds(p: int) -> dict[str, float]:
    """One-thread seconds (best of two, random matrices) of the dense steps every finalisation of the nine measures
    at ``p`` channels a side takes, whatever else it does: ``eigh``, an eigendecomposition with vectors of a ``(p, p)``
    covariance (each side, and the canonical directions PWCCA weights by); ``svd``, the singular values of a
    ``(p, p)`` matrix (each nuclear norm: Procrustes and shape_0.5); ``gemm``, a ``(p, p)`` product (the cross block
    rotated into both sides' bases, and PWCCA's correlations); ``syrk``, a ``(p, p)`` Gram (the canonical
    correlations' own)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(p)
    a = rng.standard_normal((2 * p, p))
    covariance, square = a.T @ a, rng.standard_normal((p, p))
    other = square.copy()
    with threadpool_limits(1):
        return {"eigh": timed(np.linalg.eigh, covariance, budget=0.0)[0],
                "svd": timed(lambda: np.linalg.svd(square, compute_uv=False), budget=0.0)[0],
                "gemm": timed(lambda: square @ other, budget=0.0)[0],
                "syrk": timed(lambda: square.T @ square, budget=0.0)[0]}


#: How many of each `dense_work_seconds` step the nine measures take.
DENSE_STEPS = {"eigh": 3, "svd": 2, "gemm": 3, "syrk": 1}


def svcca_mean_cca(x: np.ndarray, y: np.ndarray) -> float:
    """google/svcca's ``np.mean(get_cca_similarity(acts1, acts2, epsilon=1e-12)["cca_coef1"])``, every step that call
    takes with its defaults (compute_coefs=True, compute_dirns=False, threshold=0.98), written here from its
    algorithm (cca_core.py), float64, in memory: the published route is what a user of svcca waits for.

    Steps: np.cov of the stacked (neurons, datapoints) activations; each block divided by its side's largest
    covariance entry; channels whose variance is below epsilon dropped; epsilon added to the diagonals; each side's
    pseudo-inverse (an SVD) and its square root by an eigendecomposition, formed as V (diag(sqrt w) V^T) with a dense
    diagonal matrix; the whitened cross-covariance and its full SVD (singular vectors included: they are the
    coefficients the call returns); the coefficient matrices placed into zero matrices of the full size and the
    neuron means; the 0.98 threshold index of its summary statistics. Two departures, neither changing the time:
    negative rounding eigenvalues of the pseudo-inverse are clipped to 0 (svcca's np.sqrt would make them NaN), and
    the returned mean is of all coefficients (our ``cca``; svcca's "mean" key truncates at the threshold).
    """
    acts1, acts2 = x.T, y.T  # svcca takes (neurons, datapoints)
    numx = acts1.shape[0]
    covariance = np.cov(acts1, acts2)
    sxx, sxy, syy = covariance[:numx, :numx], covariance[:numx, numx:], covariance[numx:, numx:]
    x_max, y_max = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / x_max, syy / y_max, sxy / np.sqrt(x_max * y_max)
    kx, ky = np.abs(np.diag(sxx)) >= SVCCA_EPSILON, np.abs(np.diag(syy)) >= SVCCA_EPSILON
    sxx, syy, sxy = sxx[np.ix_(kx, kx)], syy[np.ix_(ky, ky)], sxy[np.ix_(kx, ky)]
    del covariance

    def inverse_sqrt(sigma: np.ndarray) -> np.ndarray:
        inverse = np.linalg.pinv(sigma + SVCCA_EPSILON * np.eye(len(sigma)))
        lam, vec = np.linalg.eigh(inverse)
        return np.dot(vec, np.dot(np.diag(np.sqrt(np.clip(lam, 0.0, None))), vec.T))

    invsqrt_xx, invsqrt_yy = inverse_sqrt(sxx), inverse_sqrt(syy)
    u, s, v = np.linalg.svd(np.dot(invsqrt_xx, np.dot(sxy, invsqrt_yy)))
    s = np.abs(s)
    returned: dict[str, object] = {"cca_coef1": s}
    # compute_coefs: the coefficients and inverse square roots placed over all neurons, and the neuron means
    for side, coefficients, invsqrt, kept, acts in (("x", u.T, invsqrt_xx, kx, acts1), ("y", v, invsqrt_yy, ky, acts2)):
        mask = np.outer(kept, kept)
        for name, values in (("coef", coefficients), ("invsqrt", invsqrt)):
            returned[f"full_{name}_{side}"] = full = np.zeros(mask.shape)
            np.place(full, mask, values)
        returned[f"neuron_means_{side}"] = np.mean(acts, axis=1, keepdims=True)
    # the summary statistics' threshold index (svcca finds it with a Python loop over prefix sums; the same index)
    index = int(np.searchsorted(np.cumsum(s) / np.sum(s), 0.98)) + 1
    returned["mean"], returned["sum"] = np.mean(s[:index]), np.sum(s)
    return float(np.mean(returned["cca_coef1"][: min(len(sxx), len(syy))]))


def textbook_mean_cca(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    qx = np.linalg.qr(xc, mode="reduced")[0]
    del xc
    qy = np.linalg.qr(yc, mode="reduced")[0]
    del yc
    return float(np.linalg.svd(qx.T @ qy, compute_uv=False).mean())


def timed(fn, *args, budget: float = 1.0):
    """Best of 3 runs, or of 2 when one run exceeds ``budget`` seconds (this machine's timings are noisy)."""
    best, value = float("inf"), None
    for attempt in range(3):
        t0 = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - t0)
        if attempt >= 1 and best > budget:
            break
    return best, value


def bench_size(n: int, p: int) -> dict[str, object]:
    source = Source(n, p, p, seed=p)
    row: dict[str, object] = {"n": n, "p": p}
    for precision in ("float64", "float32"):
        acc_s, acc_peak, acc = best_accumulation(source, precision)
        fin_s, fin_peak, result, fin_cpu_s = finalise(acc)
        row[precision] = {"acc_s": acc_s, "acc_peak": acc_peak, "fin_s": fin_s, "fin_peak": fin_peak, "result": result,
                          "fin_cpu_s": fin_cpu_s}
        if precision == "float32":  # each measure on its own, on the fast path
            row["alone_s"] = {measure: min(finalise(acc, [measure])[0] for _ in range(2 if fin_s < 1.0 else 1))
                              for measure in ALL_MEASURES}
        del acc

    x32, y32 = source.materialise(np.float32)
    row["gemm32_s"], _ = timed(lambda: x32.T @ y32)
    row["ssyrk_floor_s"] = gram_floor(x32, y32)
    row["dense_s"] = dense_work_seconds(p)
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
    del x32, y32
    row["gemm64_s"], _ = timed(lambda: x64.T @ y64)
    z64 = np.hstack([x64, y64])
    z64_copy = z64.copy()  # a second buffer, so that NumPy runs a plain GEMM rather than detecting Z^T Z (syrk)
    row["gemm_z_s"], _ = timed(lambda: z64.T @ z64_copy)
    del z64, z64_copy
    row["svcca_s"], row["svcca_cca"] = timed(svcca_mean_cca, x64, y64)

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    row["textbook_cca"] = textbook_mean_cca(x64, y64)
    row["textbook_s"] = time.perf_counter() - t0
    # The textbook route must hold the data: count the two input matrices as well.
    row["textbook_peak"] = tracemalloc.get_traced_memory()[1] - base + x64.nbytes + y64.nbytes
    tracemalloc.stop()
    return row


def fmt_s(seconds: float) -> str:
    return f"{seconds:9.3f}"


def fmt_mib(nbytes: float | None) -> str:
    return f"{nbytes / MIB:10.1f}" if nbytes is not None else f"{'-':>10}"


def differences(row: dict[str, object]) -> dict[str, float]:
    """|fast - float64| per measure (inf when one path leaves it undefined and the other does not)."""
    fast, reference = row["float32"]["result"], row["float64"]["result"]
    out = {}
    for measure in ALL_MEASURES:
        a, b = fast.value(measure), reference.value(measure)
        out[measure] = 0.0 if a is None and b is None else (float("inf") if a is None or b is None else abs(a - b))
    return out


def print_steps(row: dict[str, object]) -> None:
    g64 = row["gemm64_s"]
    lines = [
        ("GEMM X^T Y float64 (in memory)", row["gemm64_s"], None),
        ("GEMM X^T Y float32 (in memory)", row["gemm32_s"], None),
        ("GEMM [X Y]^T [X Y] float64 (in memory)", row["gemm_z_s"], None),
    ]
    for precision in ("float64", "float32"):
        step = row[precision]
        lines += [
            (f"accumulate, Gram {precision} (streamed)", step["acc_s"], step["acc_peak"]),
            (f"finalise, all {len(ALL_MEASURES)} measures", step["fin_s"], step["fin_peak"]),
            (f"accumulate + finalise ({precision})", step["acc_s"] + step["fin_s"],
             max(step["acc_peak"], step["fin_peak"])),
        ]
    lines += [
        ("svcca get_cca_similarity (as published)", row["svcca_s"], None),
        ("textbook mean CCA only (QR+SVD, f64)", row["textbook_s"], row["textbook_peak"]),
    ]
    for i, (label, seconds, peak) in enumerate(lines):
        lead = f"{row['n']:>7} {row['p']:>5}" if i == 0 else " " * 13
        print(f"{lead}  {label:<40} {fmt_s(seconds)} {seconds / g64:9.2f} {fmt_mib(peak)}")
    fast = row["float32"]["result"]
    print(f"{'':13}  mean CCA: svcca's route {row['svcca_cca']:.6f}, textbook {row['textbook_cca']:.6f}, "
          f"ours (fast) {fast.mean_cca:.6f}")


def print_measures(row: dict[str, object]) -> None:
    """One line per measure on the fast path against svcca's mean-CCA time, then all measures together."""
    fast = row["float32"]
    svcca_s, diff = row["svcca_s"], differences(row)
    header = (f"  {'measure':<22} {'fast value':>11} {'|fast-f64|':>11} {'seconds':>9} {'x svcca':>8}   "
              f"(n={row['n']}, p=q={row['p']}; svcca's mean CCA {svcca_s:.3f} s)")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for measure in ALL_MEASURES:
        value = fast["result"].value(measure)
        seconds = fast["acc_s"] + row["alone_s"][measure]
        shown = f"{value:11.6f}" if value is not None else f"{'undefined':>11}"
        print(f"  {measure:<22} {shown} {diff[measure]:11.1e} {seconds:9.3f} {seconds / svcca_s:8.2f}")
    for precision in ("float32", "float64"):
        total = row[precision]["acc_s"] + row[precision]["fin_s"]
        label = f"all {len(ALL_MEASURES)}, Gram {precision}"
        largest = f"{max(diff.values()):11.1e}" if precision == "float32" else f"{'(ref)':>11}"
        print(f"  {label:<22} {'':>11} {largest} {total:9.3f} {total / svcca_s:8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (5,000 rows; 64 and 256 channels), seconds")
    parser.add_argument("--size", nargs=2, type=int, metavar=("N", "P"),
                        help="one size only: N rows, P = Q channels per side (no memory check)")
    args = parser.parse_args(argv)

    if args.size:
        n, sizes, memory_check = args.size[0], [args.size[1]], None
    elif args.quick:
        n, sizes, memory_check = 5_000, [64, 256], (256, 20_000)
    else:
        n, sizes, memory_check = 50_000, [64, 512, 2048], (512, 200_000)

    print(f"numpy {np.__version__}; chunks of {CHUNK_ROWS} float32 rows streamed; times in seconds, memory in MiB")
    rows = []
    for p in sizes:
        t0 = time.perf_counter()
        rows.append(bench_size(n, p))
        print(f"  [n={n}, p=q={p} done in {time.perf_counter() - t0:.1f} s]", flush=True)

    header = f"{'n':>7} {'p=q':>5}  {'step':<40} {'time':>9} {'x GEMM64':>9} {'peak MiB':>10}"
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        print_steps(row)
        print()
    print("measures on the fast path (Gram float32, summed in float64) against svcca's mean CCA:")
    for row in rows:
        print_measures(row)
        print()

    big_peak = small = None
    if memory_check is not None:
        mem_p, mem_n = memory_check
        big_s, big_peak, _ = accumulate(Source(mem_n, mem_p, mem_p, seed=mem_p), traced=True)
        small = next(row for row in rows if row["p"] == mem_p)["float64"]
        print(f"accumulator peak for p=q={mem_p}: n={n}: {small['acc_peak'] / MIB:.1f} MiB, "
              f"n={mem_n}: {big_peak / MIB:.1f} MiB (accumulate time {big_s:.2f} s)")
        print()

    print("goals:")
    for row in rows:
        ratio = row["float64"]["acc_s"] / row["gemm_z_s"]
        print(f"  accumulate (float64) <= 1.5 x plain GEMM of the same products ([X Y]^T [X Y], f64), "
              f"p=q={row['p']:>4}: {ratio:5.2f} x  {'PASS' if ratio <= 1.5 else 'FAIL'}")
    print("    (X^T X, Y^T Y and X^T Y together hold twice the entries of X^T Y, so exact float64 accumulation costs"
          " at least 2 x the flops of X^T Y alone; one dsyrk on [X Y] per block reaches that minimum)")
    largest = rows[-1]
    total = largest["float32"]["acc_s"] + largest["float32"]["fin_s"]
    ratio, worst = total / largest["svcca_s"], max(differences(largest).values())
    print(f"  all {len(ALL_MEASURES)} measures, fast path, <= {GOAL_RATIO} x svcca's mean CCA, "
          f"n={largest['n']}, p=q={largest['p']}: {total:.2f} s vs {largest['svcca_s']:.2f} s = {ratio:.2f} x  "
          f"{'PASS' if ratio <= GOAL_RATIO else 'FAIL'}")
    print(f"  every measure within {GOAL_DIFFERENCE:g} of the float64 path, same size: largest |diff| {worst:.1e}  "
          f"{'PASS' if worst <= GOAL_DIFFERENCE else 'FAIL'}")
    fast, cores, syrk_s = largest["float32"], usable_cores(), largest["ssyrk_floor_s"]
    floor = syrk_s + fast["fin_cpu_s"] / cores
    print(f"    floor of this design here: the float32 ssyrk calls alone {syrk_s:.2f} s + the finalisation's CPU "
          f"time {fast['fin_cpu_s']:.2f} s spread over {cores} core(s) = {floor:.2f} s = "
          f"{floor / largest['svcca_s']:.2f} x svcca (accumulation overhead {fast['acc_s'] - syrk_s:.2f} s, "
          f"finalisation's idle cores {fast['fin_s'] - fast['fin_cpu_s'] / cores:.2f} s)")
    dense = largest["dense_s"]
    least = syrk_s + sum(count * dense[step] for step, count in DENSE_STEPS.items()) / cores
    steps = ", ".join(f"{count} {step} x {dense[step]:.2f} s" for step, count in DENSE_STEPS.items())
    print(f"    the dense steps alone, one core each ({steps}), spread over {cores} core(s), plus the ssyrk calls = "
          f"{least:.2f} s = {least / largest['svcca_s']:.2f} x svcca: what a finalisation with no other cost and no "
          f"idle core would take here")
    if memory_check is not None:
        same = abs(big_peak - small["acc_peak"]) <= 0.05 * small["acc_peak"]
        print(f"  accumulator peak memory independent of n (p=q={memory_check[0]}, n={n} vs {memory_check[1]}): "
              f"{small['acc_peak'] / MIB:.1f} vs {big_peak / MIB:.1f} MiB  {'PASS' if same else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
