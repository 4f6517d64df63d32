"""benchmarks/sparse.py: the summary statistics on hand-made runs, the exact estimates, and --quick end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (blind_search, exact_blind, improvement_over_best_baseline, seed_curves,  # noqa: E402
                               seed_stats, summarise_task)
from trl_banel.stats import ExactSuccess, SuccessEstimate  # noqa: E402
from trl_banel_examples.tasks.common import weights_hash  # noqa: E402


def _run(method, seed, final, best=None, high=None, curve=((0, 0.0),)):
    best = final if best is None else best
    high = final if high is None else high
    return {"method": method, "seed": seed, "settings": {"lr": 1},
            "final": {"rate": final, "low": 0.0, "high": high, "nre": 7500, "successes_found_in_training": seed,
                      "steps": 1},
            "best": {"estimate": {"rate": best, "low": 0.0, "high": max(best, high)},
                     "point": {"nre": 0, "rate": best}},
            "curve": [{"nre": n, "rate": r, "low": r, "high": r} for n, r in curve], "minutes": 1.0 + seed}


def test_seed_stats_median_iqr_and_multiples():
    rates = [0.0, 1e-5, 2e-5, 1e-4, 1e-3]
    s = seed_stats(rates, reference=1e-6)
    assert s["median"] == 2e-5 and s["q25"] == 1e-5 and s["q75"] == 1e-4 and s["iqr"] == pytest.approx(9e-5)
    assert s["seeds_10x"] == 4 and s["seeds_100x"] == 2 and s["n"] == 5  # >= 1e-5 and >= 1e-4, boundaries included
    assert s["median_vs_pretrained"] == pytest.approx(20)
    assert "seeds_10x" not in seed_stats(rates, reference=None)


def test_improvement_over_the_best_baseline_uses_its_upper_bound_when_it_is_zero():
    mine = [1e-3, 2e-3, 3e-3]
    # the best baseline by median is b (1e-4): the ratio is against its estimate
    r = improvement_over_best_baseline(mine, {"a": {"rates": [0, 0, 5e-5], "high": [1e-3] * 3},
                                              "b": {"rates": [1e-4] * 3, "high": [2e-4] * 3}})
    assert r["best_baseline"] == "b" and r["against"] == "estimate" and r["ratio"] == pytest.approx(20)
    # every baseline at 0: against the best one's 95% upper bound (the first on ties), a lower bound on the gain
    r = improvement_over_best_baseline(mine, {"a": {"rates": [0, 0, 0], "high": [1e-4, 2e-4, 3e-4]},
                                              "b": {"rates": [0, 0, 0], "high": [1e-3] * 3}})
    assert r["best_baseline"] == "a" and r["against"] == "upper bound" and r["ratio"] == pytest.approx(10)
    # an exact 0 (upper bound 0 too): no finite ratio, and it says so
    r = improvement_over_best_baseline(mine, {"a": {"rates": [0.0], "high": [0.0]}})
    assert r["ratio"] is None and r["exactly_zero"]
    assert improvement_over_best_baseline(mine, {})["ratio"] is None


def test_summarise_task_on_hand_made_runs():
    runs = {"banel": [_run("banel", s, r) for s, r in enumerate([1e-2, 2e-2, 3e-5, 4e-2, 5e-2])],
            "grpo": [_run("grpo", s, 0.0, high=3e-4) for s in range(3)],
            "nsr": [_run("nsr", s, r) for s, r in enumerate([1e-5, 2e-5, 3e-5])]}
    pre = {"rate": 1e-5, "low": 5e-6, "high": 2e-5}
    out = summarise_task(runs, pre)["methods"]
    assert list(out) == ["banel", "grpo", "nsr"]
    b = out["banel"]
    assert b["seeds"] == [0, 1, 2, 3, 4] and b["final"] == [1e-2, 2e-2, 3e-5, 4e-2, 5e-2] and b["best"] == b["final"]
    assert b["successes_found"] == [0, 1, 2, 3, 4] and b["minutes"] == [1, 2, 3, 4, 5] and b["nre"] == [7500] * 5
    s = b["summary"]["final"]
    assert s["median"] == 2e-2 and s["iqr"] == pytest.approx(4e-2 - 1e-2)
    assert s["seeds_10x"] == 4 and s["seeds_100x"] == 4  # 3e-5 is 3x the pretrained rate
    vs = s["vs_best_baseline"]  # nsr's median 2e-5 beats grpo's 0: against nsr's estimate
    assert vs["best_baseline"] == "nsr" and vs["against"] == "estimate" and vs["ratio"] == pytest.approx(1000)
    # for a baseline, the best *other* one: nsr against grpo, whose median is 0, so against grpo's upper bound
    vs = out["nsr"]["summary"]["final"]["vs_best_baseline"]
    assert vs["best_baseline"] == "grpo" and vs["against"] == "upper bound"
    assert vs["ratio"] == pytest.approx(2e-5 / 3e-4)
    # a pretrained estimate of 0 is replaced by its upper bound as the reference of the multiples
    s0 = summarise_task(runs, {"rate": 0.0, "low": 0.0, "high": 1e-3})["methods"]["banel"]["summary"]["final"]
    assert s0["seeds_10x"] == 4 and s0["seeds_100x"] == 0


def test_seed_curves_median_and_spread_take_each_seeds_last_point():
    runs = {"m": [_run("m", 0, 0, curve=[(0, 1.0), (500, 3.0)]), _run("m", 1, 0, curve=[(0, 2.0), (400, 4.0)]),
                  _run("m", 2, 0, curve=[(0, 0.0)])]}
    pts = {p["nre"]: p for p in seed_curves(runs)["m"]}
    assert sorted(pts) == [0, 400, 500]
    # medians of (1,2,0) (1,4,0) (3,4,0)
    assert pts[0]["rate"] == 1.0 and pts[400]["rate"] == 1.0 and pts[500]["rate"] == 3.0
    assert pts[500]["low"] == pytest.approx(np.percentile([3, 4, 0], 25)) and pts[500]["seeds"] == 3
    mean = {p["nre"]: p for p in seed_curves(runs, spread=(0, 100), center="mean")["m"]}
    assert mean[400]["rate"] == pytest.approx(5 / 3) and (mean[400]["low"], mean[400]["high"]) == (0.0, 4.0)


def test_blind_search_counts_are_the_enumerated_spaces():
    """The blind search's counts, computed without listing: the success strings and queries the tasks enumerate."""
    from trl_banel_examples.tasks import hard_attack, letters

    for min_a in (5, 6, 7, 8):
        assert letters.success_count(min_a) == len(letters.success_strings(min_a))
    assert letters.valid_string_count() == len(letters.LETTERS) ** letters.LENGTH
    for digits in (1, 2):
        assert hard_attack.query_space_size(digits) == len(set(hard_attack.all_queries(digits)))


def test_blind_search_draws_without_replacement_on_an_enumerated_space():
    # 1 success among 10 outputs, 5 distinct draws: found half the time, 0.5 expected
    half = blind_search(exact_blind(1, 10, "toy"), 5)
    assert half["rate"] == 0.1 and half["p_at_least_one"] == pytest.approx(0.5)
    assert half["expected_successes"] == pytest.approx(0.5)
    # a budget above the space draws all of it: the success is certain, and counted once
    whole = blind_search(exact_blind(1, 10, "toy"), 50)
    assert whole["p_at_least_one"] == pytest.approx(1.0) and whole["expected_successes"] == pytest.approx(1.0)
    # a Monte Carlo reference (no enumerated space): independent draws at its rate
    mc = blind_search({"rate": 0.01, "low": 0.0, "high": 0.02, "exact": False, "space": None, "successes": None,
                       "what": "toy"}, 100)
    assert mc["p_at_least_one"] == pytest.approx(1 - 0.99**100) and mc["expected_successes"] == pytest.approx(1.0)


def test_digits_blind_search_draws_uniform_intensities_and_applies_the_success_rule():
    from trl_banel_examples.tasks import digits

    class FirstPixelClassifier:  # "a six" exactly when the first pixel is 8 or brighter: 9 of 17 levels
        def probabilities(self, images):
            p = np.zeros((len(images), 10))
            p[:, digits.TARGET_DIGIT] = images[:, 0] >= 8
            return p

    est = digits.uniform_image_success_rate(FirstPixelClassifier(), n=50_000, seed=3)
    assert est.samples == 50_000 and est.low <= 9 / 17 <= est.high
    assert est.rate == digits.uniform_image_success_rate(FirstPixelClassifier(), n=50_000, seed=3).rate


def test_exact_estimate_has_the_monte_carlo_dict_shape():
    exact = ExactSuccess(3e-6, acceptance_rate=0.9).to_dict()
    mc = SuccessEstimate.from_counts(3, 1000).to_dict()
    assert set(mc) <= set(exact) and exact["low"] == exact["high"] == exact["rate"] == 3e-6 and exact["exact"]
    assert exact["samples"] is None and exact["oracle_calls"] == 0


def test_hard_attack_exact_estimates_and_weight_hash():
    """The plain estimate is the exact prior; BaNEL's conditions on avoiding the known failures; the hash of the
    weights sees any change and nothing else."""
    import torch

    from benchmarks.common import hard_attack_task
    from trl_banel_examples.tasks import hard_attack
    from trl_banel_examples.tasks.common import sequence_log_probs

    task = hard_attack_task()
    model, tok, oracle = task.load()
    prior = task.estimate(model, tok, oracle, 0, 0).rate
    cal = json.loads((ROOT / "benchmarks" / "results" / "hard_attack_calibration.json").read_text())
    assert prior == pytest.approx(cal["exact_prior"], rel=1e-4)
    successes = hard_attack.load_successes()
    failures = ["1+1=", "12+34=", "5+5=", "123+456="]
    rate, accepted = hard_attack.posterior_success_probability(model, tok, successes, failures + successes[:2], 12)
    p_f = float(sequence_log_probs(model, tok, failures).exp().sum())  # a success listed as failure is ignored
    assert accepted == pytest.approx(1 - p_f) and rate == pytest.approx(prior / (1 - p_f))
    # a failure of max_completion_length tokens was cut before its <eos>: the probability of the prefix
    cut = "1234567890+1"
    _, acc_cut = hard_attack.posterior_success_probability(model, tok, successes, [cut], len(cut))
    assert acc_cut == pytest.approx(1 - float(sequence_log_probs(model, tok, [cut], append_eos=False).exp()[0]))
    other, _, _ = task.load()
    assert weights_hash(other) == weights_hash(model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert weights_hash(other) != weights_hash(model)


def test_a_calibration_of_another_generator_is_refused(tmp_path):
    """The digits prior comes from the calibration file only if it was measured on the shipped generator."""
    import dataclasses

    from benchmarks.common import TASKS, run_pretrained

    task = TASKS["digits"]()
    calibration = json.loads(task.calibration.read_text())
    assert calibration["generator_weights"] == weights_hash(task.load()[0])  # the shipped file is the shipped model's
    other = tmp_path / "digits_calibration.json"
    other.write_text(json.dumps({**calibration, "generator_weights": "0" * 64}))
    with pytest.raises(ValueError, match="measured on another generator"):
        run_pretrained(dataclasses.replace(task, calibration=other), 0, 10_000)
    run = run_pretrained(task, 0, 10_000)
    assert run["final"]["samples"] == calibration["prior"]["n"] and run["final"]["oracle_calls"] == 0


def test_digits_models_runs_another_generator_against_its_own_calibration(tmp_path):
    """--digits_models: the task with another generator (here the shipped one, nudged) takes its prior from the
    calibration beside its models folder, not from the shipped one's."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common import TASKS, run_pretrained, with_models
    from trl_banel.stats import clopper_pearson

    shipped = TASKS["digits"]()
    models = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "trl_banel_examples" / "tasks" / "digits_models", models)
    generator = AutoModelForCausalLM.from_pretrained(models / "generator")
    with torch.no_grad():
        next(generator.parameters()).view(-1)[0] += 1e-3
    generator.save_pretrained(models / "generator")
    prior = {"n": 150_000, "successes": 7, "rate": 7 / 150_000,
             "ci95_clopper_pearson": list(clopper_pearson(7, 150_000))}
    calibration = {"prior": prior, "generator_weights": weights_hash(generator)}
    (tmp_path / "calibration.json").write_text(json.dumps(calibration))
    task = with_models(shipped, models)
    assert weights_hash(task.load()[0]) == weights_hash(generator) != weights_hash(shipped.load()[0])
    run = run_pretrained(task, 0, 10_000)  # its 150,000 samples, no new one
    assert run["final"]["samples"] == 150_000 and run["final"]["successes"] == 7 and run["final"]["oracle_calls"] == 0
    with pytest.raises(ValueError, match="expected generator/ and classifier/"):
        with_models(shipped, tmp_path / "nothing")


@pytest.mark.parametrize("name", ["letters", "hard_attack", "digits"])
def test_each_tasks_benchmark_round_is_the_one_its_ten_banel_seeds_ran(name):
    """A task's BENCHMARK_ROUND is what the sparse benchmark ran as `banel` on seeds 0-9 (the figures in
    docs/benchmarks.md and the regime table): changing one without rerunning the other would describe settings nobody
    runs. The runs predate two fields and relied on the package's defaults of the time for them (the posterior
    objective, no target KL), which the settings now pin."""
    import importlib

    settings = importlib.import_module(f"trl_banel_examples.tasks.{name}").BENCHMARK_ROUND
    held = json.loads((ROOT / "benchmarks" / "results" / "sparse_runs" / f"{name}.json").read_text())
    runs = {key: run for key, run in held.items() if key.startswith("banel_seed")}
    assert sorted(run["seed"] for run in runs.values()) == list(range(10))
    former_defaults = {"distill_objective": "posterior", "distill_target_kl": 0.0}
    run_only = {"use_cpu", "bf16", "seed", "num_rounds", "budget", "eval_samples", "generator_weights"}
    for key, run in runs.items():
        ran = {**former_defaults, **run["settings"]}
        assert {k: v for k, v in ran.items() if k not in run_only} == settings, key


@pytest.mark.slow  # the benchmark's --quick run, every task and method: about 2 min
def test_sparse_benchmark_quick_end_to_end_and_resumed(tmp_path):
    """--quick on every task writes sparse.json in the issue's shape; a second invocation reuses every run file."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    command = [sys.executable, str(ROOT / "benchmarks" / "sparse.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "sparse.json").read_text())
    assert result["budget"] == 100 and set(result["tasks"]) == {"letters", "hard_attack", "digits"}
    for name, task in result["tasks"].items():
        pre = task["pretrained"]
        assert 0 <= pre["rate"] <= pre["upper"] <= 1
        assert set(task["methods"]) == {"banel", "grpo", "grpo_rnd", "grpo_counts", "nsr"}
        for m in task["methods"].values():
            assert m["seeds"] == [0] and len(m["final"]) == len(m["best"]) == 1
            assert all(0 <= x <= 1 for x in m["final"] + m["best"]) and m["nre"][0] <= 100
            assert {"median", "iqr", "seeds_10x", "seeds_100x", "vs_best_baseline"} <= set(m["summary"]["final"])
            assert len(m["final_high"]) == len(m["successes_found"]) == len(m["minutes"]) == 1
    hard = result["tasks"]["hard_attack"]
    assert hard["pretrained"]["exact"] and hard["pretrained"]["rate"] == hard["pretrained"]["upper"] > 0
    assert all(m["final_low"] == m["final_high"] == m["final"] for m in hard["methods"].values())  # exact
    letters = result["tasks"]["letters"]  # exact too; the prior is the shipped generator's
    assert letters["pretrained"]["exact"] and 1e-6 < letters["pretrained"]["rate"] <= 2e-5
    assert all(m["final_low"] == m["final_high"] == m["final"] for m in letters["methods"].values())
    # 100 samples at 3e-6 see no success: GRPO's weights never move and it reuses the pretrained estimate; a bonus
    # moves them, so RND pays for its own
    assert hard["methods"]["grpo"]["reused_pretrained_estimate"] == [True]
    assert hard["methods"]["grpo"]["final"] == [hard["pretrained"]["rate"]]
    assert hard["methods"]["grpo_rnd"]["reused_pretrained_estimate"] == [False]
    # digits' pretrained estimate is the calibration's 200,000 samples (none a success), not 300 new ones
    prior = json.loads((ROOT / "benchmarks" / "results" / "digits_calibration.json").read_text())["prior"]
    digits_prior = result["tasks"]["digits"]["pretrained"]
    assert digits_prior["rate"] == prior["rate"] and digits_prior["upper"] == pytest.approx(
        prior["ci95_clopper_pearson"][1])
    # the blind-search reference, per task: the hard attack's 22 of 10^6 queries, drawn 100 times
    from trl_banel_examples.tasks import hard_attack

    blind = hard["blind_search"]
    assert blind["exact"] and blind["successes"] == len(hard_attack.load_successes()) and blind["space"] == 10**6
    assert blind["budget"] == 100 and blind["expected_successes"] == pytest.approx(100 * blind["successes"] / 1e6)
    assert blind["vs_pretrained"] == pytest.approx(blind["rate"] / hard["pretrained"]["rate"])
    assert 0 < result["tasks"]["digits"]["blind_search"]["rate"] < 1 and letters["blind_search"]["exact"]
    assert "Blind search" in (tmp_path / "sparse.md").read_text()
    assert (tmp_path / "sparse.md").exists() and (tmp_path / "sparse.png").exists()
    files = sorted((tmp_path / "sparse_runs").glob("*.json"))
    assert [f.name for f in files] == ["digits.json", "hard_attack.json", "letters.json"]  # one file per task
    for f in files:  # the pretrained estimate and one run per method
        assert sorted(json.loads(f.read_text())) == ["banel_seed0", "grpo_counts_seed0", "grpo_rnd_seed0",
                                                      "grpo_seed0", "nsr_seed0", "pretrained"]
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[run]" not in again.stdout and "[sweep]" not in again.stdout  # nothing run, nothing estimated
    assert {f: f.stat().st_mtime_ns for f in sorted((tmp_path / "sparse_runs").glob("*.json"))} == mtimes
    assert json.loads((tmp_path / "sparse.json").read_text())["tasks"] == result["tasks"]


@pytest.mark.slow  # a benchmark's estimate on the digits task
def test_digits_banel_estimate_drops_known_failures():
    """Without failure models, BaNEL's sampler on digits is the generator minus the ledger's known failures: with
    none known it is the plain estimate on the same draw; with a draw's texts known, none of them is kept."""
    from types import SimpleNamespace

    from benchmarks.common import digits_task
    from trl_banel_examples.tasks import digits
    from trl_banel_examples.tasks.common import sample_token_ids

    task = digits_task()
    gen, tok, oracle = task.load()

    def trainer(known):
        records = [SimpleNamespace(completion=t, success=False) for t in known]
        return SimpleNamespace(failures=[], accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=gen,
                               processing_class=tok, ledger=SimpleNamespace(records=records),
                               args=SimpleNamespace(seed=0))

    est = task.estimate_banel(trainer([]), 200)  # the first draw: seed 60,000
    plain, _ = digits.estimate_success_rate(gen, tok, oracle, 200, batch_size=200, seed=60_000)
    assert (est.successes, est.samples, est.acceptance_rate) == (plain.successes, 200, 1.0)
    drawn = [t for b in sample_token_ids(gen, tok, 200, digits.PIXELS + 1, 200, seed=60_001)
             for t in tok.batch_decode(b, skip_special_tokens=True)]
    est = task.estimate_banel(trainer(drawn), 200)  # the second draw (seed 60,001) is entirely known
    assert est.acceptance_rate <= 0.5, "the known draw's texts must not be kept"
    # it draws until n are kept or 5n were drawn (this generator repeats its images: the known draw holds most of its
    # mass, and the estimate stops at the cap with fewer samples)
    assert est.samples == 200 or (0 < est.samples < 200 and round(est.samples / est.acceptance_rate) >= 5 * 200)


def test_a_banel_variant_runs_the_tasks_settings_with_one_part_off_and_is_cached_apart(tmp_path):
    from benchmarks.common import BANEL_VARIANTS, RunCache, Task, cached_run, run_identity

    task = Task("t", None, None, None, 12, {"max_reward_evaluations": 10, "success_replay": 0.5, "tau": 0.97})
    assert run_identity(task, "banel", {}) == {"success_replay": 0.5, "tau": 0.97}
    assert run_identity(task, "banel_no_replay", {}) == {"success_replay": 0.0, "tau": 0.97}
    assert run_identity(task, "banel_no_known", {})["reject_known_failures"] is False
    assert run_identity(task, "grpo", {"learning_rate": 1}) == {"learning_rate": 1}
    assert set(BANEL_VARIANTS) == {"banel_no_replay", "banel_no_known"}
    # a BaNEL run cached under the variant's name is redone: it was not made with replay off
    cache = RunCache(tmp_path / "t.json")
    cache.put("banel_no_replay_seed0", {"settings": {"success_replay": 0.5, "tau": 0.97}})
    run, made = cached_run(cache, "banel_no_replay_seed0", run_identity(task, "banel_no_replay", {}),
                           lambda: {"settings": {"success_replay": 0.0, "tau": 0.97}})
    assert made and run["settings"]["success_replay"] == 0.0
    assert cache.load() == {"banel_no_replay_seed0": run}  # replaced in the task's file, no copy set aside
    again, made = cached_run(cache, "banel_no_replay_seed0", run_identity(task, "banel_no_replay", {}), dict)
    assert not made and again == run


def test_a_sweep_run_of_another_generator_is_redone_not_reused(tmp_path, capsys):
    """The sweep's cache is keyed by the generator's weights too: after a generator changes, its grid is re-run."""
    from benchmarks.common import run_sweep

    grid = {"grpo": [{"learning_rate": 1e-3}]}
    made = []

    def run(method, knobs, work):
        made.append(knobs)
        point = {"rate": 0.5 if len(made) == 1 else 0.25, "low": 0.0, "high": 1.0}
        return {"settings": {**knobs, "generator_weights": weights}, "final": {**point, "nre": 10},
                "best": {"point": point}, "minutes": 0.0}

    weights, path = "old", str(tmp_path / "sweep" / "t_budget10.json")
    first = run_sweep(["grpo"], run, path, 7, 10, 20, grid, identity={"generator_weights": weights})
    again = run_sweep(["grpo"], run, path, 7, 10, 20, grid, identity={"generator_weights": weights})
    assert len(made) == 1 and first == again  # the same generator: reused
    weights = "new"
    redone = run_sweep(["grpo"], run, path, 7, 10, 20, grid, identity={"generator_weights": weights})
    assert len(made) == 2 and redone["grpo"]["results"][0]["rate"] == 0.25
    held = json.loads(Path(path).read_text())  # one file: the new run replaced the old one (git history keeps it)
    assert list(held) == ["grpo_learning_rate0.001"] and held["grpo_learning_rate0.001"]["final"]["rate"] == 0.25
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["t_budget10.json"]  # no stale folder, no temp file
