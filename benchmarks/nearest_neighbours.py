"""Exact two-nearest-neighbour search for the memorization score (Carlini et al. 2023): our
``ddpm_core.memorization.nearest_two`` (blocked float64 matrix products in torch, then the two distances recomputed
exactly) against faiss's exact ``IndexFlatL2`` search with k=2 (float32), on seeded random float32 features.

For each size (N queries, M reference rows, D features) both are timed end to end (faiss: building the index and
searching it), median of ``--repeats`` wall-clock runs, the two interleaved so that both see the same background
load, with torch and faiss on the same number of threads. The agreement is the fraction of queries whose nearest
index is the same in both (float32 against float64 may flip a near-tie). Sizes whose ``2 N M D`` flops exceed
``--max-gflop`` are skipped and listed as such. faiss is optional: without it (``import faiss`` fails) only ours is
timed and faiss is recorded as unavailable.

    PYTHONPATH=/tmp/faisslib python benchmarks/nearest_neighbours.py \\
        --out benchmarks/results/nearest_neighbours_cpu.json
    python benchmarks/nearest_neighbours.py --queries 1000 --references 1602 --dims 64 2048 --out ...
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import device_name, write_result

from ddpm_core.memorization import nearest_two


def load_faiss(threads: int) -> tuple[Any, dict[str, Any]]:
    """The faiss module set to ``threads`` OpenMP threads and its description, or ``None`` and why not."""
    try:
        import faiss
    except ImportError as error:
        return None, {"available": False, "error": str(error)}
    faiss.omp_set_num_threads(threads)
    return faiss, {
        "available": True,
        "version": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "compile_options": faiss.get_compile_options(),
    }


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    """(wall-clock seconds, result) of one call of ``run``."""
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def faiss_two(faiss: Any, queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exact search: (squared distances [N, 2], indices [N, 2]), nearest first."""
    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(reference)
    return index.search(queries, 2)


def measure(faiss: Any, n: int, m: int, d: int, repeats: int, block: int, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(n, d, generator=generator)  # [N, D] float32
    reference = torch.randn(m, d, generator=generator)  # [M, D] float32
    q, r = queries.numpy(), reference.numpy()  # the same memory, for faiss
    methods: dict[str, Callable[[], Any]] = {"ours": lambda: nearest_two(queries, reference, block=block)}
    if faiss is not None:
        methods["faiss"] = lambda: faiss_two(faiss, q, r)
    times: dict[str, list[float]] = {name: [] for name in methods}
    found: dict[str, Any] = {}
    for _ in range(repeats):  # interleaved, so that both see the same background load
        for name, run in methods.items():
            seconds, found[name] = timed(run)
            times[name].append(seconds)
    row: dict[str, Any] = {"n": n, "m": m, "d": d, "gflop": 2 * n * m * d / 1e9}
    for name, seconds in times.items():
        row.update({f"{name}_s": statistics.median(seconds), f"{name}_times": seconds})
    line = f"N={n:6d} M={m:6d} D={d:5d}  ours {row['ours_s']:8.3f} s"
    if faiss is not None:
        squared, indices = found["faiss"]  # [N, 2] float32 squared distances, [N, 2] int64
        ours = found["ours"]
        d1 = torch.from_numpy(squared[:, 0].astype(np.float64)).clamp_min(0).sqrt()  # [N]
        row.update(
            ratio_faiss_over_ours=row["faiss_s"] / row["ours_s"],
            agreement=float((torch.from_numpy(indices[:, 0]) == ours.index).double().mean()),
            d1_max_relative_difference=float(((d1 - ours.d1).abs() / ours.d1).max()),
        )
        line += f"  faiss {row['faiss_s']:8.3f} s  ratio {row['ratio_faiss_over_ours']:6.3f}"
        line += f"  agree {row['agreement']:.5f}"
    print(line, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, nargs="+", default=[1000, 10000], help="N: generated images")
    parser.add_argument("--references", type=int, nargs="+", default=[1602, 50000], help="M: training images")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 2048], help="D: feature sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method and size (median)")
    parser.add_argument("--block", type=int, default=1024, help="nearest_two's block")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and faiss threads")
    parser.add_argument("--max-gflop", type=float, default=250.0, help="skip sizes with more 2NMD flops than this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss, faiss_info = load_faiss(args.threads)
    rows, skipped = [], []
    for n, m, d in itertools.product(args.queries, args.references, args.dims):
        if 2 * n * m * d / 1e9 > args.max_gflop:
            skipped.append({"n": n, "m": m, "d": d, "gflop": 2 * n * m * d / 1e9, "why": "over --max-gflop"})
            print(f"N={n:6d} M={m:6d} D={d:5d}  skipped ({skipped[-1]['gflop']:.0f} GFLOP > {args.max_gflop:.0f})")
            continue
        rows.append(measure(faiss, n, m, d, args.repeats, args.block, args.seed))
    result = {
        "benchmark": "nearest_neighbours",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device_name": device_name(torch.device("cpu")),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss_info,
        "repeats": args.repeats,
        "block": args.block,
        "seed": args.seed,
        "max_gflop": args.max_gflop,
        "rows": rows,
        "skipped": skipped,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
