"""Failure-model scoring: the fast merged-weight path computes what peft's own forward computes."""

import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model

from trl_banel.failure import FailureModels
from trl_banel.posterior import Candidates, eval_mode, sequence_log_probs


def candidates(tokenizer, n=24, prompt_width=2, width=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tokenizer), (n, prompt_width + width), generator=g)
    att = torch.ones_like(ids)
    att[: n // 2, 0] = 0  # some left padding, as generation leaves it
    ids[: n // 2, 0] = tokenizer.pad_token_id
    comp = torch.zeros_like(ids)
    comp[:, prompt_width:] = 1
    comp[::3, -2:] = 0  # completions of different lengths
    return Candidates(ids, att, comp, prompt_width, [""] * n, [""] * n, [""] * n, [0] * n)


def failure_models(policy, k, perturb=True):
    fm = FailureModels(policy, lora_r=4, lora_alpha=8)
    for j in range(k):
        name = fm.add()
        if perturb:  # a fitted failure model: a nonzero LoRA delta
            g = torch.Generator().manual_seed(j)
            for n, p in policy.named_parameters():
                if f".{name}." in n:
                    p.data.copy_(0.3 * torch.randn(p.shape, generator=g))
    return fm


def generator(tokenizer, lora: bool, seed: int):
    """A tiny generator, plain or with its own (nonzero) LoRA adapter on q_proj and v_proj."""
    policy = make_tiny_model(tokenizer, seed=seed)
    if lora:
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    return policy


def peft_reference(fm, cands):
    """The same scores through peft's own mixed-adapter forward."""
    fm.scoring = "peft"
    try:
        assert fm.scoring_path() == "peft"
        return fm.score(cands, batch_size=8)
    finally:
        fm.scoring = "auto"


@pytest.mark.parametrize("lora_policy", [False, True])
def test_merged_scoring_equals_peft_forward(char_tokenizer, lora_policy):
    policy = generator(char_tokenizer, lora_policy, seed=1)
    fm = failure_models(policy, k=3)
    cands = candidates(char_tokenizer)
    assert fm.scoring_path() == "merged"
    policy_lp, failure_lp = fm.score(cands, batch_size=8)
    ref_policy, ref_failure = peft_reference(fm, cands)
    assert failure_lp.shape == (3, len(cands))
    torch.testing.assert_close(policy_lp, ref_policy, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(failure_lp, ref_failure, rtol=1e-5, atol=1e-4)
    # the three failure models differ from one another and from the generator: the routing is per model
    assert (failure_lp[0] - failure_lp[1]).abs().max() > 1e-2
    assert (failure_lp[0] - policy_lp).abs().max() > 1e-2
    # the plain generator's score is unchanged by the injected adapters
    if not lora_policy:
        fm.clear()
        bare, _ = fm.score(cands, batch_size=8)
        torch.testing.assert_close(bare, policy_lp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora_policy", [False, True])
def test_a_new_failure_model_starts_at_log_ratio_exactly_zero(char_tokenizer, lora_policy):
    policy = generator(char_tokenizer, lora_policy, seed=2)
    fm = failure_models(policy, k=2, perturb=False)
    policy_lp, failure_lp = fm.score(candidates(char_tokenizer), batch_size=8)
    assert torch.equal(failure_lp[0], policy_lp) and torch.equal(failure_lp[1], policy_lp)


def test_half_precision_weights_use_peft_forward(char_tokenizer):
    policy = make_tiny_model(char_tokenizer).to(torch.bfloat16)
    fm = failure_models(policy, k=1, perturb=False)
    assert fm.scoring_path() == "peft"  # a small B @ A added to bf16 weights would round away
    fm.scoring = "merged"
    with pytest.raises(ValueError, match="scoring='merged'"):
        fm.score(candidates(char_tokenizer), batch_size=8)


def test_unknown_scoring_choice_is_refused(char_tokenizer):
    with pytest.raises(ValueError, match="scoring="):
        FailureModels(make_tiny_model(char_tokenizer), scoring="fast")


def test_eval_mode_scores_without_dropout_and_restores_the_mode_even_on_error(char_tokenizer):
    model = make_tiny_model(char_tokenizer)
    for layer in model.model.layers:  # dropout that makes two training-mode scores of one batch differ
        layer.self_attn.attention_dropout = 0.5
    batch = candidates(char_tokenizer)

    def score():
        return sequence_log_probs(model, batch.input_ids, batch.attention_mask, batch.completion_mask, 64)

    model.train()
    with torch.no_grad(), eval_mode(model):
        assert not model.training
        assert torch.equal(score(), score())
    assert model.training
    with pytest.raises(RuntimeError, match="scoring failed"), eval_mode(model):
        raise RuntimeError("scoring failed")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training
