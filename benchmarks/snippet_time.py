"""How long the README's "Use" snippet takes a new user: the code exactly as written (budget 500), in a fresh
process, imports included, torch's own thread settings, one run after another.

    python benchmarks/snippet_time.py              # 3 runs; benchmarks/results/snippet_time.{json,md,png}
    python benchmarks/snippet_time.py --runs 5

Issue #31's target: under 30 seconds on 2 idle cores. Each run's wall time is split into the import of the packages
(timed by a separate fresh process that only imports them) and the rest; the table says how busy the machine was
(the load average before each run), since a shared machine's other jobs slow every figure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
TARGET_SECONDS = 30.0
IMPORTS = "from datasets import Dataset\nfrom trl_banel import BaNELConfig, BaNELTrainer\n" \
          "from trl_banel_examples.tasks.addition import load_addition_task\n"


@dataclass
class Args:
    runs: int = 3


def snippet() -> str:
    """The first python block after "## Use" in README.md, as a user copies it."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n", readme.index("## Use")) + len("```python\n")
    return readme[start : readme.index("```\n", start)]


def timed_run(code: str) -> dict:
    """One fresh process running `code` in an empty folder: wall seconds, exit code, the rounds it printed."""
    work = Path(tempfile.mkdtemp(prefix="snippet_"))
    (work / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=work, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the snippet failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "load_before": load, "rounds": len(re.findall(r"^round \d+ \|", proc.stdout, re.M))}


def main(args: Args):
    code = snippet()
    rows = []
    for i in range(args.runs):
        imports = timed_run(IMPORTS)["seconds"]
        run = timed_run(code)
        rows.append({**run, "imports": imports})
        print(f"run {i + 1}: {run['seconds']:.1f} s ({imports:.1f} s of imports), {run['rounds']} rounds, "
              f"load average {run['load_before']:.2f} before", flush=True)
    median = statistics.median(r["seconds"] for r in rows)
    result = {"what": "the README's Use snippet as written, fresh process, imports included", "runs": rows,
              "median_seconds": median, "target_seconds": TARGET_SECONDS, "cpu_count": os.cpu_count()}
    (OUT / "snippet_time.json").write_text(json.dumps(result, indent=1))
    lines = ["# The README's snippet, timed (`python benchmarks/snippet_time.py`)", "",
             f"{os.cpu_count()} CPU cores; target (issue #31): under {TARGET_SECONDS:.0f} s on 2 idle cores.", "",
             "| run | wall (s) | of which imports (s) | rounds | load average before |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {i + 1} | {r['seconds']:.1f} | {r['imports']:.1f} | {r['rounds']} | {r['load_before']:.2f} |"
              for i, r in enumerate(rows)]
    lines += ["", f"Median: {median:.1f} s."]
    (OUT / "snippet_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(1, len(rows) + 1)
    ax.bar(xs, [r["imports"] for r in rows], label="imports", color="#bbbbbb")
    ax.bar(xs, [r["seconds"] - r["imports"] for r in rows], bottom=[r["imports"] for r in rows], label="the rest")
    ax.axhline(TARGET_SECONDS, color="red", linestyle="--", label=f"target {TARGET_SECONDS:.0f} s")
    ax.set_xticks(list(xs))
    ax.set_xlabel("run")
    ax.set_ylabel("wall seconds")
    ax.set_title("The README's snippet (budget 500)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "snippet_time.png", dpi=120)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=Args.runs, help="snippet runs, one after another")
    main(Args(**vars(parser.parse_args())))
