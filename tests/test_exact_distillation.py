"""The exact distillation objective (trl_banel.exact_distillation): no pull towards the generator's own samples,
the known failures' exact mass, and a trainer that moves only where the region says."""

import dataclasses
import math

import pytest
import torch
from conftest import SKEWED, string_log_prob
from datasets import Dataset
from test_trainer import RecordingOracle, config

from trl_banel import BaNELTrainer
from trl_banel.exact_distillation import ExactTargets, exact_loss, failure_mass, micro_batches, proposal_distribution
from trl_banel.evidence import PrefixEvidence, proposal_log_probs
from trl_banel.posterior import Candidates, completion_log_softmax, sequence_log_probs

UNCONDITIONAL = Dataset.from_dict({"prompt": [""]})


def candidates(tok, strings) -> Candidates:
    """Each string as a completion of the empty prompt ([bos]), right-padded, EOS included."""
    rows = [tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in strings]
    width = max(map(len, rows))
    ids = torch.full((len(rows), 1 + width), tok.pad_token_id)
    comp = torch.zeros_like(ids)
    ids[:, 0] = tok.bos_token_id
    for i, r in enumerate(rows):
        ids[i, 1: 1 + len(r)] = torch.tensor(r)
        comp[i, 1: 1 + len(r)] = 1
    att = comp.clone()
    att[:, 0] = 1
    return Candidates(ids, att, comp, 1, [""] * len(rows), [""] * len(rows), list(strings), [0] * len(rows))


def _batches(model, batch, rejected=None, failures=None, evidence=None, k=0.0):
    mass = torch.zeros(0)
    if failures is not None:
        mass = failure_mass(model, failures, evidence, k, 64)
    targets = ExactTargets(batch, torch.zeros(len(batch), dtype=torch.bool) if rejected is None else rejected, 1.0,
                           failures, mass)
    return micro_batches(targets, 1, len(batch), 0, lambda b: proposal_distribution(model, b, evidence, k))


def _grad_norm(model, loss) -> float:
    model.zero_grad()
    loss.backward()
    return sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)


def test_with_no_region_the_exact_gradient_is_zero_where_maximum_likelihood_random_walks(char_tokenizer,
                                                                                         skewed_model):
    batch = candidates(char_tokenizer, ["cat", "cat", "dog", "bird", "cat", "dog"])  # the generator's own samples
    item = _batches(skewed_model, batch)[0]
    assert _grad_norm(skewed_model, exact_loss(skewed_model, item)[0]) == 0.0
    # the posterior objective (maximum likelihood on the same samples) pulls the generator towards them
    log_probs, targets, mask = completion_log_softmax(skewed_model, batch.input_ids, batch.attention_mask,
                                                      batch.completion_mask)
    mle = -(torch.gather(log_probs, 2, targets.unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
    assert _grad_norm(skewed_model, mle) > 1e-2


def test_known_failure_mass_is_the_proposal_distributions_exact_probability(char_tokenizer, skewed_model):
    failures = candidates(char_tokenizer, SKEWED)
    plain = failure_mass(skewed_model, failures, PrefixEvidence(), 0.0, 2)
    exact = torch.tensor([string_log_prob(skewed_model, char_tokenizer, s) for s in SKEWED]).double().exp()
    assert torch.allclose(plain, exact, rtol=1e-4)
    evidence = PrefixEvidence()
    for s in ["cat", "cat", "dog"]:
        evidence.add("", char_tokenizer(s, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id])
    discounted = failure_mass(skewed_model, failures, evidence, 1.0, 64)
    log_probs, targets, mask = completion_log_softmax(skewed_model, failures.input_ids, failures.attention_mask,
                                                      failures.completion_mask)
    expected = proposal_log_probs(log_probs, targets, mask, [""] * 4, evidence, 1.0).exp()
    assert torch.allclose(discounted, expected, rtol=1e-4)
    assert discounted[0] < 0.9 * plain[0] and discounted[3] > plain[3]  # tried "cat" discounted, untried "zebra" not


def test_the_known_failure_term_moves_mass_off_the_failures_onto_the_rest(char_tokenizer, skewed_model):
    batch = candidates(char_tokenizer, ["cat", "dog", "bird", "zebra"])
    failures = candidates(char_tokenizer, ["cat"])
    before = {s: string_log_prob(skewed_model, char_tokenizer, s) for s in SKEWED}
    optimizer = torch.optim.SGD(skewed_model.parameters(), lr=0.05)
    for _ in range(10):
        item = _batches(skewed_model, batch, failures=failures, evidence=PrefixEvidence())[0]
        optimizer.zero_grad()
        exact_loss(skewed_model, item)[0].backward()
        optimizer.step()
    after = {s: string_log_prob(skewed_model, char_tokenizer, s) for s in SKEWED}
    assert after["cat"] < before["cat"] - 0.05
    rest = ["dog", "bird", "zebra"]
    assert sum(math.exp(after[s]) for s in rest) > 1.2 * sum(math.exp(before[s]) for s in rest), (before, after)


def test_a_trainer_with_the_exact_objective_and_no_region_leaves_the_generator_unchanged(tmp_path, char_tokenizer,
                                                                                        skewed_model):
    before = {k: v.clone() for k, v in skewed_model.state_dict().items()}
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=24, evaluations_per_round=8,
                                       distill_objective="exact", reject_known_failures=False,
                                       rejection_threshold=1e-30, learning_rate=1e-2))
    trainer.train()
    assert trainer.state.global_step > 0
    assert all(torch.equal(before[k], v) for k, v in skewed_model.state_dict().items())
    logged = {k: v for log in trainer.state.log_history for k, v in log.items() if k.startswith("distill/")}
    # the objective was evaluated (the generator's entropy per token, > 0) and had no known failure to push off
    assert logged["distill/cross_entropy"] > 0 and logged["distill/known_failure_term"] == 0


@pytest.mark.parametrize("objective", ["exact", "posterior"])
def test_known_failure_rejection_distilled_lowers_the_failures(tmp_path, char_tokenizer, skewed_model, objective):
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=16, evaluations_per_round=8,
                                       distill_objective=objective, rejection_threshold=1e-30, learning_rate=1e-2))
    before = string_log_prob(skewed_model, char_tokenizer, "cat")
    trainer.train()
    assert "cat" in {r.completion for r in trainer.ledger.records}
    assert string_log_prob(skewed_model, char_tokenizer, "cat") < before - 0.1
    if objective == "exact":
        mass = [v for log in trainer.state.log_history for k, v in log.items() if k == "distill/known_failure_mass"]
        assert mass and all(0 < m <= 1 for m in mass)
        term = [v for log in trainer.state.log_history for k, v in log.items() if k == "distill/known_failure_term"]
        assert term and min(term) < 0  # mass(F) x mean log q(f): the part of the loss that pushed "cat" down
        # the probe measures what the objective is for: the known failures lost log-likelihood
        drops = [h["distill/known_failure_log_prob_drop"] for h in trainer.history
                 if "distill/known_failure_log_prob_drop" in h]
        assert drops and max(drops) > 0.1 and not any("distill/log_prob_gain" in h for h in trainer.history)


def test_once_a_success_is_found_the_exact_objective_hands_over_to_replayed_maximum_likelihood(tmp_path,
                                                                                              char_tokenizer,
                                                                                              skewed_model):
    before = string_log_prob(skewed_model, char_tokenizer, "dog")
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(success=lambda c: c == "dog"),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=24, evaluations_per_round=8, distill_steps=4,
                                       distill_objective="exact", success_replay=0.5, learning_rate=1e-2))
    trainer.train()
    assert [r.completion for r in trainer.ledger.successes] == ["dog"]
    replayed = [v for log in trainer.state.log_history for k, v in log.items() if k == "distill/replayed_successes"]
    assert replayed and all(v > 0 for v in replayed)
    assert string_log_prob(skewed_model, char_tokenizer, "dog") > before + 0.5


def test_a_known_failure_weighs_its_prompts_share_times_its_probability(tmp_path, char_tokenizer, skewed_model):
    dataset = Dataset.from_dict({"prompt": ["", "", "a"]})  # p("") = 2/3, p("a") = 1/3
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), train_dataset=dataset,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=16, evaluations_per_round=8,
                                       distill_objective="exact", rejection_threshold=1e-30, distill_every=0))
    trainer.train()
    share = trainer.sampler.prompt_share()
    assert sorted(share.values()) == pytest.approx([1 / 3, 2 / 3])
    targets, _ = trainer.distiller.exact.targets(32)
    failures = targets.failures
    plain = failure_mass(trainer.failures.policy, failures, PrefixEvidence(), 0.0, 64)
    expected = plain * torch.tensor([share[c] for c in failures.prompt_texts], dtype=plain.dtype)
    assert len({*failures.prompt_texts}) == 2 and torch.allclose(targets.failure_mass, expected, rtol=1e-4)



def test_the_known_failure_term_estimates_the_mass_weighted_sum_without_bias(char_tokenizer, skewed_model):
    batch = candidates(char_tokenizer, ["cat", "dog"])
    failures = candidates(char_tokenizer, ["cat", "dog", "bird", "zebra"])
    mass = failure_mass(skewed_model, failures, PrefixEvidence(), 0.0, 64)
    targets = ExactTargets(batch, torch.zeros(2, dtype=torch.bool), 1.0, failures, mass)
    exact_sum = float((mass * mass.log()).sum())  # sum over the failures of pi(f) log q(f), here with q = pi
    with torch.no_grad():
        terms = [float(exact_loss(skewed_model, item)[1]["distill/known_failure_term"])
                 for item in micro_batches(targets, 300, 2, 0, lambda b: proposal_distribution(skewed_model, b,
                                                                                                 None, 0.0))]
    # each micro-batch draws 2 failures in proportion to pi(f): the mean term over draws is the exact sum
    assert sum(terms) / len(terms) == pytest.approx(exact_sum, rel=0.1)


def test_auto_objective_is_exact_with_whole_targets_at_a_small_vocabulary_and_sparse_ones_at_a_large_one(
        tmp_path, char_tokenizer):
    from conftest import make_tiny_model
    from datasets import Dataset

    from trl_banel import BaNELConfig, BaNELTrainer
    from trl_banel.exact_distillation import choose_objective

    args = BaNELConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                       distill_objective="auto", max_completion_length=128, per_device_train_batch_size=8)
    large = choose_objective(args, 151_936, 20)  # 8 x 148 x 151,936 = 180M values
    assert large[0] == "exact" and "sparse targets" in large[1]
    small = choose_objective(args, 8_000, 20)
    assert small[0] == "exact" and "kept whole" in small[1]
    args.max_completion_length = 16
    trainer = BaNELTrainer(model=make_tiny_model(char_tokenizer), reward_funcs=lambda prompts, completions, **k:
                           [0.0] * len(completions), args=args, train_dataset=Dataset.from_dict({"prompt": [""]}),
                           processing_class=char_tokenizer)
    assert trainer.distill_objective == "exact" and args.distill_objective == "auto"  # args stay as given


def test_a_known_failures_text_by_other_tokens_is_estimated_from_the_proposals_and_pushed_off(
        tmp_path, char_tokenizer, skewed_model, monkeypatch):
    # measured on the rare-letters task: a generator moved its mass onto known failures' texts spelt with <pad> and
    # <bos> inside (which decoding drops); the exact term held only each text's own tokens, so nothing pushed it off
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer,
                           args=config(tmp_path, max_reward_evaluations=16, evaluations_per_round=8,
                                       distill_objective="exact", rejection_threshold=1e-30, distill_every=0))
    trainer.train()
    sampler, record = trainer.sampler, trainer.ledger.records[0]
    own = sampler.record_to_candidate(record)
    ids = own.completion_ids
    other = dataclasses.replace(own, completion_ids=[char_tokenizer.pad_token_id] + ids)  # no prefix shared with own
    fresh = dataclasses.replace(own, completion="zzzz", completion_ids=char_tokenizer("zzzz")["input_ids"] + ids[-1:])
    assert char_tokenizer.decode(other.completion_ids, skip_special_tokens=True) == record.completion
    monkeypatch.setattr(sampler, "propose", lambda n: [own, other, fresh, fresh])
    targets, _ = trainer.distiller.exact.targets(4)
    # both spellings are filtered out; only the one the exact term does not hold is estimated from the proposals
    assert targets.acceptance == 0.5 and targets.rejected.tolist() == [False, True, False, False]
    assert targets.other_tokens_rate == 0.25 and targets.rejected_fresh_rate == 0.0
    policy = trainer.failures.policy

    def log_q(cand):
        batch = sampler.collate([cand])
        with torch.no_grad():
            return float(sequence_log_probs(policy, batch.input_ids, batch.attention_mask, batch.completion_mask, 1))

    start = {k: v.clone() for k, v in policy.state_dict().items()}

    def change(rejected) -> float:  # what five steps on the exact loss do to log q(other), from the same start
        policy.load_state_dict(start)
        before = log_q(other)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
        item = micro_batches(dataclasses.replace(targets, rejected=rejected), 1, 4, 0,
                             lambda b: proposal_distribution(policy, b, None, 0.0))[0]
        for _ in range(5):
            optimizer.zero_grad()
            exact_loss(policy, item)[0].backward()
            optimizer.step()
        return log_q(other) - before

    # held only through the exact term (what the objective did before), the other spelling is pushed off less
    assert change(targets.rejected) < change(torch.zeros(4, dtype=torch.bool)) - 0.5
