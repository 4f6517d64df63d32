import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trl_banel.stats import SuccessEstimate, clopper_pearson
from trl_banel_examples.tasks.addition import (
    AdditionOracle, answer_text, build_tokenizer, classify_query, estimate_success_rate,
    load_addition_task, load_attacker, load_target, load_tokenizer, longest_carry_chain, parse_query,
    sample_operands, sample_queries,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    return load_addition_task()


@pytest.fixture(scope="module")
def random_target(task):
    """A target with the shipped architecture but untrained weights: it answers almost nothing right."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(task[2].model.config).eval()


@pytest.mark.parametrize("make", [build_tokenizer, load_tokenizer])
def test_tokenizer_round_trip_and_bos(make):
    tok = make()
    assert tok("").input_ids == [tok.bos_token_id]
    for text in ["12+345=", "0+0=", "007+5=753", "9"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
        assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    tok.padding_side = "left"
    batch = tok(["1+2=", "123+45="], padding=True).input_ids
    assert batch[0][:3] == [tok.pad_token_id] * 3 and batch[0][3] == tok.bos_token_id


def test_parse_and_classify():
    assert parse_query("12+345=", 3) == ("12", "345")
    assert parse_query("007+5=", 3) == ("007", "5")  # leading zeros are well formed
    for bad in ["", "12+", "+3=", "1+2", "1+2=3", "1+2==", " 1+2=", "1+2=\n", "1+2+3=", "1234+1=", "a+b=",
                "\u0661+\u0662=", None, 12]:
        assert parse_query(bad, 3) is None, bad
    assert longest_carry_chain("999", "1") == 3 and longest_carry_chain("99", "1") == 2
    assert longest_carry_chain("5", "5") == 1 and longest_carry_chain("123", "456") == 0
    assert longest_carry_chain("515", "505") == 1  # carries in columns 0 and 2, not consecutive
    assert longest_carry_chain("509", "591") == 3
    cases = {"007+5=": "leading zeros", "5+00=": "leading zeros", "0+5=": "other", "999+1=": "carry chain",
             "099+901=": "leading zeros", "99+1=": "other", "12+34=": "other", "12+34": "malformed",
             "1234+1=": "malformed", "": "malformed"}
    for query, kind in cases.items():
        assert classify_query(query, 3) == kind, query
    assert classify_query("1234+1=", 4) == "other"
    assert answer_text(12, 345) == "753" and answer_text(5, 5) == "01"


def test_shipped_models_load(task):
    attacker, tok, oracle = task
    assert oracle.__name__ == "addition_oracle"
    assert oracle.max_operand_digits == oracle.model.config.addition_max_operand_digits
    for model in (attacker, oracle.model, load_target(), load_attacker()):
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok)
        assert not model.training
    # peft's default LoRA targets for Llama exist
    assert any(name.endswith("q_proj") for name, _ in attacker.named_modules())


def test_oracle_hand_written(task):
    _, _, oracle = task
    correct = ["1+1=", "12+34=", "5+17=", "123+456=", "250+250=", "8+0="]
    assert oracle([""] * len(correct), correct) == [0.0] * len(correct)
    malformed = ["", "12+", "1+2", "1+2=3", "1234+5=", "5+1234=", "x", "1+2+3=", "=", "+="]
    assert oracle(None, malformed) == [0.0] * len(malformed)  # never raises
    assert oracle(None, []) == []
    mixed = ["12+34=", "", "007+5=", "1+1="]
    rewards = oracle(None, mixed, completion_ids=None)  # extra TRL kwargs are ignored
    assert rewards[0] == rewards[1] == rewards[3] == 0.0
    # the leading-zero query is scored (not rejected): its reward is exactly "greedy answer wrong"
    assert rewards[2] == float(not _greedy_correct(oracle.model, oracle.tokenizer, ["007+5="])[0])


def test_oracle_wrong_target_scores_one(task, random_target):
    _, tok, oracle = task
    wrong = AdditionOracle(random_target, tok, max_operand_digits=oracle.max_operand_digits, batch_size=64)
    a, b = sample_operands(np.random.default_rng(1), 200, oracle.max_operand_digits)
    queries = [f"{x}+{y}=" for x, y in zip(a.tolist(), b.tolist())]
    rewards = wrong(None, queries + ["1+2", ""])
    assert rewards[-2:] == [0.0, 0.0]
    assert sum(rewards) >= 0.9 * len(queries)
    assert sum(oracle(None, queries)) <= 0.05 * len(queries)  # the trained target gets these right


def _greedy_correct(model, tok, queries):
    """Reference check with model.generate, one group per query length so no padding is involved."""
    out = {}
    digits = model.config.addition_max_operand_digits if hasattr(model.config, "addition_max_operand_digits") else 3
    for length in sorted({len(q) for q in queries}):
        group = [q for q in queries if len(q) == length]
        ids = torch.tensor(tok(group).input_ids)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=digits + 3, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for q, row in zip(group, gen[:, ids.shape[1]:].tolist()):
            a, b = parse_query(q, 99)
            want = tok(answer_text(int(a), int(b))).input_ids[1:] + [tok.eos_token_id]
            out[q] = row[: len(want)] == want
    return [out[q] for q in queries]


def test_teacher_forced_check_matches_generate(task, random_target):
    _, tok, oracle = task
    rng = np.random.default_rng(2)
    a, b = sample_operands(rng, 200, 3)
    queries = [f"{x}+{y}=" for x, y in zip(a.tolist(), b.tolist())]
    queries += [f"{str(x).zfill(3)}+{y}=" for x, y in zip(a[:60].tolist(), b[:60].tolist())]  # leading zeros
    queries += ["999+1=", "995+5=", "99+901=", "1+999=", "0+0=", "9+9="]
    queries = list(dict.fromkeys(queries))
    for model in (oracle.model, random_target):
        answers = []
        for q in queries:
            x, y = parse_query(q, 3)
            answers.append(answer_text(int(x), int(y)))
        fast = AdditionOracle(model, tok, batch_size=37).answers_correctly(queries, answers)
        reference = _greedy_correct(model, tok, queries)
        assert fast == reference
        assert 0 < sum(fast) or model is random_target
        assert sum(fast) < len(queries)  # some wrong answers, so the agreement is informative


def test_sample_queries_and_estimate(task):
    attacker, tok, oracle = task
    queries = sample_queries(attacker, tok, 300, batch_size=128, seed=3)
    assert len(queries) == 300 and queries == sample_queries(attacker, tok, 300, batch_size=128, seed=3)
    assert queries != sample_queries(attacker, tok, 300, batch_size=128, seed=4)
    kinds = [classify_query(q, oracle.max_operand_digits) for q in queries]
    assert kinds.count("malformed") <= 3 and kinds.count("leading zeros") <= 3  # a trained attacker
    est, counts = estimate_success_rate(attacker, tok, oracle, n=300, batch_size=128, seed=3)
    assert isinstance(est, SuccessEstimate) and est.samples == 300 and est.oracle_calls == 300
    assert est.successes == int(sum(oracle(None, queries)))
    assert counts == {"malformed": kinds.count("malformed"), "leading_zero": kinds.count("leading zeros")}
    assert (est.low, est.high) == clopper_pearson(est.successes, 300)


def test_shipped_calibration_is_in_window():
    result = json.loads((REPO / "benchmarks/results/addition_calibration.json").read_text())
    success = result["attacker_success_rate"]
    assert success["n"] >= 100_000 and 1e-4 <= success["rate"] <= 2e-3
    assert result["target_exact_match_own_distribution"]["accuracy"] >= 0.99


@pytest.mark.slow  # the task's recipe in a subprocess
def test_recipe_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes/pretrain_addition.py"), "--quick", "--seed", "1",
         "--out", str(tmp_path / "models"), "--results", str(tmp_path / "calibration")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert result["args"]["quick"] and result["attacker_success_rate"]["n"] > 0
    assert "success rate" in (tmp_path / "calibration.md").read_text()
    attacker, tok, oracle = load_addition_task(models_dir=tmp_path / "models")
    assert attacker.num_parameters() == result["parameters"]["attacker"]
    assert len(oracle(None, ["1+1=", "zz"])) == 2
