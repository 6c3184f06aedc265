"""Times `ddm.data.kmeans.kmeans` against scikit-learn's Lloyd k-means on the same data, start and iterations.

    python -m benchmarks.bench_kmeans [--repeats 5] [--iters 50]

Both start from the same k-means++ centroids and run the same number of Lloyd iterations (ours with tol=0;
scikit-learn with tol=0 stops early only on exact label convergence, so its iteration count is measured first
and ours is run for exactly that many). Ours is compiled by a warm-up call first; each timing is the median
of several end-to-end calls (input checks, transfers and the final labels included on both sides), the two
implementations called in turn so that background load affects both alike. The ms/iter columns are the
marginal cost of an iteration: (time at `iters` - time at 1 iteration) / (iters - 1).
Prints a markdown table and the machine it ran on. On a machine shared with other jobs, also run it pinned
to one core (`taskset -c 0 python -m benchmarks.bench_kmeans`): XLA, OpenMP and OpenBLAS all size their
thread pools from the affinity mask, and no side then loses time to oversubscribed threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

import jax  # noqa: E402
import sklearn  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

from ddm.data.kmeans import kmeans  # noqa: E402

MNIST10K = REPO.parent / "shared" / "data" / "mnist10k.npz"


def blobs(n: int, d: int, n_blobs: int, seed: int) -> np.ndarray:
    """[n, d] float32 Gaussian blobs whose centres overlap enough that Lloyd needs many iterations."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.3, size=(n_blobs, d))
    which = rng.integers(0, n_blobs, size=n)
    return (centres[which] + rng.normal(size=(n, d))).astype(np.float32)


def mnist_pixels() -> np.ndarray | None:
    """[10000, 784] float32 pixels in [0, 1], or None when the file is absent."""
    if not MNIST10K.is_file():
        return None
    with np.load(MNIST10K) as f:
        images = f["data"]
    return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median wall time of each callable, calling them in turn so background load hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_case(name: str, x: np.ndarray, k: int, iters: int, repeats: int) -> dict:
    # Shared start: our k-means++ seeds (a zero-iteration call), handed to both implementations.
    init = kmeans(x, k, seed=0, max_iter=0).centroids

    def sk(n_iter: int):
        return KMeans(n_clusters=k, n_init=1, algorithm="lloyd", init=init, max_iter=n_iter, tol=0).fit(x)

    iters = int(sk(iters).n_iter_)  # scikit-learn may stop early on exact convergence: match its count

    def ours(n_iter: int):
        return kmeans(x, k, init=init, max_iter=n_iter, tol=0)

    r_ours, r_sk = ours(iters), sk(iters)  # ours: compiles (the loop is compiled once for any iteration count)
    assert r_ours.n_iter == iters, (r_ours.n_iter, iters)
    t = interleaved_medians(
        {"ours": lambda: ours(iters), "sk": lambda: sk(iters), "ours1": lambda: ours(1), "sk1": lambda: sk(1)},
        repeats,
    )
    return dict(
        case=name, n=x.shape[0], d=x.shape[1], k=k, iters=iters, ours=t["ours"], sk=t["sk"],
        # Marginal cost of one more iteration, i.e. without the fixed per-call overhead of either side.
        ours_it=(t["ours"] - t["ours1"]) / max(iters - 1, 1), sk_it=(t["sk"] - t["sk1"]) / max(iters - 1, 1),
        inertia_ours=r_ours.inertia, inertia_sk=float(r_sk.inertia_),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50, help="Lloyd iterations (fewer if sklearn converges first)")
    ap.add_argument("--large", type=int, default=0, metavar="N",
                    help="also the paper's fine stage: N x 768 features (a sample of 1M), 1,024 centroids")
    ap.add_argument("--large-iters", type=int, default=3)
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()

    rows = [] if args.skip_small else [run_case("blobs 60k x 64", blobs(60_000, 64, 32, seed=0), 8, args.iters,
                                                args.repeats)]
    pixels = None if args.skip_small else mnist_pixels()
    if args.skip_small:
        pass
    elif pixels is None:
        print(f"skipping mnist10k: {MNIST10K} not present")
    else:
        rows.append(run_case("mnist10k pixels", pixels, 8, args.iters, args.repeats))
    if args.large:
        features = blobs(args.large, 768, 2048, seed=1)
        rows.append(run_case(f"fine stage: {args.large // 1000}k x 768 (sample of 1M)", features, 1024,
                             args.large_iters, 1))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable by this process), load average {os.getloadavg()[0]:.1f}, jax {jax.__version__} backend {jax.default_backend()}, "
          f"scikit-learn {sklearn.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    print()
    print("| case | N | D | K | iters | ours (s) | sklearn (s) | sklearn/ours | ours ms/iter | sklearn ms/iter |"
          " inertia ours | inertia sklearn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['n']} | {r['d']} | {r['k']} | {r['iters']} | {r['ours']:.3f} | {r['sk']:.3f} | "
              f"{r['sk'] / r['ours']:.2f} | {1e3 * r['ours_it']:.2f} | {1e3 * r['sk_it']:.2f} | "
              f"{r['inertia_ours']:.7g} | {r['inertia_sk']:.7g} |")
    print()
    for r in rows:
        rel = abs(r["inertia_ours"] - r["inertia_sk"]) / r["inertia_sk"]
        print(f"{r['case']}: relative inertia difference {rel:.1e}")


if __name__ == "__main__":
    main()
