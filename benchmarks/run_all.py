"""`make bench`: run every benchmark, each as `python -m benchmarks.NAME --json`; results to benchmarks/results/.

Figures go into BENCHMARKS.md by hand, with the machine and the command; nothing here is asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

BENCHMARKS = ["data_pipeline", "loader_memory", "train_throughput", "recovery", "checkpoint_overhead"]


def main() -> int:
    os.makedirs("benchmarks/results", exist_ok=True)
    failed = []
    for name in BENCHMARKS:
        if not os.path.exists(f"benchmarks/{name}.py"):
            continue
        print(f"== benchmarks.{name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--json"], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
            failed.append(name)
            continue
        result = json.loads(lines[-1])
        with open(f"benchmarks/results/{name}.json", "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result), flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
