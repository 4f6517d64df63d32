"""A round at a real vocabulary (151,936 tokens): scoring, failure fits and the exact objective's targets keep at most
one micro-batch's logits, and a whole round runs on a CPU."""

import resource
import time

import pytest
import torch
from conftest import SKEWED
from datasets import Dataset
from test_exact_distillation import candidates
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from trl_banel import BaNELConfig, BaNELTrainer, exact_distillation, posterior
from trl_banel.evidence import PrefixEvidence, discounted_log_probs
from trl_banel.exact_distillation import (
    ExactTargets,
    _sparse_cross_entropy,
    exact_loss,
    failure_mass,
    micro_batches,
    sparse_proposal_distribution,
)
from trl_banel.failure import _FitLoop
from trl_banel.posterior import completion_log_softmax, sequence_log_probs

QWEN_VOCAB = 151_936


def _record_logits(model) -> list[int]:
    """The number of logits each forward of `model` makes, appended as they happen."""
    sizes = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: sizes.append(out.numel()))
    return sizes


def test_scoring_cuts_chunks_to_the_logits_budget_and_scores_the_same(char_tokenizer, skewed_model, monkeypatch):
    batch = candidates(char_tokenizer, SKEWED * 5)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
    whole = sequence_log_probs(skewed_model, *args, batch_size=512)
    per_row = batch.input_ids.shape[1] * skewed_model.config.vocab_size  # the completion's positions, plus one
    monkeypatch.setattr(posterior, "MAX_LOGITS_VALUES", 3 * per_row)
    sizes = _record_logits(skewed_model)
    chunked = sequence_log_probs(skewed_model, *args, batch_size=512)
    assert max(sizes) <= 3 * per_row and len(sizes) == 7  # 20 sequences, 3 at a time
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_a_failure_fit_step_in_parts_takes_the_step_of_the_whole_batch(char_tokenizer, skewed_model_state,
                                                                       monkeypatch):
    from conftest import make_tiny_model

    negatives = candidates(char_tokenizer, SKEWED * 2)
    after = []
    for budget in (posterior.MAX_LOGITS_VALUES, negatives.input_ids.shape[1] * len(char_tokenizer) * 3):
        monkeypatch.setattr(posterior, "MAX_LOGITS_VALUES", budget)
        model = make_tiny_model(char_tokenizer)
        model.load_state_dict(skewed_model_state)
        sizes = _record_logits(model)
        loop = _FitLoop(model, list(model.parameters()), negatives, 1e-2, 0, 1.0, 0, 1)
        loss, nll = loop.step(torch.arange(8))
        after.append((loss, nll, [p.detach().clone() for p in model.parameters()], max(sizes)))
    (loss, nll, params, _), (loss_parts, nll_parts, params_parts, largest) = after
    assert largest <= negatives.input_ids.shape[1] * len(char_tokenizer) * 3  # 8 negatives in 3 parts
    assert loss_parts == pytest.approx(loss, rel=1e-5) and nll_parts == pytest.approx(nll, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params, params_parts))


def _sparse_item(model, batch, k, evidence=None, pseudo_count=0.0):
    targets = ExactTargets(batch, torch.zeros(len(batch), dtype=torch.bool), 1.0, None, torch.zeros(0))
    return micro_batches(targets, 1, len(batch), 0,
                         lambda b: sparse_proposal_distribution(model, b, evidence, pseudo_count, k))[0]


def test_sparse_targets_leave_the_generator_unchanged_where_nothing_is_rejected(char_tokenizer, skewed_model):
    batch = candidates(char_tokenizer, ["cat", "cat", "dog", "bird", "cat", "dog"])
    item = _sparse_item(skewed_model, batch, k=4)
    assert item["teacher_top_ids"].shape[-1] == 4 and float(item["teacher_rest"].max()) > 0  # a bucket holds mass
    skewed_model.zero_grad()
    exact_loss(skewed_model, item)[0].backward()
    assert sum(float(p.grad.abs().sum()) for p in skewed_model.parameters() if p.grad is not None) == 0.0


def test_the_trainer_loss_takes_sparse_targets_through_the_exact_objective(char_tokenizer, skewed_model):
    """`distillation_loss` (what `compute_loss` calls) on a micro-batch with sparse targets is the exact objective's
    loss: zero gradient where nothing is rejected. It used to fall through to maximum likelihood on the proposals at
    every vocabulary large enough for sparse targets (the self-distillation the exact objective exists to avoid)."""
    from trl_banel.distill import distillation_loss

    batch = candidates(char_tokenizer, ["cat", "cat", "dog", "bird", "cat", "dog"])
    item = _sparse_item(skewed_model, batch, k=4)
    loss, logs = distillation_loss(skewed_model, item)
    assert float(loss) == float(exact_loss(skewed_model, item)[0]) and "distill/cross_entropy" in logs
    skewed_model.zero_grad()
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in skewed_model.parameters() if p.grad is not None) == 0.0
    item["rejected"][0] = 1.0  # a rejected proposal: now the objective moves the generator
    skewed_model.zero_grad()
    distillation_loss(skewed_model, item)[0].backward()
    assert sum(float(p.grad.abs().sum()) for p in skewed_model.parameters() if p.grad is not None) > 0


def test_the_sparse_gradient_is_the_cross_entropy_to_the_kept_tokens_and_one_bucket(char_tokenizer, skewed_model):
    from conftest import make_tiny_model

    batch = candidates(char_tokenizer, ["cat", "dog", "bird", "zebra"])
    teacher = make_tiny_model(char_tokenizer, seed=1)  # pi far from q: a gradient to check
    item = _sparse_item(teacher, batch, k=5)
    log_probs, _, mask = completion_log_softmax(skewed_model, batch.input_ids, batch.attention_mask,
                                                batch.completion_mask)

    def grads(loss):
        skewed_model.zero_grad()
        loss.backward(retain_graph=True)
        return [p.grad.clone() for p in skewed_model.parameters()]

    surrogate = grads(_sparse_cross_entropy(log_probs, mask, item)[1])
    # the same cross-entropy written out: -sum_S pi log q - r log q(R), q(R) summed over the tokens not kept
    ids = item["teacher_top_ids"]
    kept = torch.gather(log_probs, 2, ids)
    outside = log_probs.scatter(2, ids, float("-inf")).logsumexp(-1)
    explicit = -((item["teacher_top_log_probs"].exp() * kept).sum(-1) + item["teacher_rest"] * outside)
    reference = grads((explicit * mask).sum() / len(batch))
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(surrogate, reference))


def test_sparse_evidence_targets_keep_the_tried_tokens_at_their_discounted_mass(char_tokenizer, skewed_model):
    evidence = PrefixEvidence()
    for s in ["cat", "cat", "dog", "zebra"]:
        evidence.add("", char_tokenizer(s, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id])
    batch = candidates(char_tokenizer, ["bird", "cat"])
    item = _sparse_item(skewed_model, batch, k=4, evidence=evidence, pseudo_count=1.0)
    log_probs, targets, mask = completion_log_softmax(skewed_model, batch.input_ids, batch.attention_mask,
                                                      batch.completion_mask)
    dense = discounted_log_probs(log_probs, targets, mask, [""] * 2, evidence, 1.0)
    first = [char_tokenizer.convert_tokens_to_ids(c) for c in "cdz"]  # the first letters failures took
    ids, top = item["teacher_top_ids"][0, 0], item["teacher_top_log_probs"][0, 0]
    assert ids[:3].tolist() == first  # kept whatever their probability: the evidence acts on them
    assert torch.allclose(top.double(), dense[0, 0, ids], atol=1e-5)
    assert float(item["teacher_rest"][0, 0]) == pytest.approx(1 - float(dense[0, 0, ids].exp().sum()), abs=1e-5)


@pytest.mark.parametrize("pseudo_count", [0.0, 1.0])
def test_known_failure_mass_without_next_token_distributions_is_the_same(char_tokenizer, skewed_model, monkeypatch,
                                                                       pseudo_count):
    evidence = PrefixEvidence()
    for s in ["cat", "cat", "dog"]:
        evidence.add("", char_tokenizer(s, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id])
    failures = candidates(char_tokenizer, SKEWED + ["bat", "dot"])
    dense = failure_mass(skewed_model, failures, evidence, pseudo_count, 64)
    monkeypatch.setattr(exact_distillation, "MAX_TEACHER_ELEMENTS", 1)  # as at a large vocabulary
    monkeypatch.setattr(posterior, "MAX_LOGITS_VALUES", 1)
    sizes = _record_logits(skewed_model)
    bounded = failure_mass(skewed_model, failures, evidence, pseudo_count, 64)
    assert max(sizes) == failures.input_ids.shape[1] * len(char_tokenizer)  # one sequence at a time
    assert torch.allclose(bounded, dense, rtol=1e-4)


def qwen_vocab_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen2.5's vocabulary size: token `i` is the word `w<i>`."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, QWEN_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def peaked_qwen2(tok, seed=0) -> Qwen2ForCausalLM:
    """A random Qwen2 with a 151,936-token vocabulary (hidden size 64, one layer) whose next-token distributions are
    peaked (its head scaled up), so that its proposals repeat and the known failures carry probability mass, as a
    pretrained model's do: the exact objective then has something to move."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    return model


@pytest.mark.slow  # about 80 s on a shared 2-core CPU
def test_a_full_round_runs_at_a_qwen_sized_vocabulary_within_one_micro_batchs_logits(tmp_path, monkeypatch):
    tok = qwen_vocab_tokenizer()
    model = peaked_qwen2(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    positions = 16 + 2  # a completion's positions and the prompt's last (the bos token)
    micro_batch = 2 * positions * QWEN_VOCAB  # per_device_train_batch_size=2
    # a budget of one micro-batch's logits: scoring 16 candidates (or the old default, 512) at once would exceed it
    monkeypatch.setattr(posterior, "MAX_LOGITS_VALUES", micro_batch)
    sizes = _record_logits(model)
    args = BaNELConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
        max_reward_evaluations=8, evaluations_per_round=4, num_candidates=16, max_completion_length=16,
        distill_samples=16, per_device_train_batch_size=2, seed=0,
    )
    trainer = BaNELTrainer(model=model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
                           args=args, train_dataset=Dataset.from_dict({"prompt": [""]}), processing_class=tok)
    assert trainer.distill_objective == "exact"  # 'auto', with sparse targets at this vocabulary
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    trainer.train()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 2**20  # GiB (ru_maxrss is in KiB)
    assert len(trainer.ledger.records) == 8 and len(trainer.history) >= 2 and trainer.state.global_step > 0
    changed = [k for k, v in trainer.model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "the distillation did not move the generator"
    # the exact objective ran (it alone logs the cross-entropy to its targets), not maximum likelihood on proposals
    assert any("distill/cross_entropy" in entry for entry in trainer.state.log_history)
    assert max(sizes) <= micro_batch  # no forward made more logits than one micro-batch's
    assert grown < 3.0, f"peak memory grew by {grown:.2f} GiB"
    print(f"full round at {QWEN_VOCAB:,} tokens: {time.time() - start:.0f} s, peak RSS grew {grown:.2f} GiB")


def test_known_failures_of_long_completions_are_drawn_though_their_mass_underflows_float32(char_tokenizer):
    failures = candidates(char_tokenizer, SKEWED)
    mass = torch.tensor([1e-63, 3e-63, 0.0, 1e-80], dtype=torch.float64)  # 128 tokens at 1e-3 each: far below these
    targets = ExactTargets(failures, torch.zeros(4, dtype=torch.bool), 1.0, failures, mass)
    items = micro_batches(targets, 200, 4, 0, lambda b: torch.zeros(len(b), 1, 1))
    drawn = torch.cat([item["failures"]["input_ids"][:, 1] for item in items])
    first = [char_tokenizer.convert_tokens_to_ids(s[0]) for s in SKEWED]
    share = (drawn == first[1]).float().mean()  # "dog" holds 3/4 of the mass
    assert 0.65 < share < 0.85 and not (drawn == first[2]).any() and not (drawn == first[3]).any()


# ---------------------------------------------------------------------------------------------------------------
# Training losses at a large vocabulary: the logits a chunk of positions at a time
def _grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _chunk_everything(monkeypatch, values: int):
    """Losses on any micro-batch take the chunked path, `values` logits per chunk."""
    monkeypatch.setattr(posterior, "MAX_LOGITS_VALUES", 0)
    monkeypatch.setattr(posterior, "CHUNK_VALUES", values)


def test_chunked_maximum_likelihood_has_the_loss_and_gradient_of_whole_logits(char_tokenizer, skewed_model,
                                                                              monkeypatch):
    from trl_banel.distill import distillation_loss

    batch = candidates(char_tokenizer, ["cat", "zebra", "dog", "bird"])
    item = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "completion_mask": batch.completion_mask, "weight": torch.tensor([1.0, 0.5, 2.0, 0.0])}
    whole = distillation_loss(skewed_model, item)[0]
    whole_grads = _grads(skewed_model, whole)
    vocab = skewed_model.config.vocab_size
    _chunk_everything(monkeypatch, 4 * 2 * vocab)  # 2 positions of the 4 sequences per chunk
    sizes = _record_logits(skewed_model)
    part = distillation_loss(skewed_model, item)[0]
    part_grads = _grads(skewed_model, part)
    assert part.item() == pytest.approx(whole.item(), rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole_grads, part_grads))
    # the model's own forward made the logits of one position; each chunk two positions' (again in the backward)
    assert max(sizes) <= 4 * 2 * vocab and sizes[0] == 4 * vocab
    assert len(sizes) == 1 + 2 * 3  # 6 positions (5 letters and EOS) in 3 chunks, each made twice


def test_chunked_exact_objective_matches_whole_logits_and_stays_exactly_still_where_nothing_is_rejected(
        char_tokenizer, skewed_model, monkeypatch):
    """Whole targets with rejected proposals and drawn known failures: the same loss and gradient chunked as whole.
    Sparse targets made chunk by chunk (as the loss makes q): a gradient of exactly 0 with nothing rejected, and the
    same targets as whole logits give, prefix evidence included."""
    from trl_banel.distill import distillation_loss

    batch = candidates(char_tokenizer, ["cat", "cat", "dog", "bird", "zebra", "dog"])
    known = candidates(char_tokenizer, ["cat", "dog"])
    targets = ExactTargets(batch, torch.tensor([False, False, True, False, True, False]), 0.7, known,
                           torch.tensor([0.6, 0.2], dtype=torch.float64))
    item = micro_batches(targets, 1, len(batch), 0,
                         lambda b: exact_distillation.proposal_distribution(skewed_model, b, None, 0.0))[0]
    whole, whole_logs = distillation_loss(skewed_model, item)
    whole_grads = _grads(skewed_model, whole)
    evidence = PrefixEvidence()
    evidence.add("", known.input_ids[0, known.prompt_width:known.prompt_width + 2].tolist())
    whole_sparse = _sparse_item(skewed_model, batch, k=4, evidence=evidence, pseudo_count=1.0)
    _chunk_everything(monkeypatch, len(batch) * 2 * skewed_model.config.vocab_size)
    part, part_logs = distillation_loss(skewed_model, item)
    assert part.item() == pytest.approx(whole.item(), rel=1e-5)
    assert part_logs["distill/cross_entropy"].item() == pytest.approx(whole_logs["distill/cross_entropy"].item(),
                                                                      rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole_grads, _grads(skewed_model, part)))
    sparse = _sparse_item(skewed_model, batch, k=4)
    assert sum(float(g.abs().sum()) for g in _grads(skewed_model, distillation_loss(skewed_model, sparse)[0])) == 0
    chunked_sparse = _sparse_item(skewed_model, batch, k=4, evidence=evidence, pseudo_count=1.0)
    assert torch.equal(chunked_sparse["teacher_top_ids"], whole_sparse["teacher_top_ids"])
    assert torch.allclose(chunked_sparse["teacher_top_log_probs"], whole_sparse["teacher_top_log_probs"], atol=1e-6)
    assert not torch.allclose(chunked_sparse["teacher_top_log_probs"], sparse["teacher_top_log_probs"])  # evidence


@pytest.mark.slow  # 13 subprocesses, about a minute on a shared 2-core machine
def test_the_memory_benchmark_measures_every_part_and_a_whole_run_within_its_budget(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/vocab_memory.py", "--quick", "--full_run_budget", "6",
                           "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "quick" / "vocab_memory.json").read_text())["results"]
    parts = {(r["part"], r["vocab"]) for r in results}
    assert parts == {(p, v) for p in ("propose", "filter", "failure_fit", "exact_targets", "exact_steps",
                                      "posterior_steps") for v in (8192, 32768)} | {("full_run", 32768)}
    (full,) = [r for r in results if r["part"] == "full_run"]
    assert full["nre"] == 6 and full["peak_rss_mib"] > 0
    table = (tmp_path / "quick" / "vocab_memory.md").read_text()
    assert "A whole run at the package defaults at 32,768 tokens" in table


def test_the_vocabulary_is_read_through_a_ddp_wrapper_or_a_deepspeed_engine(char_tokenizer, skewed_model):
    """Wrapped, the model has no `config`: read through it, or a 152k-token micro-batch is scored whole (the chunked
    and row-capped paths never engage under DDP)."""
    import types

    from trl_banel.posterior import vocab_size

    wrapped = types.SimpleNamespace(module=skewed_model)  # what DDP and DeepSpeed engines expose
    assert vocab_size(wrapped) == vocab_size(skewed_model) == skewed_model.config.vocab_size
