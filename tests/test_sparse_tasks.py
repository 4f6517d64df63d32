"""The two shipped sparse tasks: digits 0-to-6 and the hard addition attack (oracles, estimators, calibration,
wheel)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trl_banel_examples.tasks import digits, hard_attack
from trl_banel_examples.tasks.addition import parse_query
from trl_banel_examples.tasks.common import sample_token_ids, sequence_log_probs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits_task():
    return digits.load_digits_task()


@pytest.fixture(scope="module")
def dataset():
    return digits.load_dataset()


def test_digit_images_as_text_round_trip(dataset):
    images, _ = dataset
    text = digits.image_to_text(images[0])
    assert len(text) == 64 and np.array_equal(digits.text_to_image(text), images[0])
    assert digits.image_to_text(np.full((8, 8), 16)) == "g" * 64
    for bad in ["0" * 63, "0" * 65, "h" + "0" * 63, "0" * 63 + " ", "", None, 7]:
        assert digits.text_to_image(bad) is None
    with pytest.raises(ValueError):
        digits.image_to_text(np.zeros(63))


def _ids(tokenizer, texts):
    """What the sampler returns for these completions: [<bos>, tokens, <eos>], padded to 66."""
    rows = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    width = max(digits.PIXELS + 2, max(map(len, rows)))
    return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_digits_oracle_and_estimator_agree_on_hand_made_images(digits_task, dataset):
    """Real sixes, real zeros, a blank, a saturated image and malformed completions: the oracle (string path) and
    the estimator's token-id path give the same verdict on each, and the verdicts are the expected ones."""
    _, tok, oracle = digits_task
    images, labels = dataset
    sixes = [digits.image_to_text(x) for x in images[labels == 6][:40]]
    zeros = [digits.image_to_text(x) for x in images[labels == 0][:40]]
    others = ["0" * 64, "g" * 64]
    malformed = [sixes[0][:63], sixes[0] + "0", sixes[1][:32]]
    texts = sixes + zeros + others + malformed
    rewards = oracle(None, texts)
    ids = _ids(tok, texts)
    pixels, ok = digits.ids_to_images(ids, tok)
    by_ids = np.zeros(len(texts), dtype=bool)
    by_ids[ok] = digits.is_success(oracle.classifier.probabilities(pixels[ok]))
    assert [r == 1.0 for r in rewards] == by_ids.tolist()
    assert ok.tolist() == [True] * (len(texts) - 3) + [False] * 3
    assert sum(rewards[:40]) >= 36  # real sixes are paid (the classifier is 97.8% accurate)
    assert sum(rewards[40:]) == 0.0  # real zeros, blank, saturated and malformed images are not
    # a special token inside the pixels is dropped by decoding, as by the id path: 64 pixels stay well formed
    six = ids[0].tolist()
    with_pad = torch.tensor([six[:10] + [tok.pad_token_id] + six[10:-1]])
    pixels, ok = digits.ids_to_images(with_pad, tok)
    assert ok.tolist() == [True] and digits.image_to_text(pixels[0]) == sixes[0]
    assert tok.decode(with_pad[0], skip_special_tokens=True) == sixes[0]


def test_digits_estimate_matches_the_oracle_on_its_own_draw(digits_task):
    """estimate_success_rate counts exactly what the oracle pays for on the same seeded draw."""
    gen, tok, oracle = digits_task
    est, counts = digits.estimate_success_rate(gen, tok, oracle, n=300, batch_size=150, seed=5)
    texts = [t for batch in sample_token_ids(gen, tok, 300, digits.PIXELS + 1, 150, seed=5)
             for t in tok.batch_decode(batch, skip_special_tokens=True)]
    assert est.samples == 300 and est.successes == sum(oracle(None, texts))
    assert counts["malformed"] == sum(digits.text_to_image(t) is None for t in texts)
    assert sum(counts["argmax"]) + counts["malformed"] == 300


def test_digits_estimate_sees_a_generator_of_sixes(dataset):
    """A generator taught one real six (and one zero, half the time) is estimated near 0.5, not near 0."""
    from conftest import pretrain_on_strings

    images, labels = dataset
    tok = digits.build_digits_tokenizer()
    gen = digits.make_generator(tok, hidden=32, layers=1, seed=0)
    six, zero = digits.image_to_text(images[labels == 6][0]), digits.image_to_text(images[labels == 0][0])
    pretrain_on_strings(gen, tok, [six, zero], [0.5, 0.5], steps=150, lr=1e-2, batch=32)
    classifier = digits.DigitClassifier.load()
    assert digits.DigitsOracle(classifier)(None, [six, zero]) == [1.0, 0.0]
    est, counts = digits.estimate_success_rate(gen, tok, digits.DigitsOracle(classifier), n=400, batch_size=200,
                                               temperature=0.5)
    assert 0.35 < est.rate < 0.65 and counts["argmax"][0] > 100, (est, counts)


def test_shipped_digits_classifier_and_generator(digits_task, dataset):
    """The recorded held-out accuracy is the shipped classifier's on the recorded split; the generator draws zeros."""
    from sklearn.model_selection import train_test_split

    gen, tok, oracle = digits_task
    cal = json.loads((RESULTS / "digits_calibration.json").read_text())
    images, labels = dataset
    s = cal["settings"]
    _, test_x, _, test_y = train_test_split(images, labels, test_size=s["test_fraction"], stratify=labels,
                                            random_state=s["seed"])
    accuracy = float((oracle.classifier.probabilities(test_x).argmax(1) == test_y).mean())
    assert accuracy == pytest.approx(cal["classifier"]["heldout_accuracy"]) and accuracy >= 0.95
    est, counts = digits.estimate_success_rate(gen, tok, oracle, n=1000, batch_size=500, seed=11)
    well_formed = 1000 - counts["malformed"]
    assert well_formed >= 500 and counts["argmax"][0] >= 0.9 * well_formed


def test_shipped_digits_prior_is_sparse(digits_task):
    """Issue #14's bound, measured on the generator that ships (the calibration names its weights)."""
    from trl_banel_examples.tasks.common import weights_hash

    cal = json.loads((RESULTS / "digits_calibration.json").read_text())
    assert cal["generator_weights"] == weights_hash(digits_task[0])
    prior = cal["prior"]
    assert prior["n"] >= 100_000 and (prior["successes"], prior["n"]) == digits.CALIBRATED_PRIOR
    assert prior["rate"] <= digits.MAX_PRIOR and prior["ci95_clopper_pearson"][1] <= 2 * digits.MAX_PRIOR


@pytest.mark.slow  # the task's pretraining recipe in a subprocess
def test_pretrain_digits_recipe_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain_digits.py"), "--quick", "--out",
                          str(tmp_path / "models"), "--results", str(tmp_path / "cal.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["prior"]["n"] == 2000 and 0 <= cal["classifier"]["heldout_accuracy"] <= 1
    gen, tok, oracle = digits.load_digits_task(models_dir=tmp_path / "models")
    assert gen.config.vocab_size == len(tok) == 3 + 17


# ------------------------------------------------------------------------------------- hard attack
@pytest.mark.slow  # the task's pretraining recipe in a subprocess
def test_pretrain_hard_attack_recipe_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain_hard_attack.py"), "--quick", "--out",
                          str(tmp_path / "target"), "--results", str(tmp_path / "cal.json")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    cal = json.loads((tmp_path / "cal.json").read_text())
    wrong = [q for q in (tmp_path / "target" / "successes.txt").read_text().split() if q]
    operands = [a for q in wrong for a in q.rstrip("=").split("+")]
    assert all(len(a) == 1 or not a.startswith("0") for a in operands), "a query with a leading zero was counted"
    assert cal["parameters"] > 0 and (tmp_path / "target" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def hard_task():
    return hard_attack.load_hard_attack_task()


def test_leading_zeros_are_malformed_in_the_hard_variant():
    assert parse_query("007+5=", 3, allow_leading_zeros=False) is None
    assert parse_query("10+05=", 3, allow_leading_zeros=False) is None
    assert parse_query("0+5=", 3, allow_leading_zeros=False) == ("0", "5")  # a lone zero is not padding
    assert parse_query("100+5=", 3, allow_leading_zeros=False) == ("100", "5")
    assert parse_query("007+5=", 3) == ("007", "5")  # the shipped task's rule is unchanged
    queries = hard_attack.all_queries(2)
    assert len(queries) == len(set(queries)) == 100 * 100 and "99+0=" in queries and "09+1=" not in queries


def test_hard_oracle_agrees_with_the_enumerated_success_set(hard_task):
    """The exact estimator's success set and the oracle agree: every listed query is paid for, random other
    queries are not, and a listed query with a zero-padded operand is malformed (not paid)."""
    _, _, oracle = hard_task
    successes = hard_attack.load_successes()
    assert oracle.allow_leading_zeros is False and oracle.max_operand_digits == 3
    assert 0 < len(successes) and oracle(None, successes) == [1.0] * len(successes)
    listed = set(successes)
    rng = np.random.default_rng(0)
    queries = hard_attack.all_queries(3)
    sample = [queries[i] for i in rng.choice(len(queries), 3000, replace=False)]
    assert oracle(None, sample) == [1.0 if q in listed else 0.0 for q in sample]
    padded = [q.replace("+", "+0", 1) for q in successes[:20]]  # "123+45=" -> "123+045="
    assert oracle(None, padded) == [0.0] * len(padded)


def test_hard_success_set_is_the_whole_enumeration_on_short_operands(hard_task):
    """Re-enumerating the 2-digit corner of the query space finds exactly the listed successes there."""
    _, _, oracle = hard_task
    queries = hard_attack.all_queries(2)
    found = {q for q, w in zip(queries, hard_attack.target_wrong(oracle, queries)) if w}
    assert found == {q for q in hard_attack.load_successes() if max(map(len, q[:-1].split("+"))) <= 2}


def test_hard_prior_is_exact_and_calibrated(hard_task):
    attacker, tok, _ = hard_task
    cal = json.loads((RESULTS / "hard_attack_calibration.json").read_text())
    successes = hard_attack.load_successes()
    prior = hard_attack.exact_success_probability(attacker, tok, successes)
    assert cal["successes"] == len(successes) and cal["query_space"] == 1000**2
    assert prior == pytest.approx(cal["exact_prior"], rel=1e-4) and 0 < prior <= hard_attack.MAX_PRIOR


def test_exact_query_probabilities_match_sampling(hard_task):
    """sequence_log_probs on variable-length queries is an exact likelihood: the attacker's sampled frequency of
    one-digit sums and of its successes' digit shapes matches the summed probabilities."""
    from trl_banel_examples.tasks.addition import sample_queries

    attacker, tok, _ = hard_task
    short = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    exact = float(sequence_log_probs(attacker, tok, short).exp().sum())
    n = 20_000
    sampled = sample_queries(attacker, tok, n, batch_size=5000, seed=7)
    freq = sum(q in set(short) for q in sampled) / n
    assert abs(freq - exact) < 5 * (exact * (1 - exact) / n) ** 0.5 and exact > 0.05


# ------------------------------------------------------------------------------------------- wheels
def _build_wheel(src: Path, out: Path) -> Path:
    """The wheel of the distribution whose sources were copied to `src` (no build isolation: no network)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("*.whl"))


LOAD_EACH_TASK = """
    import sys, trl_banel, trl_banel_examples
    for module in (trl_banel, trl_banel_examples):
        assert module.__file__.startswith(sys.argv[1]), module.__file__
    from trl_banel_examples.tasks.digits import load_digits_task, load_dataset, image_to_text
    from trl_banel_examples.tasks.hard_attack import load_hard_attack_task, load_successes
    from trl_banel_examples.tasks.addition import load_addition_task
    from trl_banel_examples.tasks.letters import load_letters_task
    images, labels = load_dataset()
    gen, tok, oracle = load_digits_task()
    six, zero = image_to_text(images[labels == 6][0]), image_to_text(images[labels == 0][0])
    assert oracle(None, [six, zero]) == [1.0, 0.0]
    attacker, tok, oracle = load_hard_attack_task()
    successes = load_successes()
    failure = next(q for q in ("1+1=", "2+2=", "3+3=") if q not in successes)
    assert oracle(None, [successes[0], failure]) == [1.0, 0.0]
    for load in (load_addition_task, load_letters_task):
        model, tok, oracle = load()
    print("ok")
"""


@pytest.mark.slow
def test_the_method_and_the_examples_install_from_their_wheels(tmp_path):
    """Build both distributions' wheels from copies of their sources, install them into a bare directory and load
    each task from there: the model files must be the examples' package data, not files the source tree happens to
    hold; the method's wheel holds the method's modules only (no weights; under 300 kB)."""
    src, examples_src = tmp_path / "src", tmp_path / "examples"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    shutil.copytree(REPO / "trl_banel", src / "trl_banel", ignore=ignore)
    shutil.copytree(REPO / "examples", examples_src, ignore=ignore)
    method = _build_wheel(src, tmp_path / "wheels")
    examples = _build_wheel(examples_src, tmp_path / "wheels_examples")
    names = zipfile.ZipFile(method).namelist()
    assert method.stat().st_size < 300_000, method.stat().st_size
    assert not [n for n in names if not (n.startswith("trl_banel/") and n.endswith(".py") or ".dist-info/" in n)]
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(method),
                          str(examples)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_EACH_TASK), str(target)], capture_output=True,
                         text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_the_shipped_generator_holds_almost_all_its_mass_on_the_datasets_zeros(digits_task, dataset):
    """Why the prior is sparse and where BaNEL must look (docs/benchmarks.md, "Sparse tasks"): the generator is a
    mixture of the zeros it learned, none of them a success, with 0.01% of its mass elsewhere; once they are known
    failures, the exact objective moves its mass off them onto the rest, where the sixes it can draw are."""
    from trl_banel_examples.tasks.common import sequence_log_probs

    generator, tok, oracle = digits_task
    images, labels = dataset
    zeros = sorted({digits.image_to_text(x) for x in images[labels == digits.SOURCE_DIGIT]})
    mass = float(sequence_log_probs(generator, tok, zeros).double().exp().sum())
    assert 0.999 < mass < 1.0, mass  # 0.9999 measured (the calibration's mass_on_zeros)
    assert sum(oracle(completions=zeros)) == 0
