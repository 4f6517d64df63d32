"""BaNEL on GSM-Hard questions that a small instruction model almost never solves.

    accelerate launch recipes/gsm8k_hard.py --config recipes/configs/gsm8k_hard.yaml
    accelerate launch recipes/gsm8k_hard.py --config recipes/configs/gsm8k_hard.yaml --question_ids 143 \\
        --use_peft --lora_target_modules q_proj v_proj --push_to_hub --hub_model_id me/qwen-banel-gsm-hard

The setting of the paper (BaNEL, Lee, Amos and Fanti, 2025, arXiv 2510.09596): `Qwen/Qwen2.5-0.5B-Instruct`, six
questions of GSM-Hard (`reasoning-machines/gsm-hard`, columns `input` and `target`; a question id is a row index of
the split) on which the model's success rate is near zero, and a budget of 7,500 reward evaluations per question.

Each question is its own BaNEL run: it starts from the base model, writes its own ledger, model, card and
`result.json` to `output_dir/q{ID}`, spends its own budget, and is pushed to its own Hub repo
(`{hub_model_id}-q{ID}`). Questions do not share a generator, so the result for one does not depend on which
questions ran before it or in what order, and questions can run as separate jobs (in parallel, into the same
`output_dir`). Re-running a question whose run was interrupted reloads its ledger: evaluations already paid for are
not paid again and count against its budget, but the generator restarts from the base model (no generator checkpoints
are kept by default). Re-running a question whose run finished is refused (its trained model would be overwritten by a
less trained one): use another `output_dir`.

After training, the success rate of the trained generator on its question is estimated from `eval_samples` fresh
samples scored by the same reward function, outside the trainer's ledger (these calls are not charged to the
training budget), with a 95% Clopper-Pearson interval. `output_dir/summary.json` and a printed table collect the
questions. Every BaNELConfig / TrainingArguments flag, TRL's ModelConfig flags (`--use_peft`, `--lora_*`) and
`--push_to_hub` work as in TRL's own scripts.
"""

import copy
import gc
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import ModelConfig, TrlParser, get_peft_config

from trl_banel import BaNELConfig, BaNELTrainer
from trl_banel_examples.cli import script_help
from trl_banel.oracle import message_text

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_DATASET = "reasoning-machines/gsm-hard"
PAPER_QUESTION_IDS = [143, 205, 1012, 942, 1248, 510]  # the paper's six GSM-Hard questions (row indices)


@dataclass
class ScriptArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub dataset id, or a local .json/.jsonl file with the same columns (input, target)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub only)."})
    dataset_split: str = field(default="train", metadata={"help": "Split whose row indices are the question ids."})
    question_ids: list[int] = field(
        default_factory=lambda: list(PAPER_QUESTION_IDS),
        metadata={"help": "Row indices of the questions to train on, each as its own BaNEL run."},
    )
    eval_samples: int = field(
        default=256,
        metadata={"help": "Samples from the trained generator per question for the success-rate estimate "
                          "(scored outside the ledger, not charged to the budget)."},
    )


# The prompt: conversational, so the instruction model sees its own chat template; the boxed answer is what
# `extract_answer` looks for first (it falls back to "the answer is ..." and to the last number).
SYSTEM_PROMPT = "You are a careful math tutor. Solve problems step by step."
USER_TEMPLATE = (
    "Solve the following math problem. Reason step by step, and put your final answer, a single number, "
    "in \\boxed{{}}.\n\n{question}"
)


def make_prompt(question: str, tokenizer=None) -> list[dict] | str:
    """The conversation of system and user message; plain text (the two messages, then "Answer:") for a tokenizer
    without a chat template, such as a base model's."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(question=question.strip())},
    ]
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is not None:
        return messages
    return "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction and the reward (TRL's reward-function convention)
# ---------------------------------------------------------------------------------------------------------------
# A number: optional minus glued to it (before or after a "$"), digits with optional thousands commas, decimals,
# optional exponent. Not the tail of a word ("x2", "v1.5") and not a subtraction ("5-3" gives 5 and 3).
_NUMBER = re.compile(
    r"(?<![\w.])(?P<neg>-)?\$?\s?(?P<neg2>-)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
    r"(?:[eE](?P<exp>[-+]?\d+)\b)?"
)
_FRACTION_TAIL = re.compile(r"\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d.])")
_ANSWER_PHRASE = re.compile(r"\banswer\b(?:\*\*)?\s*(?:is|was|:|=)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _normalize(text: str) -> str:
    """Undo the LaTeX and Unicode spellings of numbers that models write."""
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\$", "$").replace("\\%", "%")
    text = re.sub(r"(?<=\d)\\[,!;: ](?=\d)", "", text)  # "1\,234" -> "1234"
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", text)
    return text


def _to_float(match: re.Match) -> float:
    # float() of the literal: a huge exponent gives inf (never a match) instead of an OverflowError.
    value = float(match["num"].replace(",", "") + (f"e{match['exp']}" if match["exp"] else ""))
    return -value if (match["neg"] or match["neg2"]) else value


def _first_number(segment: str) -> float | None:
    """The first number of a stated answer ("7", "$1,234.50", "-3/4"); after the last '=' when there is one."""
    if "=" in segment:
        segment = segment.rsplit("=", 1)[1]
    match = _NUMBER.search(segment)
    if match is None:
        return None
    value = _to_float(match)
    fraction = _FRACTION_TAIL.match(segment, match.end())
    if fraction is not None and float(fraction["den"]) != 0:
        value /= float(fraction["den"])
    return value


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1]
    return None


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a completion: a \\boxed{} answer, else "the answer is ...", else the last number.

    Handles thousands commas ("1,234"), currency and units ("$12.50", "12 dollars"), negatives, decimals and simple
    fractions in a stated answer ("\\frac{7}{2}", "7/2"). Returns None when there is no number.
    """
    if not isinstance(text, str) or not text:
        return None
    text = _normalize(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        value = _first_number(boxed)
        if value is not None:
            return value
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        segment = text[phrases[-1].end() :].split("\n", 1)[0]
        segment = _SENTENCE_END.split(segment, 1)[0]
        value = _first_number(segment)
        if value is not None:
            return value
    numbers = list(_NUMBER.finditer(text))
    return _to_float(numbers[-1]) if numbers else None


def answers_match(pred: float | None, target) -> bool:
    """Numeric equality with a relative tolerance of 1e-4 (and an absolute one of 1e-6)."""
    if pred is None or target is None:
        return False
    try:
        pred = float(pred)
    except (TypeError, ValueError):
        return False
    try:
        target = float(target)
    except (TypeError, ValueError):
        target = extract_answer(str(target))
        if target is None:
            return False
    if not (math.isfinite(pred) and math.isfinite(target)):
        return False
    return math.isclose(pred, target, rel_tol=1e-4, abs_tol=1e-6)


def gsm_hard_reward(prompts, completions, target, **kwargs) -> list[float]:
    """1.0 when the completion's final number equals the target, else 0.0 (a completion with no number fails)."""
    return [1.0 if answers_match(extract_answer(message_text(c)), t) else 0.0 for c, t in zip(completions, target)]


# ---------------------------------------------------------------------------------------------------------------
# Data, model card and the success-rate estimate
# ---------------------------------------------------------------------------------------------------------------
def load_questions(script_args: ScriptArguments) -> Dataset:
    name = script_args.dataset_name
    if os.path.isfile(name):  # a local JSON / JSON-lines file in the dataset's schema (tests, offline use)
        dataset = load_dataset("json", data_files=name, split="train")
    else:
        dataset = load_dataset(name, name=script_args.dataset_config, split=script_args.dataset_split)
    missing = {"input", "target"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name} has no column(s) {sorted(missing)}; GSM-Hard rows have 'input' and 'target'.")
    bad = [q for q in script_args.question_ids if not 0 <= q < len(dataset)]
    if bad:
        raise ValueError(f"question_ids {bad} are not row indices of {name} ({len(dataset)} rows).")
    return dataset


def is_local(name: str) -> bool:
    return os.path.exists(name)


class GSMHardTrainer(BaNELTrainer):
    """BaNELTrainer whose model card keeps this recipe's "BaNEL run" section and dataset name.

    `save_model()` and `push_to_hub()` both re-render README.md from TRL's template (with `push_to_hub` set,
    `save_model()` even pushes before returning), so a section appended once would be lost from the pushed card:
    appending it in `create_model_card` puts it in every card the trainer writes.
    """

    card_dataset_name: str | None = None
    card_run_section: str = ""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name or self.card_dataset_name,
                                  tags=tags)
        if self.card_run_section and self.is_world_process_zero():
            with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as f:
                f.write("\n" + self.card_run_section)


def run_section(question_id, row, model_id, dataset_name, args, result, peft_config) -> str:
    """The "BaNEL run" section of the model card: question, settings, NRE spent, successes and the estimate."""
    generator = "full fine-tuning" if peft_config is None else (
        f"LoRA adapter (r={peft_config.r}, alpha={peft_config.lora_alpha}, "
        f"target modules {sorted(peft_config.target_modules) if peft_config.target_modules else 'default'})")
    question = " ".join(str(row["input"]).split())
    return "\n".join([
        "## BaNEL run",
        "",
        f"Trained with BaNEL ([arXiv 2510.09596](https://arxiv.org/abs/2510.09596)) from the base model "
        f"`{model_id}` on question {question_id} (row {question_id} of `{dataset_name}`, target {row['target']}), "
        "as its own run: one question, its own budget and ledger.",
        "",
        f"> {question}",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| question id | {question_id} |",
        f"| tau (`rejection_threshold`) | {args.rejection_threshold} |",
        f"| NRE budget (`max_reward_evaluations`) | {args.max_reward_evaluations} |",
        f"| `evaluations_per_round` | {args.evaluations_per_round} |",
        f"| `distill_every` | {args.distill_every} |",
        f"| `failure_model` | {args.failure_model} |",
        f"| generator | {generator} |",
        "",
        f"- NRE spent: {result['nre_spent']} of {args.max_reward_evaluations}, in {result['rounds']} rounds",
        f"- successes found in training: {result['successes_found']}",
        f"- success-rate estimate after training: {result['success_rate']:.4f} "
        f"({result['eval_successes']}/{result['eval_samples']} samples at temperature {args.temperature}; "
        f"95% Clopper-Pearson interval [{result['ci_low']:.4f}, {result['ci_high']:.4f}]); these samples were scored "
        "outside the training ledger and are not counted in the NRE.",
        "",
    ])


def estimate_success_rate(trainer: BaNELTrainer, n: int, seed: int) -> dict:
    """The trained generator's success rate on its question over `n` fresh samples, scored by the trainer's own oracle
    outside its ledger (nothing is charged to the budget or recorded), with a 95% Clopper-Pearson interval."""
    torch.manual_seed(seed + 1_000_003 * (trainer.accelerator.process_index + 1))  # a stream apart from training's
    est = trainer.estimate_success_rate(n, posterior=False)
    return {"eval_samples": est.samples, "eval_successes": est.successes, "success_rate": est.rate,
            "ci_low": est.low, "ci_high": est.high}


def write_json(path: str, obj):
    """Write atomically: a reader (or a concurrent run) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_summary(output_dir: str, model_id: str, script_args: ScriptArguments, results: list[dict]):
    """`output_dir/summary.json`: this run's questions, then any other `q*/result.json` already in `output_dir`
    (earlier runs, or runs of other questions in parallel with the same output_dir)."""
    done = {r["question_id"] for r in results}
    others = []
    for path in sorted(Path(output_dir).glob("q*/result.json")):
        with open(path, encoding="utf-8") as f:
            other = json.load(f)
        if other.get("question_id") not in done:
            others.append(other)
    questions = results + sorted(others, key=lambda r: r["question_id"])
    write_json(os.path.join(output_dir, "summary.json"),
               {"model": model_id, "dataset": script_args.dataset_name, "questions": questions})


def print_summary(results: list[dict]):
    header = f"{'question':>8}  {'successes':>9}  {'NRE':>6}  success rate after training (95% CI)"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['question_id']:>8}  {r['successes_found']:>9}  {r['nre_spent']:>6}  {r['success_rate']:.4f} "
              f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] ({r['eval_successes']}/{r['eval_samples']})")


# ---------------------------------------------------------------------------------------------------------------
def main(script_args: ScriptArguments, training_args: BaNELConfig, model_args: ModelConfig) -> list[dict]:
    model_id = model_args.model_name_or_path or DEFAULT_MODEL
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("This recipe does not support quantized loading (--load_in_4bit / --load_in_8bit).")
    if script_args.eval_samples < 1:
        raise ValueError(f"eval_samples={script_args.eval_samples}: the success-rate estimate needs at least 1 "
                         "sample.")
    set_seed(training_args.seed)
    dataset = load_questions(script_args)
    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=model_args.model_revision)
    if tokenizer.chat_template is None:
        warnings.warn(f"{model_id}'s tokenizer has no chat template: the prompts are plain text (system and user "
                      "message, then 'Answer:'). Set the tokenizer's chat_template to prompt it as a conversation.",
                      stacklevel=1)
    peft_config = get_peft_config(model_args)
    hub_dataset = None if is_local(script_args.dataset_name) else script_args.dataset_name
    base_name = model_id.rstrip("/").split("/")[-1]
    summary_path = os.path.join(training_args.output_dir, "summary.json")

    results = []
    for index, qid in enumerate(script_args.question_ids):
        row = dataset[qid]
        prompt = make_prompt(row["input"], tokenizer)
        target = float(row["target"])
        train_dataset = Dataset.from_list([{"prompt": prompt, "target": target, "question_id": qid}])

        # Own run per question: own output folder (ledger, model, card), own Hub repo, fresh copy of the arguments,
        # fresh base model, same seed whatever the order of the questions.
        args = copy.deepcopy(training_args)
        args.output_dir = os.path.join(training_args.output_dir, f"q{qid}")
        if training_args.run_name in (None, training_args.output_dir):
            args.run_name = args.output_dir
        repo_name = training_args.hub_model_id or f"{base_name}-BaNEL-gsm-hard"
        args.hub_model_id = f"{repo_name}-q{qid}"
        if index > 0:
            # accelerate takes one DeepSpeed plugin per process: later trainers reuse the one the first one set up.
            args.deepspeed_plugin = None
        set_seed(training_args.seed)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, revision=model_args.model_revision, dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
        )
        trainer = GSMHardTrainer(
            model=model, reward_funcs=gsm_hard_reward, args=args, train_dataset=train_dataset,
            processing_class=tokenizer, peft_config=peft_config,
        )
        trainer.card_dataset_name = hub_dataset  # TRL's card links a Hub dataset; the run section names any
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if index == 0 and plugin is not None and plugin.zero_stage == 3 and not plugin.zero3_save_16bit_model:
            warnings.warn("DeepSpeed ZeRO-3 without zero3_save_16bit_model: save_model() will write ZeRO shards, "
                          "not model.safetensors (and push them). Set zero3_save_16bit_model: true in the "
                          "accelerate config.", stacklevel=1)
        trainer.train()

        result = {"question_id": qid, "target": target, "nre_spent": trainer.ledger.spent,
                  "budget": args.max_reward_evaluations, "successes_found": len(trainer.ledger.successes),
                  "rounds": trainer.round, "num_processes": trainer.accelerator.num_processes,
                  "output_dir": args.output_dir}
        result.update(estimate_success_rate(trainer, script_args.eval_samples, args.seed))
        result["ci_method"] = "Clopper-Pearson, 95%"

        main_process = trainer.accelerator.is_main_process
        if main_process:  # next to the ledger and the model, so it is pushed with them
            write_json(os.path.join(args.output_dir, "result.json"), result)

        trainer.card_run_section = run_section(qid, row, model_id, script_args.dataset_name, args, result, peft_config)
        trainer.save_model()
        trainer.create_model_card(model_name=args.hub_model_id.split("/")[-1], dataset_name=hub_dataset)
        if args.push_to_hub:
            trainer.push_to_hub(model_name=args.hub_model_id.split("/")[-1], dataset_name=hub_dataset)
            result["hub_model_id"] = trainer.hub_model_id
            if main_process:
                write_json(os.path.join(args.output_dir, "result.json"), result)

        results.append(result)
        if main_process:
            write_summary(training_args.output_dir, model_id, script_args, results)
        trainer.accelerator.wait_for_everyone()

        trainer.accelerator.free_memory()  # release the engine/optimizer before the next question's base model
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if results and main_process:
        print_summary(results)
        print(f"Summary written to {summary_path}")
    return results


def make_parser() -> TrlParser:
    parser = TrlParser(
        (ScriptArguments, BaNELConfig, ModelConfig),
        epilog="--config FILE: a YAML file of values for any flag above (e.g. recipes/configs/gsm8k_hard.yaml); "
        "flags given on the command line override it.",
        **script_help(__doc__),
    )
    parser.set_defaults(model_name_or_path=DEFAULT_MODEL, output_dir="gsm8k_hard_banel")
    return parser


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
    # leave the process group before exit: left to interpreter shutdown, its threads can abort a rank (SIGABRT)
    PartialState().destroy_process_group()
