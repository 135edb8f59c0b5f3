"""Order of accuracy of each sampler on the Gaussian oracle: the error of its map x_T -> x_0 against the exact
probability-flow solution at n and 2n steps, computed by the oracle test's own function
(``tests.test_ode_solvers.sampler_error``; exact in float64, no sampling noise). Seconds on a CPU.

    python benchmarks/solver_order.py --out benchmarks/results/solver_order.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.test_ode_solvers

from common import write_result

from ddpm_core.diffusion import Prediction
from ddpm_core.samplers import Method, Spacing
from tests.test_ode_solvers import SOLVER_SPACINGS, sampler_error

STEPS = (10, 20, 40, 80, 160)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for method, spacing in SOLVER_SPACINGS:
        errors = [sampler_error(Method(method), n, Spacing(spacing), args.schedule, Prediction.EPS) for n in STEPS]
        ratios = [errors[i][0] / errors[i + 1][0] for i in range(len(STEPS) - 1)]
        rows.append(
            {
                "method": method.value,
                "spacing": spacing.value,
                "steps": list(STEPS),
                "nfe": [nfe for _, nfe in errors],
                "error": [error for error, _ in errors],
                "ratio_n_over_2n": ratios,
            }
        )
        cells = "  ".join(f"{error:.2e}" for error, _ in errors)
        print(f"{method.value:16s} {spacing.value:9s} {cells}   ratios {' '.join(f'{r:.2f}' for r in ratios)}")
    write_result(args.out, {"benchmark": "solver_order", "schedule": args.schedule, "prediction": "eps", "rows": rows})


if __name__ == "__main__":
    main()
