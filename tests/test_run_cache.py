"""The benchmarks' run caches: one JSON file per task (benchmarks.common.RunCache), written under a lock so that
processes running other seeds of a task keep each other's runs, and `benchmarks/defaults.py --import_runs`, which
merges runs made elsewhere (one file per run, the layout before) into it."""

import json
import shutil
import multiprocessing
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import defaults  # noqa: E402
from benchmarks.common import RunCache, parse_args  # noqa: E402


def test_a_task_file_holds_one_run_per_line_in_natural_order_and_reads_back_what_was_written(tmp_path):
    cache = RunCache(tmp_path / "runs" / "t.json")
    assert cache.load() == {} and cache.get("a_seed0") is None
    runs = {f"banel_seed{s}": {"seed": s, "rate": 1 / (s + 3), "curve": [{"nre": 0, "p": 1e-300}], "x": None}
            for s in (10, 2, 1)}
    for key, run in runs.items():
        cache.put(key, run)
    cache.put("pretrained", {"rate": 0.1})
    assert cache.load() == {**runs, "pretrained": {"rate": 0.1}}  # floats and nesting as written
    lines = (tmp_path / "runs" / "t.json").read_text().splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and len(lines) == 2 + 4
    assert [json.loads("{" + line.rstrip(",") + "}").popitem()[0] for line in lines[1:-1]] == [
        "banel_seed1", "banel_seed2", "banel_seed10", "pretrained"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["t.json"]  # no lock file, no temporary file left


def test_merge_keeps_a_held_run_when_told_and_reports_what_it_wrote(tmp_path):
    cache = RunCache(tmp_path / "t.json")
    cache.put("a", {"v": 1})
    written = cache.merge({"a": {"v": 2}, "b": {"v": 3}}, keep=lambda key, held, new: True)
    assert written == ["b"] and cache.load() == {"a": {"v": 1}, "b": {"v": 3}}
    written = cache.merge({"a": {"v": 2}, "b": {"v": 3}}, keep=lambda key, held, new: new["v"] < held["v"])
    assert written == ["a"] and cache.load() == {"a": {"v": 2}, "b": {"v": 3}}
    mtime = (tmp_path / "t.json").stat().st_mtime_ns
    assert cache.merge({"a": {"v": 0}}, keep=lambda *a: True) == []
    assert (tmp_path / "t.json").stat().st_mtime_ns == mtime  # nothing written when nothing changes


def _writer(path: str, worker: int, n: int, ready, go) -> None:
    ready.wait()
    go.wait()
    cache = RunCache(path)
    for seed in range(n):
        cache.put(f"w{worker}_seed{seed}", {"worker": worker, "seed": seed, "pad": "x" * 2000})


def test_processes_writing_other_seeds_of_one_task_at_once_lose_none_of_each_others_runs(tmp_path):
    """Each write re-reads the file under the folder's lock: without it, two read-modify-writes racing drop runs."""
    path, workers, n = str(tmp_path / "t.json"), 3, 40
    context = multiprocessing.get_context("fork")
    ready, go = context.Barrier(workers), context.Barrier(workers)
    processes = [context.Process(target=_writer, args=(path, w, n, ready, go)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0] * workers
    held = RunCache(path).load()
    assert sorted(held) == sorted(f"w{w}_seed{s}" for w in range(workers) for s in range(n))
    assert all(run["seed"] == int(key.split("seed")[1]) for key, run in held.items())


def _record(task: str, variant: str, seed: int, fingerprint: str, rate: float) -> dict:
    """A run record as benchmarks/defaults.py writes it (the fields its summary reads)."""
    return {"method": "banel", "seed": seed, "task": task, "group": "evaluation", "variant": variant, "budget": 2000,
            "prior": 1e-5, "blind": None, "defaults_fingerprint": fingerprint, "overrides": {},
            "best_curve_rate": rate, "minutes": 1.0, "stop_reason": "budget spent", "curve": [],
            "final": {"rate": rate, "low": rate, "high": rate, "nre": 2000, "successes_found_in_training": 0}}


def test_import_runs_merges_old_layout_and_task_files_keeping_what_the_results_hold(tmp_path, capsys):
    current, former = defaults.defaults_fingerprint(), "e46948aaaaaaaaaa"
    out = tmp_path / "results"
    held = RunCache(out / "runs" / "t1.json")
    held.put("defaults_seed0", _record("t1", "defaults", 0, current, 1e-3))  # already there: stays
    held.put("defaults_seed1", _record("t1", "defaults", 1, former, 1e-4))  # former defaults: gives way
    source = tmp_path / "elsewhere" / "benchmarks" / "results" / "defaults"
    (source / "runs" / "t1").mkdir(parents=True)
    old_layout = {"defaults_seed0": _record("t1", "defaults", 0, current, 0.5),
                  "defaults_seed1": _record("t1", "defaults", 1, current, 2e-3),
                  "defaults_seed2": _record("t1", "defaults", 2, current, 3e-3),
                  "no_known_seed2": _record("t1", "no_known", 2, former, 4e-3)}
    for key, record in old_layout.items():
        (source / "runs" / "t1" / f"{key}.json").write_text(json.dumps(record, indent=1))
    # a task file (the new layout) and a summary, which is no run and is left alone
    (source / "runs" / "t2.json").write_text(json.dumps({"defaults_seed5": _record("t2", "defaults", 5, current, 1)}))
    (source / "defaults.json").write_text(json.dumps({"defaults_fingerprint": current, "rows": []}))

    args = parse_args(defaults.Args, defaults.QUICK, ["--import_runs", str(source), "--out", str(out)])
    summary = defaults.main(args)

    printed = capsys.readouterr().out
    t1 = RunCache(out / "runs" / "t1.json").load()
    assert t1["defaults_seed0"]["final"]["rate"] == 1e-3  # held, not overwritten
    assert t1["defaults_seed1"] == old_layout["defaults_seed1"]  # the current defaults replaced the former ones
    assert t1["defaults_seed2"] == old_layout["defaults_seed2"] and t1["no_known_seed2"] == old_layout[
        "no_known_seed2"]
    assert RunCache(out / "runs" / "t2.json").load() == {"defaults_seed5": _record("t2", "defaults", 5, current, 1)}
    assert "imported t1 defaults_seed1 from" in printed and "(replaced a run of former defaults)" in printed
    assert "imported t1 defaults_seed2 from" in printed and "imported t2 defaults_seed5 from" in printed
    assert "defaults_seed0 from" not in printed and "imported 4 run(s) from" in printed and "1 already held" in printed
    rows = {(r["task"], r["variant"]): r for r in summary["rows"]}  # the summary is rebuilt from the merged runs
    assert rows[("t1", "defaults")]["seeds"] == [0, 1, 2] and rows[("t2", "defaults")]["seeds"] == [5]
    assert (out / "defaults.md").exists() and json.loads((out / "defaults.json").read_text()) == summary

    # a second import takes nothing, and the runs are unchanged
    before = {p.name: p.read_text() for p in (out / "runs").iterdir()}
    defaults.import_runs(source, out / "runs")
    assert "imported 0 run(s)" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in (out / "runs").iterdir()} == before
    with pytest.raises(ValueError, match="not a folder"):
        defaults.import_runs(tmp_path / "missing", out / "runs")


def test_pruned_runs_leave_the_results_and_no_later_import_brings_them_back(tmp_path, capsys):
    """`--prune VARIANT`: a candidate's records leave the results folder (its size limit), noted with the commit that
    holds them; importing a worktree made before the prune, which still holds them, leaves them out."""
    current = defaults.defaults_fingerprint()
    out = tmp_path / "results"
    records = {"defaults_seed0": _record("t1", "defaults", 0, current, 1e-3),
               "sgd_seed0": _record("t1", "sgd", 0, current, 2e-3),
               "sgd_seed1": _record("t1", "sgd", 1, current, 3e-3)}
    for key, record in records.items():
        RunCache(out / "runs" / "t1.json").put(key, record)
        RunCache(out / "runs" / "t2.json").put(key, {**record, "task": "t2"})
    source = tmp_path / "worktree" / "runs"
    source.mkdir(parents=True)
    shutil.copy(out / "runs" / "t1.json", source / "t1.json")

    summary = defaults.main(parse_args(defaults.Args, defaults.QUICK, ["--prune", "sgd", "--tasks", "t1",
                                                                       "--out", str(out)]))
    assert sorted(RunCache(out / "runs" / "t1.json").load()) == ["defaults_seed0"]
    assert sorted(RunCache(out / "runs" / "t2.json").load()) == sorted(records)  # another task: untouched
    notes = json.loads((out / defaults.PRUNED_FILE).read_text())
    assert sorted(notes) == ["t1"] and sorted(notes["t1"]) == ["sgd_seed0", "sgd_seed1"]
    assert ("t1", "sgd") not in {(r["task"], r["variant"]) for r in summary["rows"]}
    assert "pruned t1: sgd_seed0, sgd_seed1" in capsys.readouterr().out

    defaults.import_runs(source, out / "runs")
    assert sorted(RunCache(out / "runs" / "t1.json").load()) == ["defaults_seed0"]
    printed = capsys.readouterr().out
    assert "left out t1 sgd_seed0: pruned" in printed and "imported 0 run(s)" in printed


def test_a_run_held_under_the_current_defaults_is_reused_without_loading_its_task(tmp_path):
    record = _record("no_such_task", "defaults", 3, defaults.defaults_fingerprint(), 0.25)
    RunCache(tmp_path / "no_such_task.json").put("defaults_seed3", record)
    assert defaults.run("evaluation", "no_such_task", "defaults", 3, 2000, tmp_path) == record
    with pytest.raises(ValueError, match="not in the evaluation set"):  # another budget: it would be run again
        defaults.run("evaluation", "no_such_task", "defaults", 3, 1000, tmp_path)


def test_a_runs_traces_are_packed_by_column_and_read_back_by_round(tmp_path):
    """Per-round traces are most of a run file's bytes: the file holds one list per key, 4 significant digits; a
    reader gets one dict per round back, a key a round lacked still absent, the results untouched."""
    rounds = [{"round": 0, "nre": 50, "generator/entropy": 0.123456789},
              {"round": 1, "nre": 100, "generator/entropy": 0.2, "distill/backoff": 0.3333333333}]
    record = {"final": {"rate": 1.23456789e-05}, "rounds": rounds, "step_sizes": [], "curve": [{"rate": 0.123456789}]}
    cache = RunCache(tmp_path / "t.json")
    cache.put("defaults_seed0", record)
    held = json.loads((tmp_path / "t.json").read_text())["defaults_seed0"]
    assert held["rounds"] == {"columns": {"round": [0, 1], "nre": [50, 100], "generator/entropy": [0.1235, 0.2],
                                          "distill/backoff": [None, 0.3333]}}
    back = cache.get("defaults_seed0")
    assert back["rounds"] == [{"round": 0, "nre": 50, "generator/entropy": 0.1235},
                              {"round": 1, "nre": 100, "generator/entropy": 0.2, "distill/backoff": 0.3333}]
    assert back["final"] == record["final"] and back["curve"] == record["curve"] and back["step_sizes"] == []
