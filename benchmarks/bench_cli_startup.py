"""CLI start-up: wall time of `rs-embed-assets tiles list | models | similar --help` in fresh processes.

Each command runs ``--repeats`` times as ``python -m rs_embed_assets.cli ...`` against a scratch
DAGSTER_HOME holding a few tile partitions; the best and median wall times are recorded, next to the
cost of the imports these commands avoid (dagster, torch, duckdb).

    .venv/bin/python benchmarks/bench_cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {"tiles list": ["tiles", "list"], "models": ["models"], "similar --help": ["similar", "--help"],
            "tiles --help": ["tiles", "--help"]}
IMPORTS = {"import dagster": "import dagster", "import torch": "import torch", "import duckdb": "import duckdb",
           "python (nothing)": "pass"}


def _time(argv: list[str], env: dict, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DAGSTER_HOME": str(Path(tmp) / "home")}
        subprocess.run([sys.executable, "-m", "rs_embed_assets.cli", "tiles", "add", "31UFU",
                        "31UFU-k36-r21-c12", "31UFU-k36-r21-c13"], env=env, check=True, stdout=subprocess.DEVNULL)
        commands = {name: _time([sys.executable, "-m", "rs_embed_assets.cli", *argv], env, args.repeats)
                    for name, argv in COMMANDS.items()}
        imports = {name: _time([sys.executable, "-c", code], env, args.repeats) for name, code in IMPORTS.items()}
    result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "repeats": args.repeats, "commands": commands, "imports_avoided": imports}
    out = Path(__file__).parent / "results" / "cli_startup.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
