"""The baselines: budgeted oracle, RND and count bonuses, NSR advantages, a tiny GRPO run, the benchmark's --quick."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_banel_examples.baselines import (  # noqa: E402
    BudgetedReward, NSRConfig, NSRTrainer, PolicySuccessCurveCallback, RNDBonus, SimHashCountBonus,
    StopOnBudgetCallback, nsr_advantages,
)
from trl_banel.stats import SuccessEstimate  # noqa: E402

from conftest import SKEWED, make_char_tokenizer, make_tiny_model, pretrain_on_strings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class CountingOracle:
    """Success for 'zebra'; counts every completion it is asked to score."""

    __name__ = "counting_oracle"

    def __init__(self, success="zebra"):
        self.success = success
        self.scored = 0

    def __call__(self, prompts, completions, **kwargs):
        self.scored += len(completions)
        return [1.0 if c == self.success else 0.0 for c in completions]


# ------------------------------------------------------------------------------------------------ BudgetedReward
def test_budgeted_reward_caps_calls_and_answers_repeats(tmp_path):
    oracle = CountingOracle()
    reward = BudgetedReward(oracle, budget=5, path=str(tmp_path / "evaluations.jsonl"))
    assert reward(["", ""], ["cat", "dog"]) == [0.0, 0.0]
    # repeats (within the call and of earlier calls) are free; new pairs beyond the budget get None
    out = reward([""] * 6, ["cat", "zebra", "zebra", "bird", "x1", "x2"])
    assert out == [0.0, 1.0, 1.0, 0.0, 0.0, None]
    assert oracle.scored == 5 and reward.oracle_calls == 5 and reward.exhausted
    assert reward([""] * 3, ["y", "dog", "zebra"]) == [None, 0.0, 1.0]  # nothing new is paid once spent
    assert oracle.scored == 5
    lines = (tmp_path / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[2])["success"] is True
    # a new run on the same ledger pays for nothing twice
    again = BudgetedReward(oracle, budget=5, path=str(tmp_path / "evaluations.jsonl"))
    assert again(["", ""], ["zebra", "new"]) == [1.0, None] and oracle.scored == 5


# ----------------------------------------------------------------------------------------------------- bonuses
def test_rnd_bonus_prefers_novel_completions_and_stays_finite():
    rnd = RNDBonus(seed=0, learning_rate=3e-3)
    for _ in range(100):
        rnd(None, ["cat"] * 16)
    seen, novel = rnd.errors(["cat", "zq9+81="]).tolist()
    assert novel > 5 * seen
    bonus = rnd(None, ["cat", "zq9+81="])
    assert bonus[1] > bonus[0] >= 0
    # identical batches drive the running std of the errors towards 0: the normalised bonus must stay finite
    constant = RNDBonus(seed=1, learning_rate=0.0)
    values = [v for _ in range(20) for v in constant(None, ["same"] * 4)]
    assert all(math.isfinite(v) and 0 <= v <= constant.max_bonus for v in values)
    assert rnd(None, []) == []


def test_count_bonus_is_beta_over_sqrt_n():
    bonus = SimHashCountBonus(beta=0.5, bits=32, seed=0)
    for n in range(1, 6):
        assert bonus(None, ["cat"]) == pytest.approx([0.5 / math.sqrt(n)])
    # a batch is counted as a whole: three copies are n = 6, 7, 8 -> all get beta / sqrt(8)
    assert bonus(None, ["cat"] * 3) == pytest.approx([0.5 / math.sqrt(8)] * 3)
    assert bonus(None, ["zebra"]) == pytest.approx([0.5])  # a different code starts at n = 1
    assert len(set(bonus.codes(["cat", "dog", "bird", "zebra"]))) == 4


# ------------------------------------------------------------------------------------------------------ NSR
def test_nsr_advantages_function():
    r = torch.tensor([0.0, 0.0, 1.0, float("nan")])
    assert nsr_advantages(r).tolist() == [-1.0, -1.0, 0.0, 0.0]
    assert nsr_advantages(r, positive_weight=0.1).tolist() == pytest.approx([-1.0, -1.0, 0.1, 0.0])


def _grpo_args(tmp_path, cls=GRPOConfig, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                num_generations=8, per_device_train_batch_size=8, max_completion_length=8, beta=0.0,
                temperature=1.0, learning_rate=1e-3, logging_steps=1, max_steps=2, seed=0,
                gradient_checkpointing=False, disable_tqdm=True)
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="module")
def tiny_policy():
    tok = make_char_tokenizer()
    model = make_tiny_model(tok)
    pretrain_on_strings(model, tok, SKEWED, [0.7, 0.2, 0.1, 0.0], steps=150)  # 'zebra' (success) never sampled
    return tok, {k: v.clone() for k, v in model.state_dict().items()}


def _model(tiny_policy):
    tok, state = tiny_policy
    model = make_tiny_model(tok)
    model.load_state_dict(state)
    return model


def test_nsr_learns_from_a_group_that_only_failed_where_grpo_does_not(tmp_path, tiny_policy):
    """Every completion fails ('zebra' is never sampled): GRPO's group-relative advantages are all 0 and one training
    step leaves the model as it was; NSR's are -1 and the same step moves it."""
    tok = tiny_policy[0]
    data = Dataset.from_dict({"prompt": [""] * 8})
    moved = {}
    for name, cls, cfg in (("grpo", GRPOTrainer, GRPOConfig), ("nsr", NSRTrainer, NSRConfig)):
        torch.manual_seed(0)
        oracle = CountingOracle()
        trainer = cls(model=_model(tiny_policy), reward_funcs=oracle, processing_class=tok,
                      args=_grpo_args(tmp_path / name, cfg, max_steps=1), train_dataset=data)
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        trainer.train()
        assert oracle.scored == 8  # one group of 8, all failures
        moved[name] = max((p.detach() - before[k]).abs().max().item() for k, p in trainer.model.named_parameters())
    assert moved["grpo"] == 0.0, "GRPO has nothing to learn from a group that only failed"
    assert moved["nsr"] > 1e-4, "NSR pushes probability away from each failure"


# ----------------------------------------------------------------------------------- a tiny budgeted GRPO run
def test_grpo_with_budgeted_reward_and_bonus_stops_at_budget(tmp_path, tiny_policy):
    tok = tiny_policy[0]
    oracle = CountingOracle()
    budgeted = BudgetedReward(oracle, budget=20, path=str(tmp_path / "evaluations.jsonl"))
    successes = [1, 6, 2, 0, 3, 3, 3, 3]  # the second point is the best
    snapshots = []

    def estimate(model):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return SuccessEstimate.from_counts(successes[len(snapshots) - 1], 10, oracle_calls=10)

    curve = PolicySuccessCurveCallback(budgeted, estimate, every_nre=8)
    trainer = GRPOTrainer(
        model=_model(tiny_policy), reward_funcs=[budgeted, SimHashCountBonus(beta=1.0)], processing_class=tok,
        args=_grpo_args(tmp_path, learning_rate=3e-3, temperature=1.5, max_steps=50, reward_weights=[1.0, 1.0]),
        train_dataset=Dataset.from_dict({"prompt": [""] * 64}), callbacks=[StopOnBudgetCallback(budgeted), curve],
    )
    trainer.train()
    assert budgeted.exhausted and trainer.state.global_step < 50  # stopped by the budget, not by max_steps
    lines = (tmp_path / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == oracle.scored == budgeted.ledger.spent == 20
    assert len(curve.points) >= 3 and curve.points[0]["nre"] == 0 and curve.evaluation_calls == 10 * len(curve.points)
    # the best point keeps the weights it was measured on, not the last ones
    assert curve.best_point is curve.points[1] and curve.best_point["rate"] == 0.6
    best = curve.best_model(trainer.model)
    assert best is not trainer.model
    for key, value in best.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][key], rtol=0, atol=0)
    assert any(not torch.equal(snapshots[1][k], v) for k, v in trainer.model.state_dict().items())


# ------------------------------------------------------------------------------------------ benchmark --quick
MODELS = ROOT / "examples" / "trl_banel_examples" / "tasks" / "addition_models"


@pytest.mark.slow
@pytest.mark.skipif(not (MODELS / "target").exists() or not (MODELS / "attacker").exists(),
                    reason="the addition task's pretrained models are not present yet")
def test_benchmark_quick_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "addition_attack.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "addition_attack.json").read_text())
    methods = result["methods"]
    assert set(methods) == {"pretrained", "banel", "grpo", "grpo_rnd", "grpo_counts", "nsr"}
    for name, m in methods.items():
        assert len(m["success_rates"]) == 1 and "settings" in m and "mean" in m
        if name != "pretrained":
            assert m["final"]["nre"][0] <= result["budget"]
            assert m["best"]["selection_oracle_calls"][0] > 0 and m["best"]["fresh_oracle_calls"][0] > 0
    assert (tmp_path / "addition_attack.md").exists() and (tmp_path / "addition_attack.png").exists()
    assert len(json.loads((tmp_path / "runs" / "addition.json").read_text())) == 6  # one cached run per method
