"""The rare-letters task: shipped generator, oracle, exact success probability, calibration."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_banel_examples.tasks.letters import (LENGTH, MAX_PRIOR, LettersOracle, exact_success_probability, is_success,
                                     load_letters_task, sample_source, source_chain, string_log_probs,
                                     success_strings)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    return load_letters_task()


@pytest.fixture(scope="module")
def prior_at_4(task):
    """The shipped generator's exact probability of at least four a's (188,707 strings: scored once)."""
    model, tok, _ = task
    return exact_success_probability(model, tok, 4)


def test_oracle_pays_only_for_eight_letters_with_enough_as():
    oracle = LettersOracle(min_a=5)
    completions = ["aaaaabcd", "aaaabcde", "aaaaaaaa", "aaaaabc", "aaaaabcdz", "AAAAABCD", "", "baaaaacd"]
    assert oracle(None, completions) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_success_strings_are_exactly_the_paid_ones():
    strings = success_strings(6)
    # C(8,6) 7^2 + C(8,7) 7 + 1
    assert len(strings) == len(set(strings)) == 28 * 49 + 8 * 7 + 1
    assert all(is_success(s, 6) for s in strings) and not is_success(strings[0].replace("a", "b", 3), 6)


@pytest.mark.slow  # the task's exact enumeration (188,707 strings) and 20,000 samples
def test_exact_success_probability_matches_sampling(task, prior_at_4):
    """string_log_probs is an exact likelihood: a sample's empirical frequency of successes matches it."""
    model, tok, oracle = task
    ids = torch.full((20000, 1), tok.bos_token_id)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=LENGTH + 1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out, skip_special_tokens=True)
    rate_4 = sum(t.count("a") >= 4 and len(t) == LENGTH for t in texts) / len(texts)
    exact_4 = prior_at_4
    assert abs(rate_4 - exact_4) < 5 * math.sqrt(exact_4 / len(texts)) + 1e-4
    lp = string_log_probs(model, tok, texts[:50])
    assert torch.all(lp < 0) and torch.all(torch.isfinite(lp))


@pytest.mark.slow  # the task's exact enumeration, twice
def test_shipped_generator_is_calibrated_in_the_sparse_regime(task, prior_at_4):
    model, tok, oracle = task
    prior = exact_success_probability(model, tok, oracle.min_a)
    assert oracle.min_a == 5 and prior <= MAX_PRIOR
    assert prior_at_4 > MAX_PRIOR, "min_a is not the smallest rule"
    recorded = json.loads((REPO / "benchmarks" / "results" / "letters_calibration.json").read_text())
    assert recorded["min_a"] == oracle.min_a and recorded["exact_prior"] == pytest.approx(prior, rel=1e-3)


def test_source_chain_makes_the_rare_letter_rare():
    chain = source_chain(0)
    assert chain.shape == (9, 8) and abs(chain.sum(1) - 1).max() < 1e-12
    strings = sample_source(chain, 5000, __import__("numpy").random.default_rng(0))
    share_a = sum(s.count("a") for s in strings) / (5000 * LENGTH)
    assert all(len(s) == LENGTH for s in strings) and share_a < 0.08


@pytest.mark.slow  # the task's pretraining recipe in a subprocess
def test_pretrain_recipe_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain_letters.py"), "--steps", "30", "--out",
                          str(tmp_path / "model"), "--results", str(tmp_path / "cal.json"),
                          "--max_prior", "1e-6"],  # a barely trained model: a strict rule keeps the success sets small
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["exact_prior"] <= 1e-6
    model, tok, oracle = load_letters_task(path=tmp_path / "model")
    assert oracle.min_a == cal["min_a"]
