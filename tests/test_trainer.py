"""BaNELTrainer end to end on tiny local models."""

import json
import math

import pytest
import torch
from conftest import make_tiny_model, string_log_prob
from datasets import Dataset
from peft import LoraConfig

from trl_banel import BaNELConfig, BaNELTrainer
from trl_banel.ledger import LEDGER_FILENAME
from trl_banel.sampler import Candidate

UNCONDITIONAL = Dataset.from_dict({"prompt": [""]})


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        max_reward_evaluations=24, evaluations_per_round=8, num_candidates=48, max_completion_length=8,
        distill_every=1, distill_samples=32, distill_steps=2, per_device_train_batch_size=16, learning_rate=3e-3,
        failure_epochs=6, failure_learning_rate=1e-2, failure_lora_r=4, failure_lora_alpha=8, seed=0,
        disable_tqdm=True,
        # the paper's round, with a fixed learning rate: what these tests of its parts were written against (the
        # default round is tested on its own, test_the_default_round_finds_and_keeps_the_rare_string)
        distill_objective="posterior", success_replay=0.0, distill_target_kl=0.0,
    )
    values.update(overrides)
    return BaNELConfig(**values)


class RecordingOracle:
    """Always fails; records every completion it is asked about and the round it was asked in."""

    def __init__(self, success=lambda c: False):
        self.calls = []
        self.success = success
        self.trainer = None
        self.__name__ = "recording_oracle"

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append((self.trainer.round if self.trainer else None, list(completions)))
        return [1.0 if self.success(c) else 0.0 for c in completions]

    @property
    def all_completions(self):
        return [c for _, cs in self.calls for c in cs]


def spy_filter(trainer):
    """Record, per round, which completions the filter accepted and rejected."""
    seen = {}
    original = trainer.sampler.filter

    def wrapped(cands, *args, **kwargs):
        result = original(cands, *args, **kwargs)
        kept = {id(c) for c in result.accepted}
        entry = seen.setdefault(trainer.round, {"accepted": set(), "rejected": set()})
        for c in cands:
            entry["accepted" if id(c) in kept else "rejected"].add(c.completion)
        return result

    trainer.sampler.filter = wrapped
    return seen


def test_budget_ledger_and_filter_with_an_always_failing_oracle(tmp_path, char_tokenizer, skewed_model):
    oracle = RecordingOracle()
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    oracle.trainer = trainer
    seen = spy_filter(trainer)
    before = {k: v.clone() for k, v in skewed_model.state_dict().items()}
    trainer.train()

    calls = oracle.all_completions
    assert 0 < len(calls) <= 24
    lines = (tmp_path / "out" / LEDGER_FILENAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(calls) == trainer.ledger.spent
    keys = [(r["prompt"], r["completion"]) for r in records]
    assert len(set(keys)) == len(keys), "a (prompt, completion) was paid for twice"
    assert all({"prompt", "completion", "reward", "round"} <= set(r) for r in records)
    assert all(r["reward"] == 0.0 for r in records)
    # the oracle only ever saw candidates the filter accepted in that round
    for round_, completions in oracle.calls:
        assert set(completions) <= seen[round_]["accepted"]
        assert not set(completions) & (seen[round_]["rejected"] - seen[round_]["accepted"])
    # the failure fit lowers its loss; known failures never pass the filter again, and the filter rejects
    # proposals (in the rounds or in the distillation draws, which proposals sized to the need make the likelier)
    fitted = [h["failure_losses"] for h in trainer.history if h.get("failure_losses")]
    assert fitted and all(losses[-1] < losses[0] for losses in fitted)
    for round_ in seen:
        earlier = {c for r, completions in oracle.calls if r < round_ for c in completions}
        assert not seen[round_]["accepted"] & earlier, "a known failure passed the filter"
    assert any(seen[r]["rejected"] - seen[r]["accepted"] for r in seen)
    # distillation changed the policy
    after = skewed_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert set(after) == set(before), "failure adapters were left inside the policy"
    # the run's wall time is accounted for by phase, and the logs carry it
    assert set(trainer.phase_seconds) == {"propose", "filter", "oracle", "failure_fit", "distill"}
    assert all(v > 0 for v in trainer.phase_seconds.values())
    logged = [h for h in trainer.state.log_history if "time/propose" in h]
    assert logged and sum(h["time/failure_fit"] for h in logged) == pytest.approx(trainer.phase_seconds["failure_fit"])


def test_every_completion_of_a_run_comes_from_the_generation_seam(tmp_path, char_tokenizer, skewed_model):
    """`trainer.sampler.generation` is the one call through which the round gets completions (where an engine such as
    vLLM would go): wrapped, it sees every proposal, and everything the oracle was asked about came out of it."""
    oracle = RecordingOracle()
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    oracle.trainer = trainer
    generated, original = [], trainer.sampler.generation

    def generation(prompts, evidence):
        ids = original(prompts, evidence)
        assert len(ids) == len(prompts) and all(isinstance(t, int) for c in ids for t in c)
        generated.extend(char_tokenizer.batch_decode(ids, skip_special_tokens=True))
        return ids

    trainer.sampler.generation = generation
    trainer.train()
    assert trainer.ledger.spent == 24 and len(generated) > 24
    assert set(oracle.all_completions) <= set(generated)


def test_partial_last_batch_stops_exactly_at_the_budget(tmp_path, char_tokenizer, skewed_model):
    oracle = RecordingOracle()
    args = config(tmp_path, max_reward_evaluations=11, evaluations_per_round=8, distill_every=0)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    trainer.train()
    assert trainer.ledger.spent <= 11
    assert len(oracle.all_completions) == trainer.ledger.spent
    models = [h["failure/num_models"] for h in trainer.history]
    assert models == sorted(models) and models[-1] > 1, \
        "without distillation the failure models accumulate"
    assert len(trainer.failures) == 0, "train() left failure models inside the generator"
    stale = [n for n, p in trainer.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert not stale, f"failure fits left gradients behind: {stale[:3]}"


def test_known_failures_are_never_paid_for_twice(tmp_path, char_tokenizer, skewed_model):
    """Mostly 'cat' is proposed: after its first evaluation it must be rejected for free, every time."""
    oracle = RecordingOracle()
    args = config(tmp_path, rejection_threshold=1e-6, max_reward_evaluations=15, num_rounds=4, distill_every=0)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    trainer.train()
    calls = oracle.all_completions
    assert calls.count("cat") == 1
    assert sum(h["known_rejected"] for h in trainer.history) > 0


@pytest.mark.parametrize("skip", [False, True])
def test_skip_known_successes_gives_the_rounds_places_to_new_completions(tmp_path, char_tokenizer, skewed_model,
                                                                         skip):
    """'cat' (70% of the mass) pays: proposed again after its first evaluation it is free but new to nobody. With
    `skip_known_successes` no later round spends a place on it, and the distillation draw still holds it."""
    oracle = RecordingOracle(success=lambda c: c == "cat")
    args = config(tmp_path, rejection_threshold=1e-6, max_reward_evaluations=40, num_rounds=4, distill_every=0,
                  skip_known_successes=skip)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    evaluated, original = [], trainer.gate.evaluate  # the round's places: what it sends through the ledger

    def spy(cands, round, *args, **kwargs):
        evaluated.append((round, [c.completion for c in cands]))
        return original(cands, round, *args, **kwargs)

    trainer.gate.evaluate = spy
    trainer.train()
    first = next(r for r, cs in evaluated if "cat" in cs)
    again = [r for r, cs in evaluated if r > first and "cat" in cs]
    skipped = sum(h["known_successes_skipped"] for h in trainer.history)
    assert oracle.all_completions.count("cat") == 1  # paid once either way (the ledger)
    if skip:
        assert again == [] and skipped > 0
        assert "cat" in {c.completion for c in trainer.sampler.sample_posterior(32)[0]}  # still distilled
    else:
        assert again and skipped == 0  # later rounds give cat places (free, nothing learnt)


def test_lora_policy_trains_only_adapters(tmp_path, char_tokenizer, skewed_model):
    before = {k: v.clone() for k, v in skewed_model.state_dict().items()}
    trainer = BaNELTrainer(
        model=skewed_model, reward_funcs=RecordingOracle(), args=config(tmp_path, learning_rate=1e-2),
        train_dataset=UNCONDITIONAL, processing_class=char_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    )
    adapters_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    state = trainer.model.state_dict()
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in state.items() if "lora_" not in k}
    assert set(base) == set(before)
    assert all(torch.equal(before[k], base[k]) for k in before), "base weights changed under LoRA"
    assert any(not torch.equal(adapters_before[k], state[k]) for k in adapters_before), "LoRA adapters did not train"
    assert not any("failure_" in k for k in state), "failure adapters were left in the policy"


def test_copy_failure_models(tmp_path, char_tokenizer, skewed_model):
    oracle = RecordingOracle()
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=config(tmp_path, failure_model="copy"),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    assert 0 < trainer.ledger.spent <= 24
    # the copies' region rejects proposals of the distillation draws that are no known failure
    assert any(h.get("distill/rejected_fresh_rate", 0.0) > 0 for h in trainer.history)


def test_the_method_finds_the_rare_string(tmp_path, char_tokenizer, skewed_model):
    """70/20/9/1: only the rarest string is a success; a small budget must make it several times likelier.

    The generator stays the prior until a success (`distill_before_success=False`): exact known-failure rejection
    alone then finds "zebra" and success replay keeps it. (The paper's round, distilling before any success and
    without replay, drifted away from it before finding it on 5 of 6 seeds, and this test once passed on the one.)"""
    start = math.exp(string_log_prob(skewed_model, char_tokenizer, "zebra"))
    oracle = RecordingOracle(success=lambda c: c == "zebra")
    args = config(tmp_path, max_reward_evaluations=60, rejection_threshold=0.97, success_replay=0.5,
                  distill_before_success=False)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    trainer.train()
    end = math.exp(string_log_prob(skewed_model, char_tokenizer, "zebra"))
    assert trainer.ledger.spent <= 60
    assert end > 5 * start, f"p(zebra) {start:.4f} -> {end:.4f}"
    assert any(r.completion == "zebra" and r.success for r in trainer.ledger.records)


def test_the_default_round_finds_and_keeps_the_rare_string(tmp_path, char_tokenizer, skewed_model):
    """BaNELConfig() with only the budget, lengths and batch sizes set: the rarest string is found and kept."""
    start = math.exp(string_log_prob(skewed_model, char_tokenizer, "zebra"))
    oracle = RecordingOracle(success=lambda c: c == "zebra")
    args = BaNELConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
                       disable_tqdm=True, max_reward_evaluations=120, evaluations_per_round=8, num_candidates=48,
                       max_completion_length=8, distill_samples=32, per_device_train_batch_size=16)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    trainer.train()
    end = math.exp(string_log_prob(skewed_model, char_tokenizer, "zebra"))
    assert trainer.distill_objective == "exact" and trainer.ledger.spent <= 120
    assert any(r.completion == "zebra" and r.success for r in trainer.ledger.records)
    assert end > 5 * start, f"p(zebra) {start:.4f} -> {end:.4f}"
    assert any("distill/kl_step" in h for h in trainer.history), "the step size must have measured its KL"
    # known failures alone lower the draw's acceptance: the region must reject fresh proposals too
    drawn = [h["distill/rejected_fresh_rate"] for h in trainer.history if "distill/rejected_fresh_rate" in h]
    assert drawn and max(drawn) > 0, "the failure models must reject part of the distillation's fresh proposals"


def test_model_card_names_the_method_and_paper(tmp_path, char_tokenizer, skewed_model):
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=[RecordingOracle(), RecordingOracle()],
                           args=config(tmp_path, max_reward_evaluations=8, num_rounds=1),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "BaNEL" in card and "2510.09596" in card and "lee2025banel" in card
    assert "banel" in card and "trl" in card
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not any("lora" in k for k in reloaded.state_dict())


def test_dataset_and_tokenizer_errors(tmp_path, char_tokenizer, skewed_model):
    args = config(tmp_path)
    with pytest.raises(ValueError, match="'prompt' column"):
        BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=args,
                     train_dataset=Dataset.from_dict({"text": ["a"]}), processing_class=char_tokenizer)
    with pytest.raises(ValueError, match="empty"):
        BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=args,
                     train_dataset=Dataset.from_dict({"prompt": []}), processing_class=char_tokenizer)
    long_prompt = Dataset.from_dict({"prompt": ["a" * 60]})
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=args, train_dataset=long_prompt,
                           processing_class=char_tokenizer)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        trainer.train()


def test_conversational_prompts_without_a_chat_template_fail_at_construction(tmp_path, skewed_model):
    """The error comes before any evaluation (it used to come from inside the first round), names the missing
    template and the two fixes; the plain template it suggests renders, and then the same prompts run."""
    import re

    from conftest import make_char_tokenizer

    tok = make_char_tokenizer()
    assert tok.chat_template is None
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "ab"}]}])
    oracle = RecordingOracle()
    args = config(tmp_path, max_reward_evaluations=4, evaluations_per_round=4, num_rounds=1)
    with pytest.raises(ValueError, match="no chat template") as err:
        BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=chat, processing_class=tok)
    message = str(err.value)
    assert "tokenizer.chat_template" in message and "plain text" in message
    assert oracle.calls == []
    suggested = re.search(r'such as "(.*?)"\)', message).group(1).replace("\\n", "\n")
    tok.chat_template = suggested
    assert tok.apply_chat_template(chat[0]["prompt"], tokenize=False) == "ab\n\n"
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=chat,
                           processing_class=tok)
    trainer.train()
    assert 0 < trainer.ledger.spent <= 4 and all(r.prompt == "ab\n\n" for r in trainer.ledger.records)


def test_tokenizer_without_pad_falls_back_to_eos(tmp_path, skewed_model):
    from conftest import make_char_tokenizer

    tok = make_char_tokenizer()
    tok.pad_token = None
    BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=config(tmp_path),
                 train_dataset=UNCONDITIONAL, processing_class=tok)
    assert tok.pad_token == tok.eos_token


def test_columns_reach_the_reward_function(tmp_path, char_tokenizer):
    model = make_tiny_model(char_tokenizer)
    seen = {}

    def reward(prompts, completions, answer, **kwargs):
        seen["answer"] = answer
        seen["prompts"] = prompts
        return [0.0] * len(completions)

    ds = Dataset.from_dict({"prompt": ["ab", "cd"], "answer": ["x", "y"]})
    args = config(tmp_path, max_reward_evaluations=4, evaluations_per_round=4, num_rounds=1)
    trainer = BaNELTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                           processing_class=char_tokenizer)
    trainer.train()
    assert seen["answer"] and all({"ab": "x", "cd": "y"}[p] == a for p, a in zip(seen["prompts"], seen["answer"]))


def test_the_trainer_leaves_its_arguments_as_given(tmp_path, char_tokenizer, skewed_model):
    args = config(tmp_path)
    before = args.to_dict()
    BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=args, train_dataset=UNCONDITIONAL,
                 processing_class=char_tokenizer)
    assert args.to_dict() == before


def test_success_estimate_matches_the_exact_probability_and_costs_no_budget(tmp_path, char_tokenizer, skewed_model):
    exact = math.exp(string_log_prob(skewed_model, char_tokenizer, "bird"))
    oracle = RecordingOracle(success=lambda c: c == "bird")
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    est = trainer.estimate_success_rate(3000)
    assert est.samples == 3000 and est.acceptance_rate == 1.0
    assert est.low <= exact <= est.high, (est, exact)
    assert est.oracle_calls == len(set(oracle.all_completions)) < 3000  # each distinct query scored once
    assert trainer.ledger.spent == 0 and not (tmp_path / "out" / LEDGER_FILENAME).exists()


def test_success_estimate_with_other_reward_funcs_calls_them_as_the_trainer_does(tmp_path, char_tokenizer,
                                                                               skewed_model):
    """Other reward functions get the dataset's columns, the configured weights and the configured time-out."""
    import time

    seen = {}

    def tagged(prompts, completions, tag, **kwargs):
        seen["tag"] = set(tag)
        return [1.0] * len(completions)

    def slow(prompts, completions, **kwargs):
        time.sleep(0.5)
        return [1.0] * len(completions)

    ds = Dataset.from_dict({"prompt": [""], "tag": ["t"]})
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=[RecordingOracle(), RecordingOracle()],
                           args=config(tmp_path, reward_weights=[1.0, -1.0], reward_timeout=0.1, reward_retries=0),
                           train_dataset=ds, processing_class=char_tokenizer)
    # weights [1, -1]: every reward is 1 - 1 = 0, not above the threshold
    est = trainer.estimate_success_rate(50, reward_funcs=[tagged, tagged], posterior=False)
    assert seen["tag"] == {"t"} and est.successes == 0 and est.samples == 50
    from trl_banel import RewardFunctionError

    with pytest.raises(RewardFunctionError, match="slow"):
        trainer.estimate_success_rate(10, reward_funcs=[slow, tagged], posterior=False)


def test_a_failing_oracle_stops_the_run_after_saving_everything(tmp_path, char_tokenizer, skewed_model):
    from trl_banel import RewardFunctionError

    calls = []

    def flaky_oracle(prompts, completions, **kwargs):
        calls.append(len(completions))
        if len(calls) >= 3:
            raise ConnectionError("assay machine offline")
        return [0.0] * len(completions)

    args = config(tmp_path, save_strategy="steps", save_steps=1000, reward_retries=1, reward_retry_backoff=0.01)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=flaky_oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    with pytest.raises(RewardFunctionError, match="'flaky_oracle' failed 2 time"):
        trainer.train()
    lines = (tmp_path / "out" / LEDGER_FILENAME).read_text().splitlines()
    assert len(lines) == sum(calls[:2]), "evaluations made before the failure were lost"
    assert all(json.loads(line)["reward"] == 0.0 for line in lines)
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints and (checkpoints[0] / "banel_state.json").exists()


def test_collate_left_pads_prompts_and_right_pads_completions(tmp_path, char_tokenizer, skewed_model):
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    cands = [Candidate("a", "a", "x", completion_ids=[7, 8, 2], row=0, prompt_ids=[1, 5]),
             Candidate("", "", "", completion_ids=[], row=1, prompt_ids=[1])]
    batch = trainer.sampler.collate(cands)
    pad = char_tokenizer.pad_token_id
    assert batch.prompt_width == 2
    assert batch.input_ids.tolist() == [[1, 5, 7, 8, 2], [pad, 1, pad, pad, pad]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert batch.rows == [0, 1] and batch.completions == ["x", ""]
    empty = trainer.sampler.collate([cands[1]])  # no completion at all: one masked column is kept
    assert empty.input_ids.tolist() == [[1, pad]] and empty.completion_mask.tolist() == [[0, 0]]


def test_a_phase_whose_known_successes_were_skipped_is_rated_with_them():
    """With skip_known_successes a phase's generator may propose mostly known successes, none evaluated: they still
    count for save_best_generator (as free successes), or that generator would be rated below a worse one."""
    from trl_banel.distill import better_phase

    skipping = [{"round_successes": 0, "round_evaluated": 10, "known_successes_skipped": 40}]
    entry = better_phase(skipping, 1, 1, None)
    assert entry["successes"] == 40 and entry["evaluated"] == 50
    worse = better_phase([{"round_successes": 5, "round_evaluated": 50}], 1, 1, None)
    assert better_phase(skipping, 1, 2, worse) is not None  # 40 of 50 beats 5 of 50
    assert better_phase([{"round_successes": 0, "round_evaluated": 10}], 1, 1, None) is None
