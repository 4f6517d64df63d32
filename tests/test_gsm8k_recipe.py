"""recipes/gsm8k_hard.py: answer extraction, argument parsing, and main() end to end on a tiny local model."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from trl_banel.ledger import LEDGER_FILENAME  # noqa: E402
from trl_banel.oracle import message_text  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gsm8k_hard.py"
CONFIG = ROOT / "recipes" / "configs" / "gsm8k_hard.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "gsm_hard_sample.jsonl"
CPU = ["--use_cpu", "true", "--bf16", "false"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("gsm8k_hard_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction and the reward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7, so he has \\boxed{7} apples.", 7.0),  # boxed
        ("First 12 then 30. The answer is 42.", 42.0),  # "the answer is" beats the last number
        ("The final answer is 3 + 4 = 7.", 7.0),  # the value after '='
        ("6 pens cost $12.50 in total.", 12.5),  # currency, decimal
        ("Each costs 2, so 6 pens cost 12 dollars", 12.0),  # units
        ("That is 3 days, so \\boxed{3,702} eggs", 3702.0),  # commas
        ("Answer: 1,234,567.89", 1234567.89),
        ("Her balance is \\boxed{-3}", -3.0),  # negative
        ("She owes money: the answer is -$3.", -3.0),  # negative with currency
        ("\u22123 dollars", -3.0),  # Unicode minus
        ("Each part is 4.5 meters long.", 4.5),  # decimal, last number
        ("\\boxed{\\frac{9}{2}}", 4.5),  # LaTeX fraction
        ("\\boxed{\\$1{,}000}", 1000.0),  # LaTeX currency and thousands separator
        ("I computed 10 earlier; \\boxed{12} is wrong; final: \\boxed{13}", 13.0),  # the last boxed answer
        ("5-3=2", 2.0),  # a subtraction is not a negative number
        ("I don't know.", None),
        ("", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    got = recipe.extract_answer(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789-+.,$/=e{}\\ boxedanswrifc\n")), max_size=80)
       | st.text(max_size=80))
def test_malformed_completions_fail_without_errors(text):
    value = recipe.extract_answer(text)
    assert value is None or isinstance(value, float)
    rewards = recipe.gsm_hard_reward([""] * 2, [text, [{"role": "assistant", "content": text}]], [7.0, 7.0])
    assert rewards[0] == rewards[1] in (0.0, 1.0)


def test_answers_match_tolerance():
    assert recipe.answers_match(7.0, 7)
    assert recipe.answers_match(3702.0, "3,702")
    assert recipe.answers_match(1 / 3, 0.33333)  # relative 1e-5
    assert recipe.answers_match(0.0, 5e-7)  # absolute 1e-6
    assert not recipe.answers_match(1235.0, 1234.0)
    assert not recipe.answers_match(-3.0, 3.0)
    assert not recipe.answers_match(None, 7.0)
    assert not recipe.answers_match(float("nan"), 7.0)
    assert recipe.extract_answer("1e999999") == float("inf") and not recipe.answers_match(float("inf"), 7.0)


def test_reward_on_strings_and_conversations():
    prompts = [[{"role": "user", "content": "q"}]] * 6
    completions = [
        "so \\boxed{7}",  # right, string
        [{"role": "assistant", "content": "The answer is 7 apples."}],  # right, conversational
        [{"role": "assistant", "content": "\\boxed{8}"}],  # wrong
        "I have no idea",  # no number: a failure, not an error
        [{"role": "assistant", "content": ""}],  # empty
        [{"role": "assistant", "content": "It costs $1,234.00"}],  # right, with currency and commas
    ]
    targets = [7.0, 7.0, 7.0, 7.0, 7.0, 1234.0]
    assert recipe.gsm_hard_reward(prompts, completions, targets) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the recipe's --help in a subprocess
def test_help_lists_banel_and_recipe_flags():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for flag in ("--rejection_threshold", "--max_reward_evaluations", "--question_ids", "--eval_samples",
                 "--use_peft", "--lora_target_modules", "--push_to_hub", "--config", "--dataset_name"):
        assert flag in out.stdout, flag


def test_config_file_gives_the_paper_defaults():
    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(
        ["--config", str(CONFIG), *CPU])
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert script_args.dataset_name == "reasoning-machines/gsm-hard"
    assert script_args.question_ids == [143, 205, 1012, 942, 1248, 510]
    assert script_args.eval_samples == 256
    assert training_args.max_reward_evaluations == 7500
    assert 0 < training_args.rejection_threshold <= 1
    assert not model_args.use_peft and not training_args.push_to_hub
    # The command line overrides the file.
    script_args, training_args, _ = recipe.make_parser().parse_args_and_config(
        ["--config", str(CONFIG), *CPU, "--question_ids", "143", "--max_reward_evaluations", "100"])
    assert script_args.question_ids == [143] and training_args.max_reward_evaluations == 100


def test_defaults_without_config_are_the_papers():
    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(CPU)
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert script_args.dataset_name == "reasoning-machines/gsm-hard"
    assert script_args.question_ids == [143, 205, 1012, 942, 1248, 510]
    assert training_args.max_reward_evaluations == 7500


# ---------------------------------------------------------------------------------------------------------------
# main() end to end on a tiny local model
# ---------------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tiny_model_dir(path) -> str:
    """A random tiny Llama and a character tokenizer (printable ASCII) with a chat template, saved to `path`."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in "\n" + "".join(chr(c) for c in range(32, 127)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def tiny_args(model_dir, output_dir, question_ids, *extra):
    argv = [
        "--model_name_or_path", model_dir, "--dataset_name", str(FIXTURE),
        "--question_ids", *map(str, question_ids), "--eval_samples", "16", "--output_dir", str(output_dir),
        *CPU, "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
        "--max_reward_evaluations", "8", "--evaluations_per_round", "4", "--num_rounds", "1",
        "--num_candidates", "8", "--max_proposal_batches", "1", "--max_completion_length", "16",
        "--generation_batch_size", "8", "--scoring_batch_size", "8",
        "--failure_epochs", "1", "--failure_batch_size", "4", "--failure_lora_r", "2", "--failure_lora_alpha", "4",
        "--distill_samples", "4", "--distill_steps", "1", "--per_device_train_batch_size", "4",
        *extra,
    ]
    return recipe.make_parser().parse_args_and_config(argv)


class FakeHub:
    """Stands in for the Hub API in transformers.trainer: records what would be uploaded, uploads nothing."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def __call__(self):
        return self

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        card = Path(folder_path, "README.md")
        self.uploads.append({"repo_id": repo_id, "files": sorted(os.listdir(folder_path)),
                             "card": card.read_text() if card.exists() else None})


def check_question_outputs(out, qid, model_dir, budget):
    qdir = out / f"q{qid}"
    ledger = (qdir / LEDGER_FILENAME).read_text().splitlines()
    assert 0 < len(ledger) <= budget
    card = (qdir / "README.md").read_text()
    assert model_dir in card  # the base model, by path
    assert str(FIXTURE) in card  # the dataset
    assert "2510.09596" in card  # the paper
    assert "## BaNEL run" in card and f"| question id | {qid} |" in card
    for setting in ("rejection_threshold", "max_reward_evaluations", "evaluations_per_round", "distill_every",
                    "failure_model"):
        assert setting in card
    return ledger, card


@pytest.mark.slow  # the recipe's end-to-end run
def test_main_end_to_end_full_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", hub)
    out = tmp_path / "run"
    script_args, training_args, model_args = tiny_args(
        tiny_model_dir, out, [1, 3], "--push_to_hub", "true", "--hub_model_id", "tester/tiny-gsm")
    results = recipe.main(script_args, training_args, model_args)

    summary = json.loads((out / "summary.json").read_text())
    assert [q["question_id"] for q in summary["questions"]] == [1, 3]
    assert summary["dataset"] == str(FIXTURE)
    for entry, qid, target in zip(summary["questions"], [1, 3], [12.0, 4.5]):
        ledger, card = check_question_outputs(out, qid, tiny_model_dir, budget=8)
        assert entry["target"] == target and entry["num_processes"] == 1
        # The evaluation samples went around the ledger: it holds the training evaluations only.
        assert entry["nre_spent"] == len(ledger) and entry["eval_samples"] == 16
        assert 0 <= entry["successes_found"] <= entry["nre_spent"]
        assert 0.0 <= entry["ci_low"] <= entry["success_rate"] <= entry["ci_high"] <= 1.0
        assert entry["ci_high"] > 0  # an exact interval is never degenerate at 0 successes
        assert (out / f"q{qid}" / "model.safetensors").exists()
        assert f"successes found in training: {entry['successes_found']}" in card
    assert results == summary["questions"]
    printed = capsys.readouterr().out
    assert "success rate" in printed and "summary.json" in printed

    # --push_to_hub: one repo per question, and the pushed card is the one with the run section.
    assert hub.repos == ["tester/tiny-gsm-q1", "tester/tiny-gsm-q3"]
    assert all("## BaNEL run" in u["card"] for u in hub.uploads)  # save_model() pushes too, with the same card
    final = {u["repo_id"]: u for u in hub.uploads}
    for qid in (1, 3):
        pushed = final[f"tester/tiny-gsm-q{qid}"]
        assert "## BaNEL run" in pushed["card"] and f"| question id | {qid} |" in pushed["card"]
        assert {LEDGER_FILENAME, "model.safetensors", "result.json"} <= set(pushed["files"])
    assert json.loads((out / "q1" / "result.json").read_text())["hub_model_id"] == "tester/tiny-gsm-q1"


@pytest.mark.slow  # the recipe's end-to-end run
def test_main_end_to_end_lora(tiny_model_dir, tmp_path, monkeypatch):
    """--use_peft, with an easy oracle (any digit in the completion succeeds) so that both successes and failures
    go through the ledger, the summary and the interval (a random tiny model never hits the real target)."""
    calls = []

    def easy_reward(prompts, completions, target, **kwargs):
        calls.append(len(completions))
        return [1.0 if any(ch.isdigit() for ch in message_text(c)) else 0.0 for c in completions]

    monkeypatch.setattr(recipe, "gsm_hard_reward", easy_reward)
    out = tmp_path / "run"
    (out / "q0").mkdir(parents=True)  # an earlier run of another question into the same output_dir
    (out / "q0" / "result.json").write_text(json.dumps({"question_id": 0, "nre_spent": 8}))
    script_args, training_args, model_args = tiny_args(
        tiny_model_dir, out, [2], "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "4",
        "--lora_alpha", "8")
    assert model_args.use_peft and model_args.lora_target_modules == ["q_proj", "v_proj"]
    recipe.main(script_args, training_args, model_args)

    summary = json.loads((out / "summary.json").read_text())
    entry, earlier = summary["questions"]  # this run's question first, then the earlier one, kept
    assert earlier == {"question_id": 0, "nre_spent": 8}
    assert entry["question_id"] == 2 and entry["target"] == -3.0
    ledger, card = check_question_outputs(out, 2, tiny_model_dir, budget=8)
    assert entry["nre_spent"] == len(ledger)
    assert entry["successes_found"] == sum(json.loads(line)["success"] for line in ledger)
    # Training calls went through the ledger (at most the budget); the 16 evaluation samples were scored apart.
    assert sum(calls) == entry["nre_spent"] + 16
    assert 0 < entry["eval_successes"] < 16  # some digits, some not
    assert entry["success_rate"] == entry["eval_successes"] / 16
    assert 0.0 < entry["ci_low"] < entry["success_rate"] < entry["ci_high"] < 1.0
    from scipy.stats import binomtest

    ci = binomtest(entry["eval_successes"], 16).proportion_ci(method="exact")
    assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((ci.low, ci.high))
    adapter = json.loads((out / "q2" / "adapter_config.json").read_text())  # a LoRA adapter, not full weights
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert "LoRA adapter" in card


def test_a_tokenizer_without_a_chat_template_gets_plain_text_prompts(tiny_model_dir, tmp_path, monkeypatch):
    """A base model's tokenizer (no chat template): the recipe warns and prompts with plain text, which the trainer
    takes as is; with a template the prompt stays a conversation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert recipe.make_prompt("What is 2+2?", tokenizer)[1]["content"].endswith("What is 2+2?")
    tokenizer.chat_template = None
    plain = recipe.make_prompt("  What is 2+2? ", tokenizer)
    assert plain == f"{recipe.SYSTEM_PROMPT}\n\n{recipe.USER_TEMPLATE.format(question='What is 2+2?')}\n\nAnswer:"
    base = tmp_path / "base"
    tokenizer.save_pretrained(base)
    for name in ("config.json", "generation_config.json", "model.safetensors"):  # the model; the tokenizer is new
        os.symlink(os.path.join(tiny_model_dir, name), base / name)
    monkeypatch.setattr(recipe.BaNELTrainer, "train", lambda self: None)  # construction is what is checked here
    script_args, training_args, model_args = tiny_args(str(base), tmp_path / "run", [1])
    with pytest.warns(UserWarning, match="no chat template"):
        (result,) = recipe.main(script_args, training_args, model_args)
    assert result["nre_spent"] == 0 and result["eval_samples"] == 16
