"""Run every claim script once, in order, then write benchmarks/claims/RESULTS.md (`make claims`).

Each script prints its per-seed figures and its effects with 95 % intervals, appends its rows to
results.jsonl and draws its PNG beside this file. Scripts run in separate processes so that one
failing claim is reported and the others still run; a failed script leaves a row saying so.

    python benchmarks/claims/run_all.py [--only softcon continual ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPTS = ("reid", "kumar_sgd", "phikon_ensemble", "continual", "softcon")  # cheapest first


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    args = ap.parse_args()
    t0 = time.time()
    if set(args.only) == set(SCRIPTS) and common.RESULTS_JSONL.is_file():
        common.RESULTS_JSONL.unlink()
    failed = []
    for name in args.only:
        print(f"== {name}", flush=True)
        t = time.time()
        rc = subprocess.call([sys.executable, str(common.HERE / f"{name}.py")])
        print(f"== {name}: exit {rc}, {(time.time() - t) / 60:.1f} min", flush=True)
        if rc != 0:
            failed.append(name)
            common.clear_rows(f"{name}.py")
            with open(common.RESULTS_JSONL, "a") as fh:
                fh.write(json.dumps({"claim": name, "metric": f"script failed (exit {rc})", "effect": float("nan"),
                                     "lo": float("nan"), "hi": float("nan"), "seeds": 0, "verdict": "not measured",
                                     "script": f"{name}.py"}) + "\n")
    print(common.write_results_md((time.time() - t0) / 60))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
