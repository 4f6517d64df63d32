"""recipes/gsm_synthetic.py: the problems' answers, the checker on the trained format, the tokenizer, the cached build,
and (slow) recipes/gsm8k_hard.py end to end on the reduced model and hard set."""

import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gsm = load("gsm_synthetic_recipe", ROOT / "recipes" / "gsm_synthetic.py")
recipe = gsm.load_gsm8k_recipe()

EQUATION = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)\.$")


def check_problem(p, d):
    """The solution is the question's arithmetic: each line's operation right, chained, on the question's numbers
    in order, ending in the boxed answer; every amount positive and within the difficulty's bounds."""
    *lines, last = p.solution.split("\n")
    assert last == f"The answer is \\boxed{{{p.answer}}}."
    assert len(lines) == p.steps and d.min_steps <= p.steps <= d.max_steps
    operands, value = [], None
    for i, line in enumerate(lines):
        a, op, b, c = EQUATION.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert 0 < c <= d.max_value
        if i:
            assert a == value  # each step starts from the previous amount
        operands += [a, b] if i == 0 else [b]
        value = c
    assert value == p.answer
    # the question states exactly the numbers the solution uses, in the same order
    assert [int(n) for n in re.findall(r"\d+", p.question)] == operands, (p.question, p.solution)


@pytest.mark.parametrize("difficulty", ["EASY", "LONG", "BIG", "HARD"])
def test_problems_have_correct_answers(difficulty):
    d = getattr(gsm, difficulty)
    rng = random.Random(difficulty)
    problems = [gsm.make_problem(rng, d) for _ in range(400)]
    for p in problems:
        check_problem(p, d)
    assert {p.steps for p in problems} == set(range(d.min_steps, d.max_steps + 1))
    kinds = {op for p in problems for op in re.findall(r"\d([+*-])\d", p.solution)}
    assert kinds == {"+", "-", "*"}


def test_hard_problems_have_more_steps_and_larger_numbers_than_easy():
    easy = gsm.problem_set(0, gsm.EASY, 200, "easy")
    hard = gsm.problem_set(0, gsm.HARD, 200, "hard")
    assert max(p.steps for p in easy) < min(p.steps for p in hard)
    biggest = lambda p: max(int(n) for n in re.findall(r"\d+", p.solution))  # noqa: E731
    stated = lambda p: max(int(n) for n in re.findall(r"\d+", p.question))  # noqa: E731
    assert sum(biggest(p) > 50 for p in hard) > 0.7 * len(hard) and max(map(biggest, easy)) <= 50
    assert sum(stated(p) > 20 for p in hard) > 0.8 * len(hard) and max(map(stated, easy)) <= 20


def test_problem_sets_are_seeded_and_distinct():
    a = gsm.problem_set(0, gsm.HARD, 20, "hard")
    assert a == gsm.problem_set(0, gsm.HARD, 20, "hard")
    assert len({p.question for p in a}) == 20
    assert a != gsm.problem_set(1, gsm.HARD, 20, "hard")
    assert a != gsm.problem_set(0, gsm.HARD, 20, "other")


def test_checker_accepts_the_trained_format_and_rejects_wrong_or_missing_answers():
    problems = gsm.problem_set(0, gsm.HARD, 30, "hard") + gsm.problem_set(0, gsm.EASY, 30, "easy")
    for p in problems:
        right = p.solution
        wrong = right.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")
        no_box = right.rsplit("\n", 1)[0] + "\nI am not sure."  # the last number is the last equation's result
        first = right.split("\n")[0]  # a solution cut after its first step: its last number is an intermediate
        prose = "I cannot solve this."
        completions = [right, wrong, prose]
        assert gsm.score(p.question, completions, p.answer) == [1.0, 0.0, 0.0]
        assert recipe.extract_answer(right) == p.answer
        # without the box, the recipe's checker falls back to the last number: here the final equation's result
        assert gsm.score(p.question, [no_box], p.answer) == [1.0]
        if p.steps > 1 and int(first.rsplit("=", 1)[1].rstrip(".")) != p.answer:
            assert gsm.score(p.question, [first], p.answer) == [0.0]
    # the rows the sets are written with are what recipes/gsm8k_hard.py reads: input, target
    row = problems[0].row(0)
    assert row["input"] == problems[0].question and float(row["target"]) == problems[0].answer


def shipped(name):
    return [json.loads(line) for line in (gsm.DATA_DIR / name).read_text().splitlines()]


def test_shipped_hard_set_is_well_formed_and_is_the_measured_one():
    """recipes/data's hard set: rows recipes/gsm8k_hard.py reads, each a correct hard problem, the screened candidates
    in order; the same questions (and build) as the measured prior in benchmarks/results/gsm_synthetic/prior.json."""
    rows = shipped(gsm.HARD_FILE)
    prior = json.loads((ROOT / "benchmarks" / "results" / "gsm_synthetic" / "prior.json").read_text())
    assert [r["id"] for r in rows] == list(range(len(rows))) and 5 <= len(rows) <= 10
    candidates = gsm.problem_set(0, gsm.HARD, prior["hard_set"]["candidates"], "hard")
    assert [candidates[i].row(k) for k, i in enumerate(prior["hard_set"]["chosen_candidates"])] == rows
    for r in rows:
        assert set(r) == {"input", "target", "id", "steps", "solution"} and isinstance(r["target"], int)
        check_problem(gsm.Problem(r["input"], r["target"], r["solution"], r["steps"]), gsm.HARD)
        assert gsm.score(r["input"], [r["solution"]], r["target"]) == [1.0]
    questions = recipe.load_questions(recipe.ScriptArguments(dataset_name=str(gsm.DATA_DIR / gsm.HARD_FILE),
                                                             question_ids=[r["id"] for r in rows]))
    assert [float(t) for t in questions["target"]] == [float(r["target"]) for r in rows]
    assert [(h["question"], h["target"]) for h in prior["hard"]] == [(r["input"], r["target"]) for r in rows]
    # measured on the model the current code builds, each never-solved question's upper bound at most 1e-3
    assert prior["build"]["key"] == gsm.BuildConfig().key()
    assert all(h["ci95_high"] <= 1e-3 for h in prior["hard"] if h["successes"] == 0)
    easy = shipped(gsm.EASY_FILE)
    assert [r["input"] for r in easy] == [p.question for p in gsm.problem_set(0, gsm.EASY, len(easy), "easy")]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and the reduced build
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    problems = [gsm.make_problem(rng, d) for d in (gsm.EASY, gsm.LONG, gsm.BIG) for _ in range(100)]
    return gsm.build_tokenizer(problems, 600)


def test_tokenizer_is_byte_level_bpe_with_a_chat_template(tokenizer):
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    assert backend["model"]["type"] == "BPE"
    assert backend["decoder"]["type"] == "ByteLevel"
    assert "ByteLevel" in [p["type"] for p in backend["pre_tokenizer"]["pretokenizers"]]
    assert len(tokenizer) == 600 and len(backend["model"]["merges"]) > 100  # trained merges, not bytes alone
    # byte-level: any text, even characters the training text never had, round-trips without an unknown token
    text = "Zoë paid €5 for 12 🍎 apples.\n\tnaïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    # digits are single tokens, as in Qwen2's pre-tokenizer (arithmetic digit by digit)
    assert [tokenizer.decode([i]) for i in tokenizer("1234", add_special_tokens=False)["input_ids"]] == list("1234")
    # ChatML: the recipe's prompt ends with the assistant header; completions end with <|im_end|>, its EOS
    prompt = gsm.prompt_text(tokenizer, "Mia has 3 apples. How many apples does Mia have now?")
    assert prompt.startswith(f"<|im_start|>system\n{recipe.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("How many apples does Mia have now?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # specials are single tokens
    # the shared prefix used in pretraining is the start of every prompt's tokens
    prefix = gsm.shared_prefix(tokenizer)
    for p in gsm.problem_set(0, gsm.HARD, 10, "hard"):
        ids, start = gsm.encode_example(tokenizer, p)
        assert ids[: len(prefix)] == prefix and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[start:], skip_special_tokens=True) == p.solution


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gsm-cache")
    return cache, gsm.ensure_model(gsm.REDUCED, cache, progress=False)


def test_reduced_build_saves_reloads_and_is_reused(reduced, monkeypatch, caplog):
    cache, folder = reduced
    assert folder.parent == cache and folder.name == gsm.REDUCED.key()
    info = json.loads((folder / "build.json").read_text())
    assert info["config"] == dataclasses.asdict(gsm.REDUCED) and info["steps_done"] == gsm.REDUCED.steps
    assert info["cpu_minutes"] > 0 and info["vocab_size"] == gsm.REDUCED.vocab_size
    model, tokenizer = gsm.load(folder)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert tokenizer.chat_template == gsm.CHAT_TEMPLATE and tokenizer.eos_token_id == model.config.eos_token_id
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(gsm, "pretrain", no_rebuild)
    with caplog.at_level("INFO", logger="trl_banel.gsm_synthetic"):
        assert gsm.ensure_model(gsm.REDUCED, cache) == folder
    assert "Using the cached" in caplog.text
    # another configuration is another folder, built (here: refused by the stub), never the cached one
    with pytest.raises(AssertionError, match="rebuilt"):
        gsm.ensure_model(dataclasses.replace(gsm.REDUCED, seed=1), cache)


def test_cache_key_follows_the_configuration_and_the_templates(monkeypatch):
    key = gsm.BuildConfig().key()
    assert key == gsm.BuildConfig().key() and len(key) == 12
    assert dataclasses.replace(gsm.BuildConfig(), steps=10).key() != key
    monkeypatch.setattr(gsm, "ADD", ["{P} buys {n} extra {x}."])  # other problems: another model
    assert gsm.BuildConfig().key() != key


def test_builds_are_deterministic(tmp_path):
    """The shipped hard set was screened against one build: rebuilding must give the same weights (same machine)."""
    config = dataclasses.replace(gsm.REDUCED, seed=4, steps=12)
    hashes = [json.loads((gsm.ensure_model(config, tmp_path / str(i), progress=False) / "build.json").read_text())
              ["weights_sha256"] for i in range(2)]
    assert hashes[0] == hashes[1]
    other = gsm.ensure_model(dataclasses.replace(config, seed=5), tmp_path / "2", progress=False)
    assert json.loads((other / "build.json").read_text())["weights_sha256"] != hashes[0]


def test_an_interrupted_build_is_not_reused(tmp_path, monkeypatch):
    config = dataclasses.replace(gsm.REDUCED, seed=2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gsm, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gsm.ensure_model(config, tmp_path, progress=False)
    assert not (tmp_path / config.key()).exists()
    monkeypatch.undo()
    folder = gsm.ensure_model(config, tmp_path, progress=False)
    assert (folder / "build.json").exists()


def test_budget_stops_pretraining(tmp_path):
    config = dataclasses.replace(gsm.REDUCED, seed=3, steps=10_000)
    folder = gsm.ensure_model(config, tmp_path, max_minutes=0.02, progress=False)
    info = json.loads((folder / "build.json").read_text())
    assert 0 < info["steps_done"] < 10_000 and info["cpu_minutes"] < 0.5


def test_measurement_samples_the_recipe_prompt_and_scores_with_its_reward(reduced):
    _, folder = reduced
    model, tokenizer = gsm.load(folder)
    p = gsm.problem_set(0, gsm.HARD, 1, "hard")[0]
    texts = gsm.sample_completions(model, tokenizer, p.question, 6, 8, batch_size=4, seed=0)
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    assert texts == gsm.sample_completions(model, tokenizer, p.question, 6, 8, batch_size=4, seed=0)  # seeded
    r = gsm.measure_question(model, tokenizer, p, 6, 8, seed=0)
    assert r["samples"] == 6 and r["successes"] == 0  # an untrained model does not write a 3-digit answer
    assert r["ci95_low"] == 0 and 0.3 < r["ci95_high"] < 0.5  # Clopper-Pearson for 0/6
    assert r["canonical_solution_log10_prob"] < 0


def test_hard_set_takes_the_first_candidates_the_screen_never_saw_solved(monkeypatch):
    candidates = gsm.problem_set(0, gsm.HARD, 6, "hard")
    solved = {candidates[1].question, candidates[3].question}
    monkeypatch.setattr(gsm, "sample_completions", lambda model, tok, question, n, *a, **k: [question] * n)
    monkeypatch.setattr(gsm, "score", lambda question, completions, target: [float(c in solved) for c in completions])
    args = gsm.Args(hard_questions=3, screen_samples=5)
    chosen, screened = gsm.select_hard(None, None, candidates, args)
    assert chosen == [0, 2, 4]  # stops screening once the set is full
    assert screened == [{"samples": 5, "successes": n} for n in (0, 5, 0, 5, 0)]
    with pytest.raises(RuntimeError, match="hard_candidates"):
        gsm.select_hard(None, None, candidates, dataclasses.replace(args, hard_questions=5))


def test_hard_set_skips_candidates_out_of_reach_without_screening_them(monkeypatch):
    """A candidate whose canonical solution is less likely than 10^min_canonical_log10 is never sampled: the
    hard set is rare but within reach."""
    candidates = gsm.problem_set(0, gsm.HARD, 5, "hard")
    log10 = {c.question: v for c, v in zip(candidates, [-12.0, -5.0, -8.5, -2.0, -7.9])}
    monkeypatch.setattr(gsm, "solution_log_prob", lambda model, tok, p: log10[p.question] * math.log(10))
    sampled = []

    def sample(model, tok, question, n, *a, **k):
        sampled.append(question)
        return [question] * n

    monkeypatch.setattr(gsm, "sample_completions", sample)
    monkeypatch.setattr(gsm, "score", lambda question, completions, target: [0.0] * len(completions))
    args = gsm.Args(hard_questions=3, screen_samples=5, min_canonical_log10=-8.0)
    chosen, screened = gsm.select_hard(object(), None, candidates, args)
    assert chosen == [1, 3, 4] and screened == [None, {"samples": 5, "successes": 0}, None,
                                                {"samples": 5, "successes": 0}, {"samples": 5, "successes": 0}]
    assert sampled == [candidates[i].question for i in (1, 3, 4)]


def test_the_screen_draws_in_chunks_and_stops_at_the_first_success(monkeypatch):
    """A candidate solved in its second draw costs two draws, not screen_samples; one never solved costs them all."""
    candidates = gsm.problem_set(0, gsm.HARD, 2, "hard")
    draws = []

    def sample(model, tok, question, n, *a, seed=0, **k):
        draws.append((question, n, seed))
        return [question if question == candidates[0].question and len(draws) == 2 else ""] * n

    monkeypatch.setattr(gsm, "sample_completions", sample)
    monkeypatch.setattr(gsm, "score", lambda question, completions, target: [float(bool(c)) for c in completions])
    monkeypatch.setattr(gsm, "SCREEN_CHUNK", 4)
    chosen, screened = gsm.select_hard(None, None, candidates, gsm.Args(hard_questions=1, screen_samples=10))
    assert chosen == [1] and screened == [{"samples": 8, "successes": 4}, {"samples": 10, "successes": 0}]
    assert [n for _, n, _ in draws] == [4, 4, 4, 4, 2] and len({seed for *_, seed in draws}) == 5


def test_main_writes_the_sets_the_gsm8k_recipe_reads(reduced, tmp_path):
    """The sets as recipes/gsm8k_hard.py loads a local --dataset_name; the hard set made of screened candidates."""
    cache, folder = reduced
    args = gsm.Args(reduced=True, cache_dir=str(cache), data_dir=str(tmp_path), results="", measure=False,
                    hard_candidates=6, screen_samples=2, max_completion_length=4, hard_questions=3,
                    easy_questions=4, min_canonical_log10=-math.inf)  # an untrained model reaches nothing
    result = gsm.main(args)
    assert result["model_dir"] == str(folder)
    # an untrained model succeeds on no candidate: the hard set is the first three, in order
    assert result["hard_set"]["chosen_candidates"] == [0, 1, 2]
    assert result["hard_set"]["screen_successes"] == [{"samples": 2, "successes": 0}] * 3
    for name, n in ((gsm.HARD_FILE, 3), (gsm.EASY_FILE, 4)):
        questions = recipe.load_questions(recipe.ScriptArguments(dataset_name=str(tmp_path / name),
                                                                 question_ids=list(range(n))))
        assert len(questions) == n and {"input", "target"} <= set(questions.column_names)


def test_model_only_prints_the_folder_and_writes_no_set(reduced, tmp_path, capsys):
    cache, folder = reduced
    result = gsm.main(gsm.Args(reduced=True, cache_dir=str(cache), data_dir=str(tmp_path), model_only=True))
    assert result == {"model_dir": str(folder)}
    assert capsys.readouterr().out == f"{folder}\n"  # stdout is the folder alone: MODEL=$(python ... --model_only)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a subprocess: imports and the reduced build, 10-35 s on a shared 2-core machine
def test_command_line_measures_and_writes_json_and_a_table_naming_the_command(tmp_path):
    """The docs' command, reduced: build, screen, measure, write PATH.json and PATH.md."""
    args = ["--reduced", "true", "--cache_dir", str(tmp_path), "--data_dir", str(tmp_path), "--results",
            str(tmp_path / "prior"), "--hard_candidates", "3", "--screen_samples", "2", "--hard_questions", "2",
            "--min_canonical_log10=-inf",  # an untrained model reaches nothing
            "--hard_samples", "5", "--easy_questions", "2", "--easy_samples", "2", "--max_completion_length", "6"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    proc = subprocess.run([sys.executable, "recipes/gsm_synthetic.py", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "prior.json").read_text())
    assert result["command"] == " ".join(["python", "recipes/gsm_synthetic.py", *args])
    assert [h["samples"] for h in result["hard"]] == [5, 5] and result["easy"]["samples"] == 4
    table = (tmp_path / "prior.md").read_text()
    assert f"Regenerate: `{result['command']}`" in table and table.count("| 0 / 5 |") == 2


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # recipes/gsm8k_hard.py in a subprocess on the reduced model
def test_gsm8k_recipe_runs_on_the_reduced_model_and_hard_set(reduced, tmp_path):
    cache, folder = reduced
    gsm.main(gsm.Args(reduced=True, cache_dir=str(cache), data_dir=str(tmp_path), results="", measure=False,
                      screen_samples=0, hard_questions=2, easy_questions=2))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "gsm8k_hard.py"), "--model_name_or_path", str(folder),
         "--dataset_name", str(tmp_path / gsm.HARD_FILE), "--question_ids", "1", "--output_dir", str(out),
         "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true",
         "--max_reward_evaluations", "8", "--evaluations_per_round", "4", "--num_candidates", "8",
         "--max_completion_length", "12", "--generation_batch_size", "8", "--scoring_batch_size", "8",
         "--distill_samples", "4", "--distill_steps", "1", "--per_device_train_batch_size", "4",
         "--failure_epochs", "1", "--failure_batch_size", "4", "--eval_samples", "8"],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["questions"]
    hard = [json.loads(line) for line in (tmp_path / gsm.HARD_FILE).read_text().splitlines()]
    assert entry["question_id"] == 1 and entry["target"] == hard[1]["target"]
    assert 0 < entry["nre_spent"] <= 8 and entry["eval_samples"] == 8
    assert (out / "q1" / "model.safetensors").exists() and (out / "q1" / "result.json").exists()


@pytest.mark.slow  # two short training runs on the reduced model (about 30 s)
def test_the_comparison_benchmark_runs_both_methods_within_budget_and_reuses_its_runs(reduced, tmp_path):
    """benchmarks/gsm_synthetic.py on the reduced model: each run spends at most the budget through its ledger, is
    cached and not re-run, the tables are written, and the tuning question is refused as an evaluation question."""
    from benchmarks import gsm_synthetic as bench

    _, folder = reduced
    rows = [p.row(i) for i, p in enumerate(gsm.problem_set(0, gsm.HARD, 2, "hard"))]
    prior = {"hard": [{"id": r["id"], "question": r["input"], "target": r["target"], "successes": 0,
                       "samples": 3700} for r in rows]}
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    args = bench.Args(question_ids=[0], tuning_question=1, seeds=[0], budget=6, eval_samples=4, curve_samples=2,
                      model_dir=str(folder), prior=str(tmp_path / "prior.json"), out=str(tmp_path / "out"))
    bench.main(args)
    runs = json.loads((tmp_path / "out" / "runs" / "q0.json").read_text())
    assert set(runs) == {"pretrained", "banel_seed0", "grpo_seed0"}
    for key in ("banel_seed0", "grpo_seed0"):
        assert 0 < runs[key]["final"]["nre"] <= 6 and runs[key]["settings"]["budget"] == 6
    assert runs["banel_seed0"]["settings"]["max_completion_length"] == bench.MAX_COMPLETION_LENGTH
    assert runs["grpo_seed0"]["settings"]["learning_rate"] == bench.DEFAULT_KNOBS["grpo"]["learning_rate"]
    assert runs["pretrained"]["final"]["high"] == pytest.approx(9.96e-4, rel=1e-2)  # 0/3700: the upper bound
    summary = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [q["question"] for q in summary["questions"]] == [0] and summary["budget"] == 6
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0
    assert "| 0 | 0/3700 | banel |" in (tmp_path / "out" / "comparison.md").read_text()
    before = (tmp_path / "out" / "runs" / "q0.json").read_text()
    bench.main(args)  # cached: nothing re-run
    assert (tmp_path / "out" / "runs" / "q0.json").read_text() == before
    # a BaNEL run made under former package defaults is redone; GRPO's is kept
    stale = json.loads(before)
    stale["banel_seed0"]["settings"]["banel_defaults"] = "former"
    stale["banel_seed0"]["minutes"] = -1.0
    (tmp_path / "out" / "runs" / "q0.json").write_text(json.dumps(stale))
    bench.main(dataclasses.replace(args, summarize=True))  # until rerun, it is shown apart and not counted
    methods = json.loads((tmp_path / "out" / "comparison.json").read_text())["questions"][0]["methods"]
    assert set(methods) == {"banel (former defaults)", "grpo"}
    assert "| 0 | 0/3700 | banel (former defaults) |" in (tmp_path / "out" / "comparison.md").read_text()
    bench.main(args)
    redone = json.loads((tmp_path / "out" / "runs" / "q0.json").read_text())
    assert redone["banel_seed0"]["settings"]["banel_defaults"] == bench.defaults_identity("banel")["banel_defaults"]
    assert redone["banel_seed0"]["minutes"] >= 0 and redone["grpo_seed0"] == stale["grpo_seed0"]
    with pytest.raises(ValueError, match="tuning question"):
        bench.main(dataclasses.replace(args, question_ids=[1]))
