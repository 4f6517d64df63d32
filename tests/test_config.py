import dataclasses

import pytest

from trl_banel import BaNELConfig


@pytest.mark.parametrize("field, value", [
    ("rejection_threshold", 0.0), ("rejection_threshold", -1.0), ("rejection_threshold", 1.5),
    ("max_reward_evaluations", 0), ("evaluations_per_round", 0), ("num_candidates", 0), ("distill_every", -1),
    ("distill_samples", 0), ("distill_steps", 0), ("failure_model", "lora"), ("temperature", 0.0),
    ("failure_epochs", 0), ("reward_timeout", 0.0), ("max_completion_length", 0), ("num_rounds", 0),
    ("failure_margin", -1.0), ("failure_margin", float("nan")), ("failure_max_grad_norm", -1.0),
    ("failure_warmup_steps", -1), ("failure_heldout_fraction", 1.0), ("failure_heldout_fraction", -0.1),
    ("max_failure_models", 0), ("distill_kl_coef", -0.1), ("distill_backoff_factor", 0.5),
    ("distill_backoff_factor", float("nan")), ("support_min_p", 1.0), ("support_min_p", -1e-3),
    ("support_min_p", float("nan")), ("distill_max_learning_rate", 0.0), ("distill_max_learning_rate", float("inf")),
    ("distill_idle_kl_growth", 0.5), ("distill_idle_kl_growth", float("nan")),
    ("distill_idle_kl_growth", float("inf")),
    # TrainingArguments that transformers accepts but that cannot train
    ("learning_rate", 0.0), ("learning_rate", -1e-3), ("learning_rate", float("nan")), ("failure_learning_rate", 0.0),
    ("failure_learning_rate", float("inf")), ("per_device_train_batch_size", 0), ("gradient_accumulation_steps", 0),
    ("max_grad_norm", -1.0), ("weight_decay", -0.1), ("adam_beta1", 1.0), ("adam_beta2", -0.5), ("adam_epsilon", 0.0),
    ("save_steps", 0), ("evaluations_per_round", 2.5), ("max_reward_evaluations", True), ("reward_retries", 1.5),
])
def test_invalid_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"BaNELConfig.{field}="):
        BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{field: value})


def test_the_message_says_what_would_be_valid(tmp_path):
    with pytest.raises(ValueError, match=r"BaNELConfig.learning_rate=0 is invalid: it must be a finite number > 0"):
        BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, learning_rate=0)
    with pytest.raises(ValueError, match=r"growth=0.5 is invalid: it must be a finite number >= 1 \(1: off\)"):
        BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, distill_idle_kl_growth=0.5)
    with pytest.raises(ValueError, match=r"weight_decay=-0.1 is invalid: it must be a finite number >= 0\."):
        BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, weight_decay=-0.1)


def test_evaluations_per_round_above_budget_is_lowered_to_it_with_a_warning(tmp_path, caplog):
    """A budget below the default 25 per round (the README's snippet, a quick try) needs no second flag."""
    with caplog.at_level("WARNING", logger="trl_banel.config"):
        args = BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_reward_evaluations=10)
    assert args.evaluations_per_round == 10
    assert "evaluations_per_round=25 is above max_reward_evaluations=10: using 10" in caplog.text
    caplog.clear()
    args = BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_reward_evaluations=100)
    assert args.evaluations_per_round == 25 and not caplog.text
    with pytest.raises(ValueError, match="evaluations_per_round=0 is invalid"):
        BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, evaluations_per_round=0)


def test_every_field_has_help_text():
    from dataclasses import fields

    missing = [f.name for f in fields(BaNELConfig) if not f.metadata.get("help")]
    assert not missing, missing


def test_every_banel_field_says_when_to_change_it_or_that_it_is_experimental():
    """Issue #29, fewer knobs: a user reads in each field's help whether to touch it."""
    declared = BaNELConfig.__dict__["__annotations__"]  # BaNEL's own fields and the defaults it changes
    guidance = ("Leave it", "Set it", "Raise it", "Lower it", "Turn it", "Use ")
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(BaNELConfig) if f.name in declared}
    silent = [n for n, h in helps.items() if not h.startswith("Experimental") and not any(g in h for g in guidance)]
    assert not silent, f"fields whose help does not say when to change them: {silent}"
    experimental = {n for n, h in helps.items() if h.startswith("Experimental")}
    # what the default round decides must not be marked experimental, and the round's search knobs are
    assert not experimental & {"max_reward_evaluations", "max_completion_length", "distill_objective",
                               "distill_target_kl", "success_replay", "reject_known_failures"}
    assert {"evidence_pseudo_count", "failure_margin", "distill_kl_coef", "distill_every"} <= experimental


def test_max_steps_is_derived_from_the_budget_and_follows_it(tmp_path):
    def make(**kw):
        return BaNELConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **kw)

    c = make(max_reward_evaluations=100, max_idle_rounds=5, distill_every=2, distill_steps=3)
    assert c.max_steps == 53 * 3  # ceil((100 + 5) rounds / 2) distillations of 3 steps: an upper bound
    c.max_reward_evaluations, c.evaluations_per_round = 10, 5
    c.validate()  # after changing a built config: derived again
    assert c.max_steps == 8 * 3
    assert make(num_rounds=4, distill_every=0).max_steps == 4  # one (empty) step per round without distillation
    given = make(max_steps=7)
    given.validate()
    assert given.max_steps == 7  # set by hand: kept


def test_help_renders_for_every_field():
    """argparse %-formats help strings: a bare '%' in one breaks every script's --help."""
    from trl import TrlParser

    text = TrlParser((BaNELConfig,)).format_help()
    assert "--rejection_threshold" in text and "--max_idle_rounds" in text


def test_bf16_is_on_only_where_the_device_computes_in_it(tmp_path, monkeypatch):
    """`BaNELConfig(output_dir)` starts on a CPU-only machine (TRL's default bf16=True would refuse without
    use_cpu=True), and turns bf16 on where the device supports it."""
    import torch

    from trl_banel import config as config_module

    if torch.cuda.is_available():
        pytest.skip("describes a CPU-only machine")
    assert config_module.bf16_supported() is False
    assert BaNELConfig(str(tmp_path)).bf16 is False
    assert BaNELConfig(str(tmp_path), use_cpu=True).bf16 is False
    monkeypatch.setattr(config_module, "bf16_supported", lambda: True)
    assert BaNELConfig(str(tmp_path), use_cpu=True).bf16 is False  # use_cpu: never bf16 by default
    # with a device that supports bf16 the default turns it on: on this CPU, transformers then refuses it, by name
    with pytest.raises(ValueError, match="bf16"):
        BaNELConfig(str(tmp_path))
