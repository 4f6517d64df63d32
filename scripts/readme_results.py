"""Writes (or checks) the generated blocks of README.md and docs/ from the results files: the one mechanism for
the figures they show.

    python scripts/readme_results.py                     # rewrite every generated block of every page
    python scripts/readme_results.py --check             # exit 1, with a diff, if a page and the results disagree
    python scripts/readme_results.py --rerun-demo        # rerun the digits demo (about 16 min on 2 CPU cores), rewrite
    python scripts/readme_results.py --rerun-demo --quick    # the same with any demo flags (here: a 1-minute run)
    python scripts/readme_results.py --rerun-addition-demo   # rerun the addition attack's recipe, then rewrite

A generated block sits between `<!-- generated: NAME -->` and `<!-- /generated: NAME -->` in the page that `BLOCKS`
gives for it (README.md or a page of docs/), and is rendered from the results files `BLOCKS` names. To show a new
figure, write it to a results file from the command that measures it, add a renderer here and the two markers in its
page; `tests/test_readme_results.py` fails whenever a block and its results file disagree.

A rerun demo runs into its own output folder under runs/ (ignored by git: the trained generator, the ledger and its
journal), and its results folder keeps what the pages render and the run's record (`RESULT_FILES`).
"""

import argparse
import difflib
import json
import posixpath
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = "benchmarks/results/demo"  # where --rerun-demo keeps the demo's results (result.json, digits_grid.png, ...)
ADDITION_DEMO_DIR = "benchmarks/results/addition_demo"  # the addition attack's recipe, the demo before the digits one
# where --rerun-demo runs a demo: its whole output folder (the trained generator, the ledger and its journal,
# checkpoints), ignored by git; `benchmarks/digits_diversity.py` samples the demo's generator there
DEMO_RUN_DIRS = {"demo": "runs/demo", "addition-demo": "runs/addition_demo"}
# what a demo's results folder keeps of its output folder: the summary the pages render, the run's record, its rounds
# and success curve, and its pictures
RESULT_FILES = ("result.json", "banel_run.json", "rounds.jsonl", "success_curve.json", "*.png")
DEFAULTS_RUNS = "benchmarks/results/defaults/runs"  # benchmarks/defaults.py's runs, one file per task, by key
DEFAULTS_SUMMARY = "benchmarks/results/defaults/defaults.json"
DEMOS = {"demo": ("recipes/digits_0_to_6.py", DEMO_DIR), "addition-demo": ("recipes/addition_attack.py",
                                                                           ADDITION_DEMO_DIR)}


@dataclass
class Block:
    sources: list[str]  # files (or globs) under the repository root that the block is rendered from
    render: Callable[[Path], str]  # its text; links in it are relative to the repository root
    page: str = "README.md"  # the file (from the repository root) that holds the block


def _render_output(root: Path, folder: str, summary_text: Callable[[dict], str], picture: str, caption: str,
                   alt: str) -> str:
    """A recipe's printed summary, rendered from `folder/result.json` by `summary_text`, then its `picture` under
    `caption` (which names the file where `{path}` stands)."""
    result = json.loads((root / folder / "result.json").read_text())
    text = (f"Output of `{result['command']}` (seed {result['seed']}; `{folder}/result.json`):\n\n"
            f"```text\n{summary_text(result)}\n```\n")
    if (root / folder / picture).exists():
        path = f"{folder}/{picture}"
        text += f"\n{caption.format(path=f'`{path}`')}\n\n![{alt}]({path})\n"
    return text


def render_demo(root: Path) -> str:
    """The digits demo's printed summary and its picture."""
    sys.path.insert(0, str(root))
    from trl_banel_examples.tasks.digits import demo_summary_text

    return _render_output(root, DEMO_DIR, demo_summary_text, "digits_grid.png",
                          "Its picture ({path}): the generator's samples before and after, each with the classifier's "
                          "P(6):", "before and after")


def defaults_runs(root: Path, task: str) -> list[dict]:
    """`benchmarks/defaults.py`'s runs of a shipped task at the current defaults (the fingerprint its summary was
    made with), by seed."""
    fingerprint = json.loads((root / DEFAULTS_SUMMARY).read_text())["defaults_fingerprint"]
    held = json.loads((root / DEFAULTS_RUNS / f"{task}.json").read_text())
    runs = [r for key, r in held.items()
            if re.fullmatch(r"defaults_seed\d+", key) and r["defaults_fingerprint"] == fingerprint]
    return sorted(runs, key=lambda r: r["seed"])


def _span(values, fmt) -> str:
    return f"{fmt(min(values))}-{fmt(max(values))}" if len(values) > 1 else fmt(values[0])


def render_demo_seeds(root: Path) -> str:
    """How often the digits demo's settings succeed: `benchmarks/defaults.py`'s runs on digits (the package's defaults
    with the task's budget, lengths, batch sizes and stop rule: the demo's settings)."""
    runs = defaults_runs(root, "digits")
    seeds = [r["seed"] for r in runs]
    found = [r for r in runs if r["final"]["successes_found_in_training"] > 0]
    missed = [r for r in runs if r not in found]
    text = (f"How often the demo's settings draw sixes: of the default-round benchmark's {len(runs)} runs on this "
            f"task (seeds {seeds[0]}-{seeds[-1]}, budget 7,500; `{DEFAULTS_RUNS}/digits.json`, `defaults_seed*`), "
            f"{len(found)} found sixes")
    if found:
        text += (f" ({_span([r['final']['successes_found_in_training'] for r in found], str)} each) and ended at "
                 f"success rates {_span([r['final']['rate'] for r in found], '{:.3f}'.format)} after "
                 f"{_span([r['final']['nre'] for r in found], '{:,}'.format)} reward evaluations and "
                 f"{_span([r['cpu_minutes'] for r in found], '{:.1f}'.format)} CPU minutes each")
    if missed:
        names = ", ".join(f"seed {r['seed']}" for r in missed)
        text += (f"; {names} found none in {_span([r['final']['nre'] for r in missed], '{:,}'.format)} evaluations "
                 f"({_span([r['cpu_minutes'] for r in missed], '{:.1f}'.format)} CPU minutes)")
    lifts = [r["final"]["rate"] / r["prior"] for r in runs]
    return (text + f". {sum(x >= 100 for x in lifts)} of {len(runs)} ended at 100x the calibrated pretrained rate or "
            "more (its 95% upper bound when the calibration saw no success). One torch thread, estimates included; "
            "wall time on a shared machine is longer. The demo above is one run on one machine, and the benchmark's "
            "seeds are other runs (another script, which estimates its curve between rounds): their seed 0 is not the "
            "demo's. For a given script and seed a run is deterministic on one machine and software stack (a "
            "benchmark run rerun here reproduced its final and every round exactly), not across machines, where "
            f"float reductions differ and a run can take another path: these {len(runs)} seeds, not the demo's one, "
            "are what to expect.\n")


def render_addition_demo(root: Path) -> str:
    sys.path.insert(0, str(root))
    from trl_banel_examples.tasks.addition import demo_summary_text

    return _render_output(root, ADDITION_DEMO_DIR, demo_summary_text, "run_report.png", "Its run report ({path}):",
                          "run report")


def render_addition_demo_seeds(root: Path) -> str:
    """How often the addition demo's settings succeed: `benchmarks/defaults.py`'s runs on the addition task."""
    runs = defaults_runs(root, "addition")
    lifts = {run["seed"]: run["final"]["rate"] / run["prior"] for run in runs}
    high = {s: x for s, x in lifts.items() if x >= 100}
    low = {s: x for s, x in lifts.items() if x < 100}

    def listed(d):
        return ", ".join(f"{x:.2g}x" if x < 10 else f"{x:,.0f}x" for _, x in sorted(d.items()))

    seeds = sorted(lifts)
    text = (f"How often the recipe's settings find blind spots: of the default-round benchmark's {len(runs)} runs on "
            f"this task (seeds {seeds[0]}-{seeds[-1]}, budget 7,500; `{DEFAULTS_RUNS}/addition.json`, "
            f"`defaults_seed*`), {len(high)} ended at 100x the pretrained success rate or more")
    text += f" ({listed(high)})" if high else ""
    text += f", {len(low)} below 100x ({listed(low)})." if low else "."
    return text + "\n"


def first_table(markdown: str) -> str:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def table_from(path: str) -> Callable[[Path], str]:
    return lambda root: first_table((root / path).read_text())


def render_regimes(root: Path) -> str:
    """One row per task: the pretrained rate, a blind search's (a uniform draw over the well-formed outputs, where the
    results hold it), BaNEL's and the best baseline's median final success over seeds, and how many seeds each put at
    100x the pretrained rate or more (the addition benchmark and the sparse one)."""
    rows = ["| task | pretrained | blind search | BaNEL: median final (seeds >= 100x) | best baseline: median final "
            "(seeds >= 100x) | BaNEL / best baseline |", "| --- | --- | --- | --- | --- | --- |"]

    def cells(finals, reference):
        return f"{statistics.median(finals):.3g} ({sum(f >= 100 * reference for f in finals)} of {len(finals)})"

    addition = json.loads((root / "benchmarks" / "results" / "addition_attack.json").read_text())["methods"]
    pre = addition["pretrained"]["mean"]
    base = {m: v["success_rates"] for m, v in addition.items() if m not in ("pretrained", "banel")}
    best = max(base, key=lambda m: statistics.median(base[m]))
    banel = addition["banel"]["success_rates"]
    rows.append(f"| addition attack (7,500 NRE) | {pre:.2g} | n/a | {cells(banel, pre)} | {best}: "
                f"{cells(base[best], pre)} "
                f"| {statistics.median(banel) / statistics.median(base[best]):.2g}x |")
    sparse = json.loads((root / "benchmarks" / "results" / "sparse.json").read_text())
    for name, task in sparse["tasks"].items():
        methods = task["methods"]
        if "banel" not in methods:
            continue
        ref = task["pretrained"]["reference"]
        base = {m: v["final"] for m, v in methods.items() if m != "banel"}
        if not base:
            continue
        best = max(base, key=lambda m: statistics.median(base[m]))
        banel = methods["banel"]["final"]
        ratio = statistics.median(banel) / max(statistics.median(base[best]), 1e-300)
        label = {"letters": "rare letters"}.get(name, name.replace("_", " "))
        rate = task["pretrained"]["rate"]
        shown = f"{rate:.2g}" if rate > 0 else f"0 (< {task['pretrained']['upper']:.2g})"  # none seen: its bound
        blind = task.get("blind_search")
        blind = f"{blind['rate']:.2g}" if blind else "n/a"
        rows.append(f"| {label} ({sparse['budget']:,} NRE) | {shown} | {blind} "
                    f"| {cells(banel, ref)} | {best}: {cells(base[best], ref)} | {ratio:.2g}x |")
    return "\n".join(rows) + "\n"


def render_defaults(root: Path) -> str:
    """The default round on the pre-registered evaluation tasks (and the shipped ones once measured) beside GRPO:
    `benchmarks/defaults.py --summarize`'s rows (runs of a former round keep their label until rerun)."""
    summary = json.loads((root / "benchmarks" / "results" / "defaults" / "defaults.json").read_text())
    rows = ["| task | pretrained | blind search expects | round | seeds >= 100x | below pretrained | median final |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rows"]:
        shown = ("defaults", "no_known", "support1e-2", "grpo")
        if r["group"] == "tuning" or r["variant"].split(" (")[0] not in shown:
            continue
        blind = r["blind_expected_successes"]
        blind = "n/a" if blind is None else f"{blind:.2g}" + ("" if r["qualifies"] else " (does not qualify)")
        rows.append(f"| {r['task']} | {r['prior']:.2g} | {blind} | {r['variant']} | {r['seeds_100x']} of "
                    f"{len(r['seeds'])} | {r['below_pretrained']} | {r['median_x']:.3g}x |")
    return "\n".join(rows) + "\n"


def render_config_table(root: Path) -> str:
    """BaNEL's own fields and the TrainingArguments defaults it changes, from the dataclass itself."""
    sys.path.insert(0, str(root))
    from trl_banel import BaNELConfig

    # the fields declared in BaNELConfig's body, in its order: its own and the TrainingArguments defaults it changes
    declared = BaNELConfig.__dict__.get("__annotations__", {})
    by_name = {f.name: f for f in fields(BaNELConfig)}
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    for f in (by_name[name] for name in declared if name in by_name):
        default = f.default if f.default is not MISSING else f.default_factory()
        meaning = f.metadata.get("help", "").replace("%%", "%").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{default!r}` | {meaning} |")
    return "\n".join(rows) + "\n"


BENCHMARKS = "docs/benchmarks.md"
BLOCKS: dict[str, Block] = {
    "demo": Block([f"{DEMO_DIR}/result.json", f"{DEMO_DIR}/digits_grid.png"], render_demo),
    "demo-seeds": Block([f"{DEFAULTS_RUNS}/digits.json", DEFAULTS_SUMMARY], render_demo_seeds),
    "regimes": Block(["benchmarks/results/addition_attack.json", "benchmarks/results/sparse.json"], render_regimes),
    "addition-demo": Block([f"{ADDITION_DEMO_DIR}/result.json", f"{ADDITION_DEMO_DIR}/run_report.png"],
                           render_addition_demo, BENCHMARKS),
    "addition-demo-seeds": Block([f"{DEFAULTS_RUNS}/addition.json", DEFAULTS_SUMMARY], render_addition_demo_seeds,
                                 BENCHMARKS),
    "addition-attack-table": Block(["benchmarks/results/addition_attack.md"],
                                   table_from("benchmarks/results/addition_attack.md"), BENCHMARKS),
    "defaults-table": Block(["benchmarks/results/defaults/defaults.json"], render_defaults, BENCHMARKS),
    "config-table": Block(["trl_banel/config.py"], render_config_table, "docs/configuration.md"),
}

_MARKER = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated: (?P=name) -->)", re.S)
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def pages() -> list[str]:
    """The files that hold generated blocks, README.md first."""
    return sorted({block.page for block in BLOCKS.values()}, key=lambda page: (page != "README.md", page))


def relink(text: str, page: str) -> str:
    """`text` with its relative links (written from the repository root) made relative to `page`'s folder."""
    folder = posixpath.dirname(page)
    if not folder:
        return text

    def fix(m):
        target = m.group(2)
        if re.match(r"[a-z]+:|#|/", target):
            return m.group(0)
        return m.group(1) + posixpath.relpath(target, folder) + m.group(3)

    return _LINK.sub(fix, text)


def regenerate(text: str, root: Path, page: str = "README.md") -> tuple[str, list[str]]:
    """`page`'s text with every generated block rendered anew, and the names of the blocks that changed."""
    found = [m.group("name") for m in _MARKER.finditer(text)]
    expected = {name for name, block in BLOCKS.items() if block.page == page}
    unknown = sorted(set(found) - expected)
    missing = sorted(expected - set(found))
    if unknown or missing:
        elsewhere = {name: BLOCKS[name].page for name in unknown if name in BLOCKS}
        raise ValueError(f"{page}'s generated blocks do not match scripts/readme_results.py: unknown {unknown}"
                         + (f" (their pages: {elsewhere})" if elsewhere else "") + f", missing {missing}.")
    changed = []

    def replace(m):
        name = m.group("name")
        for source in BLOCKS[name].sources:
            if not list(root.glob(source)):
                how = {"demo": "python scripts/readme_results.py --rerun-demo",
                       "addition-demo": "python scripts/readme_results.py --rerun-addition-demo"}.get(
                    name, "its benchmark")
                raise FileNotFoundError(f"block {name!r} of {page} is rendered from {source}, which is missing; "
                                        f"produce it with {how}.")
        body = relink(BLOCKS[name].render(root), page)
        if body != m.group("body"):
            changed.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    return _MARKER.sub(replace, text), changed


def rerun_demo(root: Path, demo_flags: list[str], which: str = "demo"):
    """Runs the demo into its output folder (`DEMO_RUN_DIRS`), then keeps its results in its results folder."""
    script, folder = DEMOS[which]
    run = root / DEMO_RUN_DIRS[which]
    # the folder holds the previous demo run, which the trainer would refuse to train on again: it is all generated
    # (its results are in git), so it is replaced
    if run.exists():
        shutil.rmtree(run)
    command = [sys.executable, str(ROOT / script), "--output_dir", str(run), *demo_flags]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    keep_results(run, root / folder)


def keep_results(run: Path, folder: Path) -> list[str]:
    """Replaces `folder` with the files of `run` that `RESULT_FILES` names (the results, not the model or the
    ledger). Returns their names."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    kept = sorted({f.name for pattern in RESULT_FILES for f in run.glob(pattern) if f.is_file()})
    for name in kept:
        shutil.copy2(run / name, folder / name)
    print(f"kept in {folder}: {', '.join(kept)} (the run's whole output folder: {run})", flush=True)
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip(), usage=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a block is out of date")
    parser.add_argument("--rerun-demo", action="store_true",
                        help="rerun the demo into runs/demo first, keeping its results in benchmarks/results/demo "
                             "(other flags go to the demo)")
    parser.add_argument("--rerun-addition-demo", action="store_true",
                        help="rerun the addition attack's recipe into runs/addition_demo first, keeping its results "
                             "in benchmarks/results/addition_demo")
    parser.add_argument("--root", default=str(ROOT), help="repository root (tests use a copy)")
    args, demo_flags = parser.parse_known_args(argv)
    if demo_flags and not (args.rerun_demo or args.rerun_addition_demo):
        parser.error(f"unrecognized arguments: {' '.join(demo_flags)}")
    root = Path(args.root)
    if args.rerun_demo:
        rerun_demo(root, demo_flags)
    if args.rerun_addition_demo:
        rerun_demo(root, demo_flags, "addition-demo")
    updates = {}  # page: (old text, new text, names of the blocks that changed)
    for page in pages():
        old = (root / page).read_text()
        new, changed = regenerate(old, root, page)
        if changed:
            updates[page] = (old, new, changed)
    stale = "; ".join(f"{page}: {', '.join(changed)}" for page, (_, _, changed) in updates.items())
    if args.check:
        if updates:
            for page, (old, new, _) in updates.items():
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), page,
                                                           f"{page} as the results files say"))
            print(f"\nout of date: {stale}; run: python scripts/readme_results.py")
            return 1
        print(f"{', '.join(pages())}: every generated block agrees with the results files.")
        return 0
    for page, (_, new, _) in updates.items():
        (root / page).write_text(new)
    print(f"rewrote: {stale}" if updates else "every generated block was already up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
