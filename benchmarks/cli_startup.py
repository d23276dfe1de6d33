"""How long `domainfm --help` and `domainfm plugins` take against importing the heavy libraries.

Target: each under 20% of `python -c "import torch, lightning, mlflow"`. Every command runs in a
fresh interpreter, several times, and the median is compared, side by side in one run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPEATS = 5


def median_seconds(cmd: list[str]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    heavy = median_seconds([sys.executable, "-c", "import torch, lightning, mlflow"])
    rows = [("python -c 'import torch, lightning, mlflow'", heavy)]
    for args in (["--help"], ["plugins"]):
        rows.append((f"domainfm {' '.join(args)}", median_seconds([str(BIN / "domainfm"), *args])))
    print(f"{'command':48s} {'median s':>9s} {'ratio':>7s}")
    for name, t in rows:
        print(f"{name:48s} {t:9.3f} {t / heavy:7.1%}")
    worst = max(t for _, t in rows[1:]) / heavy
    print(f"\nworst ratio {worst:.1%} (target < 20%): {'OK' if worst < 0.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
