"""The mechanism, step by step: the rejection test, a failure fit that reaches its margin, a region that filters
what the oracle sees, and the metrics that show each step did its job."""

import logging
import math

import pytest
import torch
from conftest import make_tiny_model, string_log_prob
from datasets import Dataset
from transformers import TrainerCallback
from test_trainer import RecordingOracle, config, spy_filter

from trl_banel import BaNELConfig, BaNELTrainer
from trl_banel.failure import FailureModels
from trl_banel.posterior import rejection_mask

UNCONDITIONAL = Dataset.from_dict({"prompt": [""]})


# ------------------------------------------------------------------------------------------------ rejection test
def test_rejection_mask_rejects_exactly_where_a_failure_model_explains_the_candidate():
    policy = torch.tensor([-2.0, -2.0, -2.0, -2.0])
    failure = torch.tensor([[-2.0, -1.0, -3.0, -2.0 + 0.02],   # equal, far above, below, slightly above (< log 1/tau)
                            [-2.0, -3.0, -3.0, -1.9]])         # a second model rejects only the last
    rejected, min_ratio = rejection_mask(policy, failure, 0.97)
    assert rejected.tolist() == [False, True, False, True]
    assert min_ratio.tolist() == pytest.approx([0.0, -1.0, 1.0, -0.1])
    # tau = 1: any failure model above q rejects; a log-ratio of exactly 0 does not
    assert rejection_mask(policy, failure, 1.0)[0].tolist() == [False, True, False, True]
    assert rejection_mask(policy, failure[:1], 1.0)[0].tolist() == [False, True, False, True]
    # no active model: nothing rejected, ratios infinite
    none, ratio = rejection_mask(policy, torch.zeros((0, 4)), 0.97)
    assert not none.any() and torch.isinf(ratio).all()


# ------------------------------------------------------------------------------------------------ failure fit
def _negatives(trainer, n=40):
    return trainer.sampler.collate(trainer.sampler.propose(n))


@pytest.mark.parametrize("mode", ["adapter", "copy"])
def test_the_failure_fit_reaches_its_margin_on_its_own_negatives(tmp_path, char_tokenizer, mode):
    # an untrained model spreads its mass: every negative is new, so the margin is reachable
    trainer = BaNELTrainer(model=make_tiny_model(char_tokenizer, seed=1), reward_funcs=RecordingOracle(),
                           args=config(tmp_path, failure_model=mode), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    negatives = _negatives(trainer)
    models = trainer.failures
    models.add()
    policy_before, failure_before = models.score(negatives, 64)
    assert torch.allclose(failure_before[-1], policy_before, atol=1e-4), "a new failure model must start as q"
    result = models.fit(negatives, max_epochs=300, learning_rate=1e-3, batch_size=64, margin=1.0, warmup_steps=10)
    assert result.target == 1.0 and result.reached and 0 < result.steps < 300
    policy_lp, failure_lp = models.score(negatives, 64)
    assert torch.allclose(policy_lp, policy_before, atol=1e-4), "fitting a failure model changed the generator"
    assert (failure_lp[-1] - policy_lp).mean().item() >= 0.9  # the stop rule's value is one step stale
    rejected = rejection_mask(policy_lp, failure_lp, 0.97)[0]
    assert rejected.float().mean() > 0.5, "the fitted model should explain most of its own negatives"


def test_the_margin_is_capped_by_what_the_negatives_allow(tmp_path, char_tokenizer, skewed_model):
    """Negatives of a sharp generator (mostly 'cat', p = 0.7) can gain at most KL(empirical || q) nats."""
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    negatives = _negatives(trainer)
    trainer.failures.add()
    result = trainer.failures.fit(negatives, max_epochs=300, learning_rate=1e-2, batch_size=64, margin=1.0)
    assert 0 <= result.target < 0.2 and result.reached and result.steps < 300


def test_a_margin_of_zero_fits_every_epoch(tmp_path, char_tokenizer, skewed_model):
    models = FailureModels(skewed_model, "copy")
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    negatives = _negatives(trainer, 16)
    models.add()
    result = models.fit(negatives, max_epochs=7, learning_rate=1e-3, batch_size=8, margin=0.0,
                        min_log_ratio=-math.log(0.97))
    assert result.steps == 14 and len(result.losses) == 7
    # without a margin the target is what the ratio test needs, and `reached` can fail
    assert result.target == pytest.approx(-math.log(0.97)) and result.reached == (result.log_ratio >= result.target)
    models.add()
    idle = models.fit(negatives, max_epochs=2, learning_rate=1e-12, batch_size=8, margin=0.0,
                      min_log_ratio=-math.log(0.97))
    assert abs(idle.log_ratio) < 1e-3 and not idle.reached, "a fit that moved nothing must not report its margin"


def test_drop_oldest_keeps_the_most_recent_adapters(tmp_path, char_tokenizer, skewed_model):
    models = FailureModels(skewed_model, "adapter", lora_r=2, lora_alpha=4)
    names = [models.add() for _ in range(3)]
    models.drop_oldest()
    assert models.names == names[1:] and len(models) == 2
    models.drop_oldest()
    models.drop_oldest()
    assert len(models) == 0
    assert not any("lora_" in k for k in skewed_model.state_dict()), "adapters left inside the generator"


# ------------------------------------------------------------------------------------------------ the round
def _run(tmp_path, tokenizer, model, oracle, **overrides):
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, args=config(tmp_path, **overrides),
                           train_dataset=UNCONDITIONAL, processing_class=tokenizer)
    oracle.trainer = trainer
    trainer.train()
    return trainer


MECHANISM_METRICS = ["failure/fit_log_ratio", "failure/fit_steps", "failure/heldout_rejected_rate",
                     "filter/ratio_rejected_rate", "generator/entropy", "generator/distinct"]


def test_each_step_of_the_round_logs_what_it_did(tmp_path, char_tokenizer, skewed_model):
    trainer = _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(), max_reward_evaluations=40,
                   evaluations_per_round=10, num_candidates=64, reject_known_failures=False,
                   failure_heldout_fraction=0.2,
                   failure_margin=1.0, failure_epochs=300, failure_learning_rate=1e-3, failure_batch_size=64,
                   failure_max_grad_norm=1.0, failure_warmup_steps=10, keep_failure_models=True)
    full = [h for h in trainer.history if h["round_evaluated"] >= 5]  # rounds with a negative to hold out
    assert len(full) >= 3
    for key in MECHANISM_METRICS:
        assert all(key in h and math.isfinite(h[key]) for h in full), key
        assert any(key in log for log in trainer.state.log_history), f"{key} never reached the logs"
    assert all(h["failure/fit_log_ratio"] >= 0.9 * h["failure/fit_target"] for h in full)
    assert sum(h["failure/margin_reached"] for h in full) >= 0.9 * len(full)
    assert all(0 < h["generator/distinct"] <= 1 and h["generator/entropy"] > 0 for h in trainer.history)
    # with regions kept across distillations the ratio test filters the proposals of every later round
    assert all(h["filter/ratio_rejected_rate"] > 0 for h in trainer.history[1:])
    assert any("distill/log_prob_gain" in h for h in trainer.history)
    assert not any("lora_" in k for k in skewed_model.state_dict()), "failure adapters left inside the generator"


@pytest.mark.parametrize("fit_lr, reached", [(1e-2, True), (1e-12, False)])
def test_without_a_margin_the_round_reports_whether_the_fit_beat_the_ratio_test(tmp_path, char_tokenizer, fit_lr,
                                                                                reached):
    """failure_margin=0 (the default) fits a fixed number of epochs; `failure/margin_reached` then says whether the
    fit raised its negatives above log(1 / tau), and a fit that moves nothing must say no."""
    model = make_tiny_model(char_tokenizer, seed=1)  # untrained: every negative is new, the margin is reachable
    trainer = _run(tmp_path, char_tokenizer, model, RecordingOracle(), max_reward_evaluations=24,
                   evaluations_per_round=8, num_candidates=48, failure_learning_rate=fit_lr)
    fits = [h for h in trainer.history if "failure/fit_target" in h]
    assert fits and all(h["failure/fit_target"] == pytest.approx(-math.log(0.97)) for h in fits)
    assert all(h["failure/margin_reached"] == float(reached) for h in fits)
    assert all((h["failure/fit_log_ratio"] >= h["failure/fit_target"]) == reached for h in fits)


def test_dropping_regions_at_distillation_leaves_the_oracle_unfiltered(tmp_path, char_tokenizer, skewed_model):
    trainer = _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(), max_reward_evaluations=30,
                   evaluations_per_round=10, num_candidates=64, keep_failure_models=False)
    assert all(h["ratio_rejected"] == 0 for h in trainer.history)


def test_without_known_failure_rejection_the_ratio_test_alone_filters_the_oracle(tmp_path, char_tokenizer,
                                                                                 skewed_model):
    """Known-failure rejection off, regions kept: the ratio test alone keeps candidates from the oracle.

    (It does not lift the rare string on this toy: 3 strings hold 99% of the mass, so the fitted failure model
    cannot exceed the empirical distribution of its negatives, and exact rejection is what carries the toy; see
    docs/benchmarks.md on the failure model alone on a sparse task.)"""
    oracle = RecordingOracle(success=lambda c: c == "zebra")
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, reject_known_failures=False, keep_failure_models=True,
                                       max_reward_evaluations=32, evaluations_per_round=8, num_candidates=64))
    oracle.trainer = trainer
    seen = spy_filter(trainer)
    trainer.train()
    assert sum(h["known_rejected"] for h in trainer.history) == 0
    assert all(h["ratio_rejected"] > 0 for h in trainer.history[1:])
    for round_, completions in oracle.calls:
        assert set(completions) <= seen[round_]["accepted"]


def test_a_known_success_is_never_rejected(tmp_path, char_tokenizer, skewed_model):
    """The ledger knows it is not a failure: no failure model may reject it, however far it generalises."""
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(success=lambda c: c == "cat"),
                           args=config(tmp_path, rejection_threshold=1.0), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    cands = trainer.sampler.propose(64)
    cat = [c for c in cands if c.completion == "cat"]
    assert cat, "the skewed model proposes 'cat' 70% of the time"
    trainer.gate.evaluate(cat[:1] + [c for c in cands if c.completion == "dog"][:1], trainer.round)
    trainer.failures.add()
    trainer.failures.fit(trainer.sampler.collate(cat * 3), 30, 1e-2, 64)  # a failure model that explains 'cat' well
    policy_lp, failure_lp = trainer.failures.score(trainer.sampler.collate(cat[:1]), 8)
    assert (failure_lp[-1] - policy_lp).item() > 0, "the fit should raise 'cat' above q"
    result = trainer.sampler.filter(cat)
    keep, stats = result.accepted, result.stats
    assert len(keep) == len(cat) and stats.ratio_rejected == 0
    assert stats.known == 0 and trainer.ledger.lookup("", "cat").success


def test_distillation_kl_keeps_a_frozen_pretrained_reference(tmp_path, char_tokenizer, skewed_model):
    pretrained = {k: v.clone() for k, v in skewed_model.state_dict().items()}
    trainer = _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(), max_reward_evaluations=16,
                   distill_kl_coef=0.5)
    kls = [log["distill/kl_to_pretrained"] for log in trainer.state.log_history if "distill/kl_to_pretrained" in log]
    assert kls and all(math.isfinite(k) and k >= 0 for k in kls) and max(kls) > 0
    reference = trainer.reference_model.state_dict()
    assert all(torch.equal(reference[k], pretrained[k]) for k in pretrained), "the reference moved"


def test_distillation_kl_of_a_lora_generator_uses_its_disabled_adapter(tmp_path, char_tokenizer, skewed_model):
    from peft import LoraConfig

    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer, args=config(tmp_path, max_reward_evaluations=16,
                                                                        distill_kl_coef=0.5, learning_rate=1e-2),
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    assert trainer.reference_model is None, "a LoRA generator needs no copy of the pretrained model"
    kls = [log["distill/kl_to_pretrained"] for log in trainer.state.log_history if "distill/kl_to_pretrained" in log]
    assert kls and max(kls) > 0 and all(math.isfinite(k) for k in kls)


def _support_run(tmp_path, tokenizer, model, **overrides):
    """A run whose generator moves fast (lr 1e-2), every candidate sent to the oracle kept: `(trainer, sent)`."""
    trainer = BaNELTrainer(model=model, reward_funcs=RecordingOracle(), train_dataset=UNCONDITIONAL,
                           processing_class=tokenizer,
                           args=config(tmp_path, max_reward_evaluations=40, evaluations_per_round=8,
                                       learning_rate=1e-2, distill_target_kl=0, **overrides))
    sent, evaluate = [], trainer.gate.evaluate

    def spy(cands, round, retry_lost=False):
        sent.extend(cands)
        return evaluate(cands, round, retry_lost)

    trainer.gate.evaluate = spy
    trainer.train()
    return trainer, sent


def test_proposals_off_the_pretrained_support_never_reach_the_oracle(tmp_path, char_tokenizer, skewed_model):
    """support_min_p: no completion sent to the oracle holds a token the pretrained generator gives less than
    support_min_p times its top token's probability (judged by a copy taken before training); without it some do."""
    import copy

    from trl_banel.posterior import support_gaps

    pretrained = copy.deepcopy(skewed_model).eval()
    bound = -math.log(0.05)

    def gaps(trainer, cands):
        batch = trainer.sampler.collate(cands)
        with torch.no_grad():
            return support_gaps(pretrained, batch.input_ids, batch.attention_mask, batch.completion_mask, 64)

    free, free_sent = _support_run(tmp_path / "free", char_tokenizer, copy.deepcopy(skewed_model))
    assert (gaps(free, free_sent) > bound).any(), "the check cannot fail: nothing off the support was ever proposed"
    assert all(h["filter/off_support_rate"] == 0 for h in free.history)
    guarded, sent = _support_run(tmp_path / "guarded", char_tokenizer, skewed_model, support_min_p=0.05)
    assert sent and (gaps(guarded, sent) <= bound).all()
    assert any(h["filter/off_support_rate"] > 0 for h in guarded.history)
    assert any("filter/off_support_rate" in log for log in guarded.state.log_history)


def test_the_support_guard_of_a_lora_generator_judges_with_its_adapter_disabled(tmp_path, char_tokenizer,
                                                                                  skewed_model):
    """A LoRA generator needs no frozen copy: its adapter is disabled to judge; the judge is the pretrained model
    however far the adapter moved (a proposal the pretrained model rejects is rejected after training too)."""
    import copy

    from peft import LoraConfig

    from trl_banel.posterior import support_gaps

    pretrained = copy.deepcopy(skewed_model).eval()
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=24, learning_rate=1e-2, distill_target_kl=0,
                                       support_min_p=0.05),
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    sent, evaluate = [], trainer.gate.evaluate
    trainer.gate.evaluate = lambda cands, round, retry_lost=False: sent.extend(cands) or evaluate(cands, round,
                                                                                                  retry_lost)
    trainer.train()
    assert trainer.reference_model is None
    batch = trainer.sampler.collate(sent)
    with torch.no_grad():
        gaps = support_gaps(pretrained, batch.input_ids, batch.attention_mask, batch.completion_mask, 64)
    assert sent and (gaps <= -math.log(0.05)).all()
    assert any(h["filter/off_support_rate"] > 0 for h in trainer.history)


def test_a_learning_rate_too_small_to_move_the_generator_is_reported(tmp_path, char_tokenizer, skewed_model, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_banel.trainer"):
        _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(), max_reward_evaluations=32,
             evaluations_per_round=8, learning_rate=1e-9)
    assert "Raise learning_rate" in caplog.text


def test_a_run_without_success_at_the_default_round_says_which_settings_to_change(tmp_path, char_tokenizer,
                                                                                    skewed_model, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_banel.callbacks"):
        _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(), max_reward_evaluations=16,
             evaluations_per_round=8)
    assert "No success in 16 reward evaluations" in caplog.text and "evidence_pseudo_count=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_banel.callbacks"):  # with evidence on: nothing to advise
        _run(tmp_path / "evidence", char_tokenizer, skewed_model, RecordingOracle(), max_reward_evaluations=16,
             evaluations_per_round=8, evidence_pseudo_count=1.0, success_replay=0.5)
    assert "No success" not in caplog.text and "success_replay=0.5" not in caplog.text


def test_a_found_success_without_replay_is_pointed_at_success_replay(tmp_path, char_tokenizer, skewed_model, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_banel.callbacks"):
        _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(success=lambda c: c == "cat"),
             max_reward_evaluations=16, evaluations_per_round=8, success_replay=0.0)
    assert "success_replay=0.5 distils the successes themselves" in caplog.text


# ------------------------------------------------------------------------------------------------ best generator
def test_the_best_phase_generator_is_saved_from_training_evaluations_alone(tmp_path, char_tokenizer, skewed_model):
    """Round 1's candidates all succeed, round 3's one in eight: the generator that proposed round 1 is saved (and
    not replaced by round 3's), chosen from the evaluations training already made."""
    from safetensors.torch import load_file

    oracle = RecordingOracle()
    model = make_tiny_model(char_tokenizer, seed=1)  # spreads its mass: every round's candidates are new
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=40, evaluations_per_round=8,
                                       reject_known_failures=False))
    oracle.trainer = trainer
    hits = {3: 1}
    oracle.success = lambda c: trainer.round == 1 or (hits.get(trainer.round, 0) > 0 and hits.pop(trainer.round))
    snapshots = {}

    class Snapshot(TrainerCallback):
        """The generator before each round (distill_every=1: the one that proposes it)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if not trainer.distilling:
                snapshots[trainer.round] = {k: v.clone() for k, v in model.state_dict().items()}

    trainer.add_callback(Snapshot())
    trainer.train()
    best = trainer.best_generator
    assert best is not None and (best["first_round"], best["last_round"]) == (1, 1)
    assert best["successes"] == best["evaluated"] == 8
    saved = load_file(str(tmp_path / "out" / "best_generator" / "model.safetensors"))
    assert all(torch.equal(saved[k], snapshots[1][k]) for k in saved), "not the generator that proposed round 1"
    final = model.state_dict()
    assert any(not torch.equal(saved[k], final[k]) for k in saved), "distillation never moved the generator"
    assert len(oracle.all_completions) == trainer.ledger.spent <= 40, "selecting the best generator called the oracle"
    assert (tmp_path / "out" / "best_generator" / "tokenizer_config.json").exists()


def test_no_best_generator_without_a_success_or_when_switched_off(tmp_path, char_tokenizer, skewed_model):
    trainer = _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(), max_reward_evaluations=16)
    assert trainer.best_generator is None and not (tmp_path / "out" / "best_generator").exists()
    trainer = _run(tmp_path / "off", char_tokenizer, skewed_model, RecordingOracle(success=lambda c: True),
                   max_reward_evaluations=16, save_best_generator=False)
    assert trainer.best_generator is None and not (tmp_path / "off" / "out" / "best_generator").exists()


# ------------------------------------------------------------------------------------------------ success replay
def _first_seen_succeeds(oracle):
    """An oracle whose one success is the first completion it is asked about (a rare string of a spread model)."""
    found = []

    def success(c):
        if not found:
            found.append(c)
        return c == found[0]

    oracle.success = success
    return found


@pytest.mark.parametrize("replay", [0.0, 0.5])
def test_success_replay_distils_the_found_success_without_calling_the_oracle(tmp_path, char_tokenizer, replay):
    oracle = RecordingOracle()
    found = _first_seen_succeeds(oracle)
    model = make_tiny_model(char_tokenizer, seed=1)  # spreads its mass: the first string seen is a rare one
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=24, evaluations_per_round=8,
                                       distill_steps=4, success_replay=replay))
    oracle.trainer = trainer
    trainer.train()
    assert len(oracle.all_completions) == trainer.ledger.spent <= 24, "replay called the oracle"
    before = string_log_prob(make_tiny_model(char_tokenizer, seed=1), char_tokenizer, found[0])
    gain = string_log_prob(model, char_tokenizer, found[0]) - before
    replayed = [v for log in trainer.state.log_history for k, v in log.items() if k == "distill/replayed_successes"]
    if replay:
        # 3 distillations x 4 steps, half of each batch the found string: it becomes likely
        assert replayed and all(v > 0 for v in replayed)
        assert gain > 3.0, gain
    else:
        assert not replayed and gain < 1.0, gain


def test_success_replay_is_validated():
    with pytest.raises(ValueError, match="success_replay"):
        BaNELConfig(output_dir="x", use_cpu=True, success_replay=1.0)
    with pytest.raises(ValueError, match="success_replay.*baselined"):
        BaNELConfig(output_dir="x", use_cpu=True, success_replay=0.5, distill_objective="baselined")


def test_success_replay_draws_among_all_successes_when_they_outnumber_its_share(tmp_path, char_tokenizer):
    model = make_tiny_model(char_tokenizer, seed=1)  # spreads its mass: many distinct successes
    trainer = BaNELTrainer(model=model, reward_funcs=RecordingOracle(success=lambda c: True),
                           args=config(tmp_path, success_replay=0.5, max_reward_evaluations=64),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    cands = trainer.sampler.propose(64)
    trainer.gate.evaluate(cands, trainer.round)
    found = {r.completion for r in trainer.ledger.successes}
    assert len(found) > 8
    seen = set()
    for round in range(10):
        out, replayed_count = trainer.sampler.replay_successes(cands[:8], trainer.args.seed + round)
        assert replayed_count == 4
        replayed = [c.completion for c in out[4:]]
        assert len(out) == 8 and set(replayed) <= found and len(set(replayed)) == 4
        seen |= set(replayed)
    assert len(seen) > 8, "only the first successes found are ever replayed"


# ------------------------------------------------------------------------------------------------ prefix evidence
def test_prefix_evidence_counts_every_prefix_of_each_failure():
    from trl_banel.evidence import PrefixEvidence

    evidence = PrefixEvidence()
    for ids in ([1, 2, 3], [1, 2, 4], [1, 5]):
        evidence.add("", ids)
    evidence.add("other prompt", [1, 2, 3])
    assert [evidence.count("", p) for p in ([], [1], [1, 2], [1, 2, 3], [1, 5], [2], [1, 2, 3, 4])] == \
        [3, 3, 2, 1, 1, 0, 0]
    assert evidence.count("other prompt", [1]) == 1 and evidence.count("unseen", [1]) == 0


def test_the_evidence_processor_discounts_tried_next_tokens_by_k_over_k_plus_n():
    from trl_banel.evidence import EvidenceLogitsProcessor, PrefixEvidence

    evidence = PrefixEvidence()
    for ids in ([1, 2, 3], [1, 2, 4], [1, 5]):
        evidence.add("", ids)
    proc = EvidenceLogitsProcessor(evidence, ["", "untried"], prompt_width=1, pseudo_count=2.0)
    scores = proc(torch.tensor([[9], [9]]), torch.zeros(2, 8))
    expected = torch.zeros(2, 8)
    expected[0, 1] = math.log(2 / (2 + 3))  # 3 failures start with token 1
    assert torch.allclose(scores, expected)
    # one step down the trie: row 0 generated token 1, row 1 (another prompt) is untouched
    scores = proc(torch.tensor([[9, 1], [9, 1]]), torch.zeros(2, 8))
    expected = torch.zeros(2, 8)
    expected[0, 2], expected[0, 5] = math.log(2 / 4), math.log(2 / 3)
    assert torch.allclose(scores, expected)
    # a row that leaves the tried tree is never discounted again
    scores = proc(torch.tensor([[9, 1, 7], [9, 1, 7]]), torch.zeros(2, 8))
    assert torch.equal(scores, torch.zeros(2, 8))


@pytest.mark.parametrize("pseudo_count", [0.0, 1.0])
def test_prefix_evidence_moves_proposals_off_the_tried_prefixes(tmp_path, char_tokenizer, skewed_model,
                                                                pseudo_count):
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, evidence_pseudo_count=pseudo_count, seed=3))
    cat = char_tokenizer(text="cat", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    for _ in range(200):  # 200 failures went through "c...": the generator's 70% branch
        trainer.evidence.add("", cat)
    share_c = sum(c.completion.startswith("c") for c in trainer.sampler.propose(300)) / 300
    if pseudo_count:
        assert share_c < 0.1, share_c  # 0.7 * (1/201) / (0.7/201 + 0.3): about 0.01
    else:
        assert share_c > 0.5, share_c


def test_without_distillation_before_a_success_the_generator_stays_the_prior(tmp_path, char_tokenizer,
                                                                           skewed_model):
    before = {k: v.clone() for k, v in skewed_model.state_dict().items()}
    oracle = RecordingOracle()
    trainer = _run(tmp_path, char_tokenizer, skewed_model, oracle, max_reward_evaluations=24,
                   distill_before_success=False, evidence_pseudo_count=1.0)
    assert trainer.ledger.spent == len(oracle.all_completions) > 8  # the search went on over several rounds
    assert all(torch.equal(before[k], v) for k, v in skewed_model.state_dict().items())
    assert any("distill/skipped_no_success" in log for log in trainer.state.log_history)


def test_the_tried_prefix_share_shows_the_evidence_acting(tmp_path, char_tokenizer):
    """Same fixed generator, same seed: with the evidence on, later rounds retrace less of the failures' prefixes than
    with a pseudo-count so large that the discount is nil (the trie is only kept with the evidence on)."""
    shares = {}
    for k in (1e9, 1.0):
        model = make_tiny_model(char_tokenizer, seed=1)  # spreads its mass: a large tree of prefixes
        trainer = _run(tmp_path / str(k), char_tokenizer, model, RecordingOracle(), max_reward_evaluations=40,
                       distill_before_success=False, evidence_pseudo_count=k)
        later = [h["generator/tried_prefix_share"] for h in trainer.history[1:]]
        shares[k] = sum(later) / len(later)
    # without the processor's discount the two runs would be identical (same seed, same fixed generator)
    assert shares[1.0] < 0.8 * shares[1e9], shares


def test_distillation_starts_once_a_success_is_found(tmp_path, char_tokenizer, skewed_model):
    before = {k: v.clone() for k, v in skewed_model.state_dict().items()}
    trainer = _run(tmp_path, char_tokenizer, skewed_model, RecordingOracle(success=lambda c: c == "dog"),
                   max_reward_evaluations=24, distill_before_success=False, success_replay=0.5)
    assert trainer.ledger.successes
    assert any(not torch.equal(before[k], v) for k, v in skewed_model.state_dict().items())


def test_proposal_log_probs_are_the_processors_sampling_distribution(char_tokenizer):
    """The exact log pi(y) (used by the letters task's exact estimate) is the distribution generation samples."""
    from transformers import LogitsProcessorList

    from trl_banel.evidence import EvidenceLogitsProcessor, PrefixEvidence, proposal_log_probs
    from trl_banel.posterior import completion_log_softmax, completion_mask_after_prompt

    tok, model = char_tokenizer, make_tiny_model(char_tokenizer, seed=1)
    eos = [tok.eos_token_id]

    def sample(n, **kwargs):
        torch.manual_seed(0)
        start = torch.full((n, 1), tok.bos_token_id)
        return model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                              max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=eos, **kwargs)

    evidence = PrefixEvidence()
    failures = sample(200)[:, 1:]
    for row, keep in zip(failures, completion_mask_after_prompt(failures, eos, tok.pad_token_id)):
        evidence.add("", row[keep.bool()].tolist())
    proc = EvidenceLogitsProcessor(evidence, [""] * 16, prompt_width=1, pseudo_count=0.5)
    out = sample(16, logits_processor=LogitsProcessorList([proc]), output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[:, 1:]
    mask = completion_mask_after_prompt(tokens, eos, tok.pad_token_id)
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(2, tokens[..., None]).squeeze(-1)
    sampled = (sampled * mask).sum(1)
    full_mask = torch.cat([torch.zeros(16, 1, dtype=torch.long), mask], 1)
    log_probs, targets, cmask = completion_log_softmax(model, out.sequences, torch.ones_like(out.sequences),
                                                        full_mask)
    exact = proposal_log_probs(log_probs, targets, cmask, [""] * 16, evidence, 0.5)
    assert proc.discounted > 0
    assert torch.allclose(exact.float(), sampled, atol=1e-4), (exact, sampled)
    # with no evidence it is the generator's own log-likelihood
    plain = proposal_log_probs(log_probs, targets, cmask, [""] * 16, PrefixEvidence(), 0.5)
    q = (log_probs.gather(2, targets[..., None]).squeeze(-1) * cmask).sum(1)
    assert torch.allclose(plain.float(), q, atol=1e-5)


# ------------------------------------------------------------------------------------------------ step size
def test_scale_learning_rate_survives_the_constant_schedule():
    from trl_banel.distill import scale_learning_rate

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    assert scale_learning_rate(opt, sched, 4.0, 1e-8, 1e-2) == pytest.approx(4e-4)
    opt.step()
    sched.step()  # a constant schedule resets lr to base_lr * 1: the base moved with it
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert scale_learning_rate(opt, sched, 1e6, 1e-8, 1e-2) == pytest.approx(1e-2)  # clamped


class _KLRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("start_lr", [1e-7, 1e-1])
def test_the_step_size_moves_the_learning_rate_towards_the_target_kl(tmp_path, char_tokenizer, skewed_model,
                                                                      start_lr):
    """A learning rate far too small is raised, one far too large lowered, each by what the distillation measured."""
    recorder = _KLRecorder()
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(),
                           args=config(tmp_path, learning_rate=start_lr, distill_target_kl=0.05,
                                       max_reward_evaluations=48, logging_steps=1),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer, callbacks=[recorder])
    trainer.train()
    measured = [h["distill/kl_step"] for h in trainer.history if "distill/kl_step" in h]
    rates = [h["distill/learning_rate"] for h in trainer.history if "distill/learning_rate" in h]
    assert len(measured) >= 3 and len(rates) == len(measured)
    if start_lr < 1e-3:
        assert rates[-1] >= start_lr * 4 ** 2, "a learning rate that moves nothing must be raised"
    else:
        assert rates[-1] <= start_lr / 4, "a learning rate that moves the generator far too much must be lowered"
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(rates[-1])
    assert any("distill/kl_step" in log for log in recorder.logs), "the measured KL must reach the logs"


def test_the_step_size_never_sets_a_learning_rate_above_its_cap(tmp_path, char_tokenizer, skewed_model):
    """distill_max_learning_rate bounds what the step size may raise a rate that moves nothing to (SGD included)."""
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(),
                           args=config(tmp_path, learning_rate=1e-7, distill_target_kl=0.05, optim="sgd",
                                       distill_max_learning_rate=1e-5, max_reward_evaluations=48,
                                       distill_idle_kl_growth=1.0),  # every target the same: the cap alone
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    rates = [h["distill/learning_rate"] for h in trainer.history if "distill/learning_rate" in h]
    assert len(rates) >= 4 and rates[0] == pytest.approx(4e-7), "a rate that moves nothing is raised 4x"
    assert max(rates) == pytest.approx(1e-5) and rates[-1] == pytest.approx(1e-5), "raised up to the cap, not beyond"
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.SGD)


def test_without_a_target_the_learning_rate_is_fixed(tmp_path, char_tokenizer, skewed_model):
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(),
                           args=config(tmp_path, learning_rate=1e-4, max_reward_evaluations=32),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert not any("distill/kl_step" in h for h in trainer.history)


def test_a_distillation_that_moved_too_far_is_pulled_back_along_its_update(tmp_path, char_tokenizer, skewed_model):
    """With distill_backoff_factor, a distillation measured beyond that multiple of the target is pulled back towards
    its start, and the move that is left is measured smaller."""
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(),
                           args=config(tmp_path, learning_rate=1e-1, distill_target_kl=0.05, distill_backoff_factor=2,
                                       max_reward_evaluations=32),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    # (each target is distill_target_kl, or grown by idle rounds: distill_idle_kl_growth)
    backed = [h for h in trainer.history if "distill/backoff" in h]
    assert backed, "a learning rate of 0.1 moves the generator far beyond 0.1 nats: a distillation must back off"
    for h in backed:
        assert h["distill/kl_step"] > 2 * h["distill/kl_target"] >= 0.1
        assert h["distill/backoff"] == pytest.approx((h["distill/kl_target"] / h["distill/kl_step"]) ** 0.5)
        assert h["distill/kl_after_backoff"] < h["distill/kl_step"], "pulled back, the move must be smaller"
    assert all("distill/backoff" not in h for h in trainer.history
               if h.get("distill/kl_step", 0) <= 2 * h.get("distill/kl_target", 0))


def test_backing_off_interpolates_the_weights_towards_the_start():
    from trl_banel.distill import StepSize

    class Probe:
        policy = torch.nn.Linear(3, 2)

        @staticmethod
        def log_probs(batch):
            return torch.zeros(1)

    step = StepSize(Probe(), sampler=None, args=None, accelerator=type("A", (), {"num_processes": 1})())
    start = [(p, torch.zeros_like(p)) for p in Probe.policy.parameters()]
    after = [p.detach().clone() for p in Probe.policy.parameters()]
    logs = step.back_off(start, 0.25, batch=None, before=torch.zeros(1))
    for p, moved in zip(Probe.policy.parameters(), after):
        torch.testing.assert_close(p.detach(), 0.25 * moved)
    assert logs["distill/backoff"] == 0.25


@pytest.mark.parametrize("bound", [True, False])
def test_with_the_bound_the_exact_objectives_step_is_at_most_the_posteriors_distance(tmp_path, char_tokenizer,
                                                                                     skewed_model, bound):
    """With distill_posterior_bound: the posterior keeps a share Z of the generator's mass and lies -log Z nats from
    it, and a distillation moving the generator further is pulled back (a larger move is noise, which lowers every
    string's expected log-probability; rare letters without the ratio test drifted to 4e-6x the prior)."""
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(),
                           args=config(tmp_path, learning_rate=1e-1, distill_objective="exact",
                                       rejection_threshold=1e-30, distill_target_kl=5.0, distill_backoff_factor=2,
                                       distill_posterior_bound=bound, max_reward_evaluations=48),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    steps = [h for h in trainer.history if "distill/kl_target" in h]
    assert len(steps) >= 3
    if not bound:  # off (the default): every distillation aims at distill_target_kl
        assert all(h["distill/kl_target"] == 5.0 for h in steps)
        return
    for h in steps:
        assert h["distill/kl_target"] == pytest.approx(min(5.0, -math.log(h["distill/acceptance_rate"])))
    assert any(h["distill/kl_target"] < 1.0 for h in steps), "known failures only: the posterior is near"
    backed = [h for h in steps if h["distill/kl_step"] > 2 * h["distill/kl_target"]]
    assert backed, "a learning rate of 0.1 moves the generator beyond the posterior's distance"
    for h in backed:
        assert h["distill/backoff"] == pytest.approx((h["distill/kl_target"] / h["distill/kl_step"]) ** 0.5)
        assert h["distill/kl_after_backoff"] < h["distill/kl_step"]


def test_an_idle_stop_says_why_and_names_the_step_target_that_held_the_generator(caplog):
    """Rounds that fill fewer than half their places stop the run, with the reason and, in the warning, the case the
    shipped digits task meets at the defaults (every proposal a known failure, the step too small to leave them)."""
    from types import SimpleNamespace

    from trl_banel.distill import stop_reason

    args = SimpleNamespace(max_reward_evaluations=100, stop_after_successes=None, num_rounds=None, max_idle_rounds=3,
                           distill_target_kl=0.025, distill_idle_kl_growth=4.0)
    ledger = SimpleNamespace(exhausted=False, successes=[])
    assert stop_reason(args, ledger, round=7, idle_rounds=2) is None
    with caplog.at_level("WARNING", logger="trl_banel.distill"):
        reason = stop_reason(args, ledger, round=8, idle_rounds=3)
    assert reason == "3 idle rounds, each filling fewer than half of its places (max_idle_rounds=3)"
    assert "distill_target_kl=0.025 nats" in caplog.text and "known_rejected" in caplog.text
    assert "distill_idle_kl_growth=4 per idle round" in caplog.text and "max_idle_rounds" in caplog.text


class LearningRates(TrainerCallback):
    """The learning rate each distillation step ran at, by the round it followed."""

    def __init__(self):
        self.trainer, self.by_round = None, {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.by_round.setdefault(self.trainer.round - 1, optimizer.param_groups[0]["lr"])


def consecutive_idle_rounds(history) -> list[int]:
    """Before each round's distillation: how many rounds in a row, up to it, filled fewer than half their places."""
    counts, idle = [], 0
    for h in history:
        idle = idle + 1 if h["round/places_filled"] < 0.5 else 0
        counts.append(idle)
    return counts


@pytest.mark.parametrize("growth", [1.0, 4.0])
def test_idle_rounds_grow_the_next_distillations_target_and_its_learning_rate_at_once(tmp_path, char_tokenizer,
                                                                                      skewed_model, growth):
    """With distill_idle_kl_growth: once nearly every proposal is a known failure (four animals, all failing), each
    consecutive idle round multiplies the next distillation's target KL, at most to the posterior's distance -log Z
    (and never below distill_target_kl), and its learning rate follows before its first step; off (1), every target
    is distill_target_kl (the shipped digits task stopped idle so, every step held to it)."""
    lrs = LearningRates()
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), callbacks=[lrs],
                           args=config(tmp_path, learning_rate=1e-4, distill_objective="exact",
                                       rejection_threshold=1e-30, distill_target_kl=0.025, max_idle_rounds=4,
                                       distill_idle_kl_growth=growth, max_reward_evaluations=48),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    lrs.trainer = trainer
    trainer.train()
    idle = consecutive_idle_rounds(trainer.history)
    steps = [(h, k) for h, k in zip(trainer.history, idle) if "distill/kl_target" in h]
    assert max(idle) >= 2 and len(steps) >= 4, "the animals are all known failures within a few rounds"
    for h, k in steps:
        distance = -math.log(max(h["distill/acceptance_rate"], 1e-12))
        assert h["distill/kl_target"] == pytest.approx(min(0.025 * growth ** k, max(0.025, distance)))
    if growth == 1.0:
        return
    assert any(h["distill/kl_target"] >= 0.025 * 16 for h, _ in steps), "two idle rounds: 16x the target"
    for (before, _), (h, _) in zip(steps, steps[1:]):
        # the rate the step size chose after the previous distillation, rescaled by sqrt of the targets' ratio
        expected = before["distill/learning_rate"] * (h["distill/kl_target"] / before["distill/kl_target"]) ** 0.5
        assert lrs.by_round[h["round"]] == pytest.approx(min(max(expected, 1e-8), 1e-2))


def test_a_grown_target_stays_within_the_posteriors_distance_and_the_bound_still_applies():
    """target_for: distill_target_kl times the growth per idle round, never past -log Z (nor below the base target
    for lack of it); with distill_posterior_bound, at most -log Z for the exact objective only, as before."""
    from types import SimpleNamespace

    from trl_banel.distill import StepSize

    def target(acceptance, idle, bound=False, exact=True):
        args = SimpleNamespace(distill_target_kl=0.025, distill_idle_kl_growth=4.0, distill_posterior_bound=bound,
                               distill_backoff_factor=0)
        return StepSize(probe=None, sampler=None, args=args, accelerator=None).target_for(acceptance, idle, exact)

    assert target(None, 0) == 0.025 and target(None, 2) == pytest.approx(0.4)
    assert target(0.5, 3) == pytest.approx(math.log(2)), "1.6 nats asked, the posterior is log 2 away"
    assert target(0.99, 3) == 0.025, "a near posterior never lowers the target below distill_target_kl"
    assert target(0.99, 0, bound=True) == pytest.approx(-math.log(0.99))
    assert target(0.99, 0, bound=True, exact=False) == 0.025, "the bound is the exact objective's"
    assert target(1e-30, 5) == pytest.approx(0.025 * 4 ** 5)
