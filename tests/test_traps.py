"""Setups that used to fail silently or deep inside a library now stop with a message that says what to do."""

import json

import pytest
from conftest import make_tiny_model
from datasets import Dataset

from trl_banel import BaNELConfig, BaNELTrainer, RewardFunctionError
from trl_banel.ledger import LEDGER_FILENAME, journal_path

UNCONDITIONAL = Dataset.from_dict({"prompt": [""]})


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                  max_reward_evaluations=12, evaluations_per_round=4, num_candidates=16, max_completion_length=6,
                  distill_samples=8, distill_steps=1, per_device_train_batch_size=8, failure_epochs=1,
                  failure_lora_r=4, failure_lora_alpha=8, disable_tqdm=True)
    values.update(overrides)
    return BaNELConfig(**values)


def test_a_reward_function_that_scores_nothing_stops_the_run(tmp_path, char_tokenizer, skewed_model):
    def never_scores(prompts, completions, **kwargs):
        return [None] * len(completions)

    def judge(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    trainer = BaNELTrainer(model=skewed_model, reward_funcs=[judge, never_scores], args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    with pytest.raises(RewardFunctionError, match=r"reward function 'never_scores' returned None \('not scored'\) for "
                                                  r"all \d+ completions .* no evaluation was charged"):
        trainer.train()
    assert trainer.ledger.spent == 0
    ends = [json.loads(line) for line in open(journal_path(str(tmp_path / "out" / LEDGER_FILENAME)))]
    assert ends[-1]["end"] == "failed"  # closed as not charged: a restart charges nothing for it


def test_a_model_object_without_a_tokenizer_says_pass_processing_class(tmp_path, char_tokenizer):
    model = make_tiny_model(char_tokenizer)
    assert not model.config.name_or_path
    with pytest.raises(ValueError, match="processing_class is required.*Pass processing_class=tokenizer"):
        BaNELTrainer(model=model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
                     args=config(tmp_path), train_dataset=UNCONDITIONAL)


def test_a_model_folder_without_tokenizer_files_says_pass_processing_class(tmp_path, char_tokenizer):
    make_tiny_model(char_tokenizer).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError,
                       match=r"No tokenizer could be loaded from .*model.*Pass processing_class=tokenizer"):
        BaNELTrainer(model=str(tmp_path / "model"), reward_funcs=lambda prompts, completions, **kw: [0.0],
                     args=config(tmp_path), train_dataset=UNCONDITIONAL)


def test_impossible_learning_rate_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="BaNELConfig.learning_rate=-0.001 is invalid"):
        config(tmp_path, learning_rate=-1e-3)
