"""`corral demo` from nothing, timed step by step, against the 120-second aim.

Runs `corral demo --fresh` into a temporary folder as a user would after `make install` (the
embedded model already converted), reads the times the demo prints for each step, and prints
JSON: each step's seconds, the demo's own total, the command's wall time, and whether it stayed
under the aim. The demo's outputs (24 generated records, the LoRA run, the held-out answers) are
checked to exist, so a faster demo that skipped work would fail here.

    .venv/bin/python -m benchmarks.demo_time [--aim-seconds 120]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^=== \[(\d+)/\d+\] (.+)$")
TOOK_LINE = re.compile(r"^--- step (\d+) took ([\d.]+) s$")
DONE_LINE = re.compile(r"^Done in (\d+) s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aim-seconds", type=float, default=120.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="corral-demo-") as tmp:
        out = Path(tmp) / "demo_output"
        started = time.perf_counter()
        finished = subprocess.run(
            [str(Path(sys.executable).with_name("corral")), "demo", "--fresh",
             "--output-dir", str(out)],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - started
        if finished.returncode != 0:
            sys.exit(f"corral demo failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
        names, steps, total = {}, {}, None
        for line in (finished.stdout + finished.stderr).splitlines():
            line = line.strip()
            if match := STEP_LINE.match(line):
                names[match[1]] = match[2]
            elif match := TOOK_LINE.match(line):
                steps[names.get(match[1], match[1])] = float(match[2])
            elif match := DONE_LINE.match(line):
                total = int(match[1])
        records = json.loads((out / "data" / "alpaca_data.json").read_text())
        outputs_present = (
            bool(records) and (out / "run").is_dir() and (out / "report.html").is_file()
        )
    print(
        json.dumps(
            {
                "benchmark": "demo_time",
                "step_seconds": steps,
                "demo_total_seconds": total,
                "command_wall_seconds": round(wall, 1),
                "generated_records": len(records),
                "outputs_present": outputs_present,
                "aim_seconds": args.aim_seconds,
                "under_aim": wall < args.aim_seconds,
                "cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
