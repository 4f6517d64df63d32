"""The task family (benchmarks/task_family.py) and the defaults benchmark (benchmarks/defaults.py)."""

import dataclasses
import itertools
import json
import math

import pytest
import torch

from benchmarks import defaults, task_family
from benchmarks.task_family import FamilySpec
from trl_banel.stats import SuccessEstimate
from trl_banel_examples.tasks.common import sample_token_ids

TINY = dict(symbols=3, length=4, pretrain_steps=40, prior=0.02)


@pytest.mark.parametrize("structure", task_family.STRUCTURES)
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_the_oracle_pays_exactly_the_enumerated_success_set(structure, tokenizer):
    spec = FamilySpec("t", tokenizer=tokenizer, structure=structure, prompts=2, **TINY)
    words = task_family.alphabet(spec)
    for k in (task_family.rule_values(spec) or [5])[:3]:
        oracle = task_family.FamilyOracle(spec, words, k)
        for j, prompt in enumerate(task_family.prompt_texts(spec)):
            enumerated = {tuple(r) for r in task_family.success_rows(spec, j, k).tolist()}
            assert len(enumerated) == task_family.count_successes(spec, k)
            every = list(itertools.product(range(spec.symbols), repeat=spec.length))
            paid = {row for row in every if oracle.is_success(prompt, task_family.to_text(spec, row, words))}
            assert paid == enumerated, (structure, k, j)


def test_anything_off_format_fails():
    spec = FamilySpec("t", tokenizer="bpe", structure="count", **TINY)
    words = task_family.alphabet(spec)
    oracle = task_family.FamilyOracle(spec, words, 1)
    good = task_family.to_text(spec, task_family.success_rows(spec, 0, 1)[0], words)
    assert oracle([""], [good]) == [1.0]
    bad = [" " + good, good + " ", good.replace(" ", "  ", 1), good + " " + words[0], good[:-1], None]
    assert oracle([""] * len(bad), bad) == [0.0] * len(bad)
    assert oracle(["<p9>"], [good]) == [0.0]  # a prompt the task does not have


def test_the_malformed_share_counts_what_no_rule_could_pay_per_window():
    spec = FamilySpec("t", tokenizer="bpe", structure="count", **TINY)
    words = task_family.alphabet(spec)
    good = task_family.to_text(spec, task_family.success_rows(spec, 0, 1)[0], words)
    completions = [good, good + " ", good, good, good[:-1], None, good]
    assert task_family.malformed_shares(spec, words, completions, every=3) == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_bpe_words_are_several_tokens_and_the_longest_output_fits():
    spec = FamilySpec("t", tokenizer="bpe", symbols=10, length=6, structure="count")
    words = task_family.alphabet(spec)
    tok = task_family.build_tokenizer(spec, words)
    per_word = [len(tok(" " + w, add_special_tokens=False).input_ids) for w in words]
    assert sum(per_word) / len(per_word) >= 2
    longest = task_family.max_completion_tokens(spec, tok, words)
    assert longest >= 16
    for row in task_family.success_rows(spec, 0, 4)[:500]:
        text = task_family.to_text(spec, row, words)
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) <= longest and tok.decode(ids) == text


def test_the_chain_is_calibrated_to_the_prior():
    spec = FamilySpec("t", structure="count", symbols=6, length=7, prior=1e-5, seed=3)
    weight, k = task_family.chain_rare_weight(spec)
    chain = task_family.chains(spec)[0]
    rows = task_family.success_rows(spec, 0, k)
    assert math.isclose(math.exp(torch.logsumexp(torch.tensor(task_family.chain_log_prob(chain, rows)), 0)), 1e-5,
                        rel_tol=1e-3)
    assert 1e-3 < weight <= 1


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    spec = FamilySpec("tiny", structure="count", symbols=4, length=5, prior=0.02, pretrain_steps=60)
    return task_family.build(spec, cache=tmp_path_factory.mktemp("family"))


def test_exact_success_probability_matches_monte_carlo(tiny_task):
    """The exact figure is the probability of a success *in its canonical tokenisation*: Monte Carlo counts a sample
    only if its tokens are the canonical ones (special tokens mid-text, skipped by the decoder, make others)."""
    model, tok, oracle = tiny_task.load()
    exact = tiny_task.exact_success_probability(model, tok)
    assert exact == pytest.approx(tiny_task.prior, rel=1e-5)  # the calibration's, after the cache round trip
    canonical_successes = successes = total = 0
    for tokens in sample_token_ids(model, tok, 20_000, tiny_task.max_completion_length, batch_size=5000, seed=1):
        for row in tokens.tolist():
            ids = [t for t in row[1:] if t != tok.pad_token_id]
            text = tok.decode(ids, skip_special_tokens=True)
            success = oracle([""], [text])[0] == 1.0
            successes += success
            canonical = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
            canonical_successes += success and ids == canonical
            total += 1
    est = SuccessEstimate.from_counts(canonical_successes, total, confidence=0.999)
    assert est.low <= exact <= est.high, (exact, est)
    assert successes >= canonical_successes  # the exact figure is a lower bound of the oracle's success rate


def test_a_build_is_reproducible_and_cached(tiny_task, tmp_path):
    again = task_family.build(tiny_task.spec, cache=tmp_path)
    assert again.calibration["weights"] == tiny_task.calibration["weights"]
    assert again.k == tiny_task.k
    cached = task_family.build(tiny_task.spec, cache=tmp_path)  # loaded, not rebuilt
    assert cached.calibration["minutes"] == again.calibration["minutes"]


def test_preregistration_meets_the_issue_requirements():
    prereg = defaults.preregistration()
    evaluation, tuning = prereg["evaluation"], prereg["tuning"]
    assert len(evaluation) >= 6
    assert not {e["name"] for e in evaluation} & {e["name"] for e in tuning}
    assert not set(prereg["evaluation_seeds"]) & set(prereg["tuning_seeds"])
    long_bpe = 0
    for spec in task_family.specs_from(evaluation):
        if spec.tokenizer == "bpe":
            words = task_family.alphabet(spec)
            tok = task_family.build_tokenizer(spec, words)
            # typical output: every word with its leading space (the first without)
            typical = sum(len(tok(" " + w, add_special_tokens=False).input_ids) for w in words) / len(words)
            long_bpe += typical * spec.length >= 16
    assert long_bpe >= len(evaluation) / 3
    assert {s.hidden for s in task_family.specs_from(evaluation)} >= {32, 256}


def test_candidate_rounds_never_run_on_evaluation_tasks():
    # a candidate round is tuned on the tuning set and the shipped tasks (issue #29), never on the evaluation set
    with pytest.raises(ValueError, match="tuning set and the shipped tasks only"):
        defaults.variant_settings("evaluation", "kl0.3_exact")
    assert defaults.variant_settings("shipped", "kl0.3_exact")["distill_target_kl"] == 0.3
    for group in ("evaluation", "shipped"):  # GRPO's sweep: the tuning set only
        with pytest.raises(ValueError, match="tuning set only"):
            defaults.variant_settings(group, "grpo_lr0.001")
    assert defaults.variant_settings("tuning", "grpo_lr0.001") == {"learning_rate": 1e-3}
    assert defaults.variant_settings("evaluation", "no_known") == {"reject_known_failures": False}
    assert defaults.variant_settings("tuning", "kl0.3_exact")["distill_target_kl"] == 0.3
    with pytest.raises(ValueError, match="valid are"):
        defaults.variant_settings("tuning", "nonsense")


def test_a_ledger_whose_completions_hold_unicode_line_separators_is_read_line_for_line(tmp_path):
    """A byte-level tokenizer decodes to any character: `\x85` (NEL) and `\u2028` inside a completion are one ledger
    line each, as the package writes and reads them (a subword run's malformed-share count crashed on one)."""
    from trl_banel.ledger import RewardLedger

    odd = ["a\x85b", "c\u2028d", "plain", "e\u2029f\x1cg"]
    path = str(tmp_path / "evaluations.jsonl")
    RewardLedger(path, budget=10).evaluate([""] * 4, odd, lambda positions: [0.0] * len(positions), round=0)
    assert defaults.ledger_completions(tmp_path / "evaluations.jsonl") == odd
    assert RewardLedger(path, budget=10).spent == 4  # and a restarted run re-spends none of them


def test_task_settings_drop_every_mechanism_field():
    from trl_banel_examples.tasks import letters

    kept = defaults.task_settings(letters.BENCHMARK_ROUND)
    assert "evidence_pseudo_count" not in kept and "learning_rate" not in kept
    assert kept["max_reward_evaluations"] == letters.BENCHMARK_ROUND["max_reward_evaluations"]


@pytest.mark.parametrize("name", ["addition", "digits", "letters", "hard_attack"])
def test_a_shipped_tasks_settings_set_no_mechanism_field(name):
    """What the demos and recipes run (a task's BANEL_SETTINGS) is the package's default round with the task's budget,
    lengths, batch sizes and stop rules: exactly what `benchmarks/defaults.py --group shipped` measured, so a task that
    set a mechanism field would run a round nobody measured at the defaults."""
    import importlib

    module = importlib.import_module(f"trl_banel_examples.tasks.{name}")
    assert set(module.BANEL_SETTINGS) <= defaults.TASK_FIELDS, set(module.BANEL_SETTINGS) - defaults.TASK_FIELDS
    assert module.BANEL_SETTINGS == defaults.task_settings(module.BENCHMARK_ROUND)
    assert defaults.task_settings(defaults.TASKS[name]().banel) == module.BANEL_SETTINGS  # what --group shipped runs


TINY_TASK = {"structure": "count", "symbols": 4, "length": 5, "prior": 0.01, "pretrain_steps": 60}


def use_tiny_preregistration(tmp_path, monkeypatch, evaluation: list, budget: int):
    """A pre-registration of tiny tasks (tuning: `tune_tiny`) and a task cache, both under `tmp_path`."""
    prereg = {"budget": budget, "evaluation_seeds": [0], "tuning_seeds": [100], "grpo_seeds": [0],
              "evaluation": evaluation, "tuning": [{"name": "tune_tiny", **TINY_TASK}]}
    path = tmp_path / "prereg.json"
    path.write_text(json.dumps(prereg))
    monkeypatch.setattr(defaults, "PREREGISTRATION", path)
    monkeypatch.setattr(task_family, "CACHE", tmp_path / "cache")


@pytest.mark.slow  # a benchmark's --quick run
def test_defaults_benchmark_quick_run_writes_results_and_reuses_them(tmp_path, monkeypatch):
    use_tiny_preregistration(tmp_path, monkeypatch, evaluation=[], budget=60)
    args = defaults.Args(group="tuning", tasks=["tune_tiny"], seeds=[100], budget=60, out=str(tmp_path / "out"))
    summary = defaults.main(args)
    (row,) = summary["rows"]
    assert row["task"] == "tune_tiny" and row["variant"] == "defaults" and row["seeds"] == [100]
    assert 0 < row["nre"][0] <= 60  # the budget held
    assert row["prior"] > 0 and len(row["final_x"]) == 1
    assert row["malformed_last"][0] is not None and 0 <= row["malformed_last"][0] <= 1  # read from the run's ledger
    run_file = tmp_path / "out" / "runs" / "tune_tiny.json"  # the task's runs, one record per variant and seed
    held = json.loads(run_file.read_text())
    assert list(held) == ["defaults_seed100"] and held["defaults_seed100"]["seed"] == 100
    assert held["defaults_seed100"]["defaults_fingerprint"] == defaults.defaults_fingerprint()
    before = run_file.stat().st_mtime_ns
    defaults.main(args)  # cached: not run again
    assert run_file.stat().st_mtime_ns == before
    assert (tmp_path / "out" / "defaults.md").exists() and (tmp_path / "out" / "defaults.png").exists()


@pytest.mark.slow  # a benchmark's GRPO run
def test_grpo_runs_at_the_rate_its_tuning_sweep_chose(tmp_path, monkeypatch):
    use_tiny_preregistration(tmp_path, monkeypatch, evaluation=[{"name": "eval_tiny", **TINY_TASK, "seed": 1}],
                             budget=40)
    monkeypatch.setattr(defaults, "GRPO_RATES", (1e-3,))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no GRPO sweep runs"):
        defaults.grpo_learning_rate(out / "runs")
    defaults.main(defaults.Args(group="tuning", variant="grpo_lr0.001", seeds=[100], budget=40, out=str(out)))
    assert defaults.grpo_learning_rate(out / "runs") == 1e-3
    summary = defaults.main(defaults.Args(group="evaluation", variant="grpo", seeds=[0], budget=40, out=str(out)))
    (row,) = [r for r in summary["rows"] if r["variant"] == "grpo"]
    assert row["task"] == "eval_tiny" and row["overrides"] == {"learning_rate": 1e-3}
    assert 0 < row["nre"][0] <= 40  # the budget held


@pytest.mark.parametrize("name", ["addition", "letters"])
def test_a_shipped_task_runs_the_default_round_with_only_its_budget_lengths_and_stops(name):
    task, prior, _ = defaults.load_task("shipped", name)
    assert task.banel and set(task.banel) <= defaults.TASK_FIELDS
    assert 0 < prior < 1e-2


def test_a_task_with_several_prompts_trains_and_is_paid_on_its_own_prompts(tmp_path, monkeypatch):
    """The runs prompt the generator with the task's prompts (an empty prompt would be no prompt of the task: every
    evaluation a failure, and a generator trained on a prompt its success probability is not measured on)."""
    from benchmarks.common import run_one

    monkeypatch.setattr(task_family, "CACHE", tmp_path / "cache")
    spec = FamilySpec("t2", structure="count", prompts=2, **TINY)
    task = task_family.as_benchmark_task(task_family.build(spec))
    assert task.prompts == ("<p0>", "<p1>")
    asked = []
    load = task.load

    def recording_load():
        model, tok, oracle = load()

        def recorded(prompts=None, completions=(), **kwargs):
            asked.extend(prompts)
            return oracle(prompts, completions, **kwargs)

        recorded.__name__ = oracle.__name__
        return model, tok, recorded

    task = dataclasses.replace(task, load=recording_load)
    record = run_one(task, "banel", 0, {"evaluations_per_round": 10}, 30, 0, 10**9, 0, 2.0, str(tmp_path / "run"),
                     pretrained={"final": {}})
    assert record["final"]["nre"] == 30
    assert set(asked) == {"<p0>", "<p1>"}


def test_the_summary_counts_the_longest_streak_of_half_empty_rounds():
    def record(filled):
        return {"rounds": [{"round": i, "round/places_filled": f} for i, f in enumerate(filled)]}

    assert defaults.half_empty_streak(record([1.0, 0.4, 0.3, 1.0, 0.2, 0.1, 0.0])) == 3
    assert defaults.half_empty_streak(record([1.0, 0.5, 0.98])) == 0
    assert defaults.half_empty_streak({"rounds": [{"round": 0}]}) is None  # recorded before runs logged it
