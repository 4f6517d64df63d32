"""Starting again in an output_dir: reruns never replace a trained model, resumes say what they found, lost calls."""

import hashlib
import json
import logging
import os

import pytest
from conftest import make_tiny_model
from datasets import Dataset

from trl_banel import BaNELConfig, BaNELTrainer
from trl_banel.ledger import LEDGER_FILENAME, RewardLedger
from trl_banel.runs import BANEL_STATE_NAME, RUN_FILENAME, FinishedRunError, resolve_checkpoint

UNCONDITIONAL = Dataset.from_dict({"prompt": [""]})


def config(out, **overrides):
    values = dict(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", save_strategy="steps", save_steps=2,
        max_reward_evaluations=12, evaluations_per_round=4, num_candidates=32, max_completion_length=8,
        distill_every=1, distill_samples=16, distill_steps=2, per_device_train_batch_size=8, learning_rate=3e-3,
        failure_epochs=2, failure_learning_rate=1e-2, failure_lora_r=4, failure_lora_alpha=8, seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return BaNELConfig(**values)


class Oracle:
    def __init__(self):
        self.calls = []
        self.__name__ = "counting_oracle"

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append(list(completions))
        return [0.0] * len(completions)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make_trainer(out, tok, state, oracle=None, **overrides):
    model = make_tiny_model(tok)
    model.load_state_dict(state)
    return BaNELTrainer(model=model, reward_funcs=oracle or Oracle(), args=config(out, **overrides),
                        train_dataset=UNCONDITIONAL, processing_class=tok)


def test_a_finished_run_is_refused_or_resumed_to_the_same_model(tmp_path, char_tokenizer, skewed_model_state):
    out = tmp_path / "out"
    first = make_trainer(out, char_tokenizer, skewed_model_state)
    first.train()
    first.save_model()
    trained = sha(out / "model.safetensors")
    finished = json.loads((out / RUN_FILENAME).read_text())
    assert finished["spent"] == 12 and finished["checkpoint"] == f"checkpoint-{first.state.global_step}"
    base = make_tiny_model(char_tokenizer)
    base.load_state_dict(skewed_model_state)
    base.save_pretrained(tmp_path / "base")
    assert sha(tmp_path / "base" / "model.safetensors") != trained, "the run trained nothing: the test would be void"

    # the same script again, without resuming: refused before anything is trained or written
    before = sorted(os.listdir(out))
    oracle = Oracle()
    with pytest.raises(FinishedRunError, match=r"holds a finished BaNEL run: 12 of 12 reward evaluations.*"
                                               r"resume_from_checkpoint=True.*another output_dir"):
        make_trainer(out, char_tokenizer, skewed_model_state, oracle).train()
    assert sorted(os.listdir(out)) == before and sha(out / "model.safetensors") == trained and not oracle.calls

    # from an older checkpoint: refused too (it would end less trained)
    older = sorted((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))[0]
    with pytest.raises(FinishedRunError, match="before the end"):
        make_trainer(out, char_tokenizer, skewed_model_state).train(resume_from_checkpoint=str(older))

    # resumed from its final checkpoint: nothing left to do, and the same model is saved, byte for byte
    again = make_trainer(out, char_tokenizer, skewed_model_state, oracle)
    again.train(resume_from_checkpoint=True)
    again.save_model()
    assert sha(out / "model.safetensors") == trained and not oracle.calls


def test_a_larger_budget_continues_a_finished_run_from_its_final_checkpoint(tmp_path, char_tokenizer,
                                                                             skewed_model_state):
    out = tmp_path / "out"
    make_trainer(out, char_tokenizer, skewed_model_state, max_reward_evaluations=8).train()
    oracle = Oracle()
    more = make_trainer(out, char_tokenizer, skewed_model_state, oracle, max_reward_evaluations=12)
    more.train(resume_from_checkpoint=True)
    assert more.ledger.spent == 12 and sum(map(len, oracle.calls)) == 4
    assert json.loads((out / RUN_FILENAME).read_text())["spent"] == 12


def test_a_resume_says_what_it_found_and_lost_calls_stay_lost(tmp_path, char_tokenizer, skewed_model_state, caplog):
    out = tmp_path / "out"
    ledger = RewardLedger(str(out / LEDGER_FILENAME), budget=12)
    ledger.evaluate([""], ["cat"], lambda idx: [0.0], 0)

    class Crash(BaseException):
        pass

    dog = char_tokenizer("dog", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    with pytest.raises(Crash):
        ledger.evaluate([""], ["dog"], lambda idx: (_ for _ in ()).throw(Crash()), 0,
                        meta=[{"row": 0, "completion_ids": dog}])

    oracle = Oracle()
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(out, char_tokenizer, skewed_model_state, oracle, num_rounds=2, save_strategy="no")
        trainer.train()
    text = caplog.text
    assert "1 reward evaluation(s) were in flight" in text and "evaluations.calls.jsonl" in text
    assert "Resuming the BaNEL run in" in text
    assert "2 reward evaluations spent of 12 (1 of them lost in a crash" in text
    assert "10 evaluations left" in text and "the generator starts from the model passed in" in text
    sent = [c for call in oracle.calls for c in call]
    assert "dog" not in sent and "cat" not in sent
    assert trainer.ledger.lookup("", "dog") is None and trainer.ledger.spent == 2 + len(sent)


def test_reevaluate_interrupted_sends_lost_calls_again_and_charges_them(tmp_path, char_tokenizer, skewed_model_state):
    out = tmp_path / "out"
    ledger = RewardLedger(str(out / LEDGER_FILENAME), budget=12)

    class Crash(BaseException):
        pass

    dog = char_tokenizer("dog", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    with pytest.raises(Crash):
        ledger.evaluate([""], ["dog"], lambda idx: (_ for _ in ()).throw(Crash()), 0,
                        meta=[{"row": 0, "completion_ids": dog}])
    seen = []

    def oracle(prompts, completions, completion_ids, **kwargs):
        seen.append((list(completions), completion_ids))
        return [0.0] * len(completions)

    trainer = make_trainer(out, char_tokenizer, skewed_model_state, oracle, num_rounds=1, save_strategy="no",
                           reevaluate_interrupted=True)
    trainer.train()
    assert seen[0] == (["dog"], [dog]), "the lost call was not sent first, as it was"
    assert trainer.ledger.lookup("", "dog").reward == 0.0
    assert trainer.ledger.spent == 1 + sum(len(c) for c, _ in seen)  # the lost charge stays: paid twice, on purpose


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    out = tmp_path / "out"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / BANEL_STATE_NAME).write_bytes(b"x")
    assert resolve_checkpoint(str(out), True).endswith("checkpoint-4")
    # a script passing transformers' get_last_checkpoint() gets the last complete one before it
    assert resolve_checkpoint(str(out), str(out / "checkpoint-6")).endswith("checkpoint-4")
    assert resolve_checkpoint(str(out), None) is None
    for folder in out.iterdir():
        (folder / BANEL_STATE_NAME).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"No complete checkpoint .*\(3 incomplete"):
        resolve_checkpoint(str(out), True)
