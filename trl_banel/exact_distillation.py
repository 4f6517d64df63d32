r"""The exact distillation objective: the posterior's log-likelihood with every part that can be computed exactly
taken exactly, so that distilling moves the generator only where the rejection region says, with no sampling drift.

The posterior of a round is `pi(y|c) * 1[y outside the region] / Z`, where `pi` is the proposal distribution (the
generator, or its evidence-discounted form with `evidence_pseudo_count > 0`) and `Z` its acceptance rate. Distilling
it maximises `E_post[log q(y|c)]`, which splits into three parts:

    Z * E_post[log q] = E_pi[log q]  -  sum over known failures f of pi(f) log q(f)  -  E_pi[1[ratio-rejected] log q]

(each term also averaged over the prompts as the proposals draw them: a known failure of prompt `c` weighs
`p(c) pi(f|c)`, `p(c)` the share of the dataset's rows with that prompt).

- `E_pi[log q]` is estimated on proposals `y ~ pi` with each position's sampled token replaced by its expectation
  under `pi` (a per-token cross-entropy to `pi`'s next-token distribution on the sampled prefix). Same expectation as
  maximum likelihood on the samples, far less variance, and with no evidence its gradient is exactly 0 at the start:
  the generator is not pulled towards the few hundred strings it happened to sample, which is what drives repeated
  self-distillation onto a shrinking set (DESIGN.md section 6: the drift and collapse).
- The known failures' term is exact: their `pi(f)` is computed, and a fixed number of them, drawn in proportion to it,
  enter each step (an unbiased estimate of the sum that does not grow with the ledger).
- Only the ratio test's region, which has no closed form, is estimated from the proposals it rejected; so is the
  mass of token sequences that decode to a known failure's text but are not its tokenisation (special tokens the
  decoding drops, another subword split): the ledger and the filter know completions by text, the exact term by
  tokens. Measured why: on rare letters at the defaults, 6 of 10 seeds moved their mass onto known failures spelt
  with `<pad>` and `<bos>` inside, which the exact term never saw, until nearly every proposal was one (round revision
  3 of `benchmarks/defaults.py`; fixed in revision 4; docs/default_round.md).

The per-token expectations need `pi`'s next-token distributions as targets. Where a micro-batch's fit in
`MAX_TEACHER_ELEMENTS` values they are kept whole; at a large vocabulary (151,936 tokens: about 420 positions) each
position keeps its `TEACHER_TOP_K` most probable tokens under `pi` (the tried children of the prefix evidence among
them) and the rest of its mass as one bucket, and the cross-entropy is taken to that coarser distribution: inside the
bucket the target follows `q`'s own proportions. Its gradient is still exactly 0 where `pi` is the generator, and the
memory is one micro-batch's logits (which the loss's forward makes anyway) plus `TEACHER_TOP_K` values a position.
Not yet measured on a task at a large vocabulary: what the bucket hides from the targets is the shape of `pi` in its
tail (there the generator is left as it is, scaled).

The objective serves the search, while the ledger holds no success; from the first success on, the trainer distils
with the posterior objective (maximum likelihood on accepted samples, with `success_replay`). Measured why: replaying
successes through this loss concentrates the generator until it proposes little but known failures, where the
known failures' term `pi(f) log q(f)` saturates (its gradient vanishes as `q(f)` nears 1) and nothing sampled outside
the region pulls the generator back; maximum likelihood on the accepted samples does.

Measured (with `benchmarks/round_variants.py`, removed since; commit c242a55 holds it and its results): on the hard
attack, without the ratio test, it keeps every seed above the pretrained rate where maximum likelihood on posterior
samples ended all of them far below it; with prefix evidence on rare letters it collapsed 5 of 8 seeds onto known
failures before any success (measured with the known failures' term at 1/64 of its weight, since fixed), so that
task does not use it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .distributed import sum_over_ranks
from .evidence import discount_tried_top_k, discounted_log_probs, discounted_token_log_probs, discounted_top_k
from .posterior import (
    MAX_LOGITS_VALUES,
    Candidates,
    CompletionChunks,
    _completion_logits,
    chunked,
    completion_log_softmax,
    completion_positions,
    completion_token_log_probs,
    eval_mode,
    scoring_rows,
    sequence_log_probs,
)

# Larger soft targets of one micro-batch than this are kept sparse (the same bound as a scoring forward's logits).
MAX_TEACHER_ELEMENTS = MAX_LOGITS_VALUES
# Sparse targets: tokens kept per position (the rest of the mass is one bucket). 256 values and their ids a position:
# 8 sequences of 128 tokens hold 3 MB, against 620 MB of whole distributions at 151,936 tokens.
TEACHER_TOP_K = 256


def choose_objective(args, vocab_size: int, prompt_tokens: int) -> tuple[str, str]:
    """`distill_objective="auto"`: the exact objective, with whole next-token distributions as targets when one
    micro-batch's fit (`per_device_train_batch_size x (prompt_tokens + max_completion_length) x vocab_size <=
    MAX_TEACHER_ELEMENTS`), else sparse ones (`TEACHER_TOP_K` tokens a position and the rest of the mass): either way
    a micro-batch's memory is its logits, as with maximum likelihood on posterior samples. Returns `(objective, why)`.
    """
    size = args.per_device_train_batch_size * (prompt_tokens + args.max_completion_length) * vocab_size
    if size <= MAX_TEACHER_ELEMENTS:
        return "exact", (f"distill_objective='auto' chose 'exact': a micro-batch's next-token distributions are "
                         f"{size:,} values (at most {MAX_TEACHER_ELEMENTS:,}), kept whole as its targets")
    return "exact", (f"distill_objective='auto' chose 'exact' with sparse targets: a micro-batch's next-token "
                     f"distributions would be {size:,} values (per_device_train_batch_size "
                     f"{args.per_device_train_batch_size} x {prompt_tokens + args.max_completion_length} positions x "
                     f"vocabulary {vocab_size:,}; more than {MAX_TEACHER_ELEMENTS:,}), so each position keeps its "
                     f"{TEACHER_TOP_K} most probable tokens and the rest of its mass as one bucket")


@dataclass
class ExactTargets:
    r"""One distillation's targets, on the CPU.

    Attributes:
        proposals (`Candidates`): completions drawn from the proposal distribution `pi`, accepted or not.
        rejected (`torch.Tensor` of shape `(N,)`): filtered out and not held by the known failures' exact term (the
            ratio test's rejections, and known failures' texts by other token ids).
        acceptance (`float`): `Z`, the share of the proposals that passed the filter.
        failures (`Candidates` or `None`): the ledger's known failures.
        failure_mass (`torch.Tensor` of shape `(F,)`): `p(c) pi(f|c)` of each known failure `f` of prompt `c`.
        rejected_fresh_rate (`float`): the share of the proposals that are no known failure which the filter rejected
            (over all processes): what the phase's failure region did.
        other_tokens_rate (`float`): the share of the proposals that are a known failure's text by token ids other
            than the text's own tokenisation (over all processes): mass the exact term does not hold, estimated
            from these proposals instead.
    """

    proposals: Candidates
    rejected: torch.Tensor
    acceptance: float
    failures: Candidates | None
    failure_mass: torch.Tensor
    rejected_fresh_rate: float = 0.0
    other_tokens_rate: float = 0.0


def proposal_distribution(model, batch: Candidates, evidence, pseudo_count: float) -> torch.Tensor:
    """`log pi` at every completion position of `batch` (the generator's, discounted by the prefix evidence), in one
    forward pass."""
    size = len(batch) * batch.input_ids.shape[1] * model.config.vocab_size
    if size > MAX_TEACHER_ELEMENTS:
        raise ValueError(
            f"distill_objective='exact' keeps next-token distributions ({len(batch)} sequences x "
            f"{batch.input_ids.shape[1]} positions x vocabulary {model.config.vocab_size} = {size:,} values): too "
            f"large for this vocabulary; use distill_objective='posterior', or a smaller per_device_train_batch_size "
            f"and scoring_batch_size.")
    device = next(model.parameters()).device
    with torch.no_grad():
        log_probs, targets, mask = completion_log_softmax(
            model, batch.input_ids.to(device), batch.attention_mask.to(device), batch.completion_mask.to(device))
        if pseudo_count > 0:
            log_probs = discounted_log_probs(log_probs, targets, mask, batch.prompt_texts, evidence, pseudo_count)
    return log_probs.float().cpu()


def sparse_proposal_distribution(model, batch: Candidates, evidence, pseudo_count: float,
                                 k: int = TEACHER_TOP_K) -> dict:
    r"""The sparse targets of `batch`, in one forward pass (the rows and shapes the loss will see, as with whole
    targets): at every completion position the `k` most probable tokens under `pi` (`teacher_top_ids`), their
    `log pi` (`teacher_top_log_probs`), and the mass of all other tokens, `1 - sum of their pi`
    (`teacher_rest`), computed on the model's device exactly as the loss computes `q`'s (so that it is exactly
    `q`'s where `pi` is the generator)."""
    device = next(model.parameters()).device
    tensors = (batch.input_ids.to(device), batch.attention_mask.to(device), batch.completion_mask.to(device))
    with torch.no_grad():
        if chunked(model, tensors[0], tensors[2]):  # the loss makes q chunk by chunk: the targets are made alike
            top, ids = chunked_top_k(CompletionChunks(model, *tensors), batch.prompt_texts, evidence, pseudo_count, k)
        else:
            log_probs, targets, mask = completion_log_softmax(model, *tensors)
            k = min(k, log_probs.shape[-1])
            top, ids = discounted_top_k(log_probs, targets, mask, batch.prompt_texts, evidence, pseudo_count, k)
            del log_probs
        rest = 1 - top.exp().sum(-1)
    return {"teacher_top_log_probs": top.float().cpu(), "teacher_top_ids": ids.cpu(), "teacher_rest": rest.cpu()}


def chunked_top_k(chunks: CompletionChunks, prompt_texts: list[str], evidence, pseudo_count: float, k: int):
    """[`discounted_top_k`] on a micro-batch whose logits are made a chunk of positions at a time."""
    parts = [chunks.log_softmax(sl).topk(min(k, chunks.head.weight.shape[0]), dim=-1) for sl in chunks.slices]
    top, ids = torch.cat([p.values for p in parts], 1), torch.cat([p.indices for p in parts], 1)
    step, held = chunks.slices[0].stop, {}  # the last chunk made: a row's positions come in order

    def row(i, t):
        j = t // step
        if j not in held:
            held.clear()
            held[j] = chunks.log_softmax(chunks.slices[j])
        return held[j][i, t - j * step]

    discount_tried_top_k(top, ids, row, chunks.targets, chunks.mask, prompt_texts, evidence, pseudo_count)
    return top, ids


def teacher_targets(model, batch: Candidates, evidence, pseudo_count: float) -> dict:
    """`batch`'s targets: `pi`'s whole next-token distributions (`teacher_log_probs`) where they fit in
    `MAX_TEACHER_ELEMENTS` values, else sparse ones ([`sparse_proposal_distribution`])."""
    if len(batch) * batch.input_ids.shape[1] * model.config.vocab_size <= MAX_TEACHER_ELEMENTS:
        return {"teacher_log_probs": proposal_distribution(model, batch, evidence, pseudo_count)}
    return sparse_proposal_distribution(model, batch, evidence, pseudo_count)


def sequence_mass(teacher: torch.Tensor, batch: Candidates) -> torch.Tensor:
    """`pi(y)` of each completion of `batch`, from its `log pi` at every position."""
    mask = batch.completion_mask[:, batch.prompt_width:]
    targets = batch.input_ids[:, batch.prompt_width:]
    width = teacher.shape[1]
    token = torch.gather(teacher, 2, targets[:, :width].unsqueeze(-1)).squeeze(-1)
    return torch.exp((token * mask[:, :width]).sum(1).double())


def failure_mass(model, batch: Candidates, evidence, pseudo_count: float, batch_size: int) -> torch.Tensor:
    """`pi(f)` of each completion of `batch`, `batch_size` at a time (at a large vocabulary, from the completion
    tokens' log-probabilities alone, fewer at a time: see [`bounded_failure_mass`])."""
    if batch_size * batch.input_ids.shape[1] * model.config.vocab_size > MAX_TEACHER_ELEMENTS:
        return bounded_failure_mass(model, batch, evidence, pseudo_count, batch_size)
    parts = []
    for start in range(0, len(batch), batch_size):
        chunk = batch.select(range(start, min(start + batch_size, len(batch))))
        parts.append(sequence_mass(proposal_distribution(model, chunk, evidence, pseudo_count), chunk))
    return torch.cat(parts)


@torch.no_grad()
def bounded_failure_mass(model, batch: Candidates, evidence, pseudo_count: float, batch_size: int) -> torch.Tensor:
    """`pi(f)` of each completion of `batch` from the log-probabilities of its tokens (discounted by the prefix
    evidence with `pseudo_count > 0`), in chunks whose logits stay within `MAX_LOGITS_VALUES`: no next-token
    distribution is kept."""
    device = next(model.parameters()).device
    ids, att, comp = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.completion_mask))
    if not pseudo_count > 0:
        return torch.exp(sequence_log_probs(model, ids, att, comp, batch_size).double().cpu())
    rows = scoring_rows(batch_size, completion_positions(comp), model.config.vocab_size)
    parts = []
    for start in range(0, len(batch), rows):
        sl = slice(start, start + rows)
        logits, targets, mask = _completion_logits(model, ids[sl], att[sl], comp[sl])
        token = discounted_token_log_probs(logits, targets, mask, batch.prompt_texts[sl], evidence, pseudo_count)
        parts.append(torch.exp(token.sum(1)))
    return torch.cat(parts)


def micro_batches(targets: ExactTargets, n_micro: int, batch_size: int, seed: int,
                  teacher: Callable[[Candidates], torch.Tensor]) -> list[dict]:
    """The distillation's micro-batches: proposals cycled `batch_size` at a time with `teacher(batch)`, their `log pi`
    at every position (a tensor, or a dict of tensors such as [`teacher_targets`] returns), each with `batch_size`
    known failures drawn in proportion to `pi(f)` (weight: the failures' total mass, which times the draw's mean
    log-likelihood estimates `sum_f pi(f) log q(f)` without bias).

    The teacher is computed on exactly the rows, order and shapes the loss will see, so that where `pi` is the
    generator itself the first step's gradient is exactly 0 (not float noise, which Adam would scale to full steps)."""
    g = torch.Generator().manual_seed(seed)
    n = len(targets.proposals)
    total_mass = float(targets.failure_mass.sum()) if targets.failures is not None else 0.0
    out = []
    for s in range(n_micro):
        rows = [(s * batch_size + j) % n for j in range(min(batch_size, n))]
        proposals = targets.proposals.select(rows)
        teach = teacher(proposals)
        item = {**_tensors(proposals), **(teach if isinstance(teach, dict) else {"teacher_log_probs": teach}),
                "rejected": targets.rejected[torch.tensor(rows)].float(),
                "acceptance": torch.tensor(targets.acceptance)}
        if total_mass > 0:
            # scaled by a power of two so that float32 holds them: long completions' masses (1e-60 and below)
            # underflow it; draws from masses that fit are unchanged by the exact scaling
            scaled = torch.ldexp(targets.failure_mass, -torch.frexp(targets.failure_mass.max())[1])
            picks = torch.multinomial(scaled.float(), batch_size, replacement=True, generator=g)
            item["failures"] = _tensors(targets.failures.select(picks.tolist()))
            item["failure_weight"] = torch.tensor(total_mass)  # times the draw's mean: unbiased for the sum
        out.append(item)
    return out


def _tensors(batch: Candidates) -> dict:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "completion_mask": batch.completion_mask}


def exact_loss(model, inputs: dict, forward: tuple | None = None) -> tuple[torch.Tensor, dict]:
    r"""The negative posterior log-likelihood of one micro-batch (see the module's docstring), per completion token
    of the proposals, and its parts (for the logs):
    `1 / Z * [CE(pi, q) + mean over the rejected proposals of log q + mass(F) * mean over the drawn known failures of
    log q]`.

    `forward`: the proposals' `completion_log_softmax` under `model`, if the caller has it already (a KL term needs
    it too); computed here otherwise.
    """
    if forward is None and chunked(model, inputs["input_ids"], inputs["completion_mask"]):
        return _chunked_exact_loss(model, inputs)
    log_probs, targets, mask = forward or completion_log_softmax(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
    n = log_probs.shape[0]
    sparse = "teacher_top_ids" in inputs
    cross_entropy, surrogate = (_sparse_cross_entropy if sparse else _cross_entropy)(log_probs, mask, inputs)
    token_lp = (torch.gather(log_probs, 2, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    rejected = (token_lp * inputs["rejected"]).sum() / n
    failures = torch.zeros((), device=log_probs.device)
    if "failures" in inputs:
        f = inputs["failures"]
        if sparse:  # a large vocabulary: no second vocabulary-sized tensor for the failures' forward
            f_token, f_mask = completion_token_log_probs(model, f["input_ids"], f["attention_mask"],
                                                         f["completion_mask"])
        else:
            # the full log-softmax, not completion_token_log_probs: the same float path as the committed runs
            f_lp, f_targets, f_mask = completion_log_softmax(model, f["input_ids"], f["attention_mask"],
                                                             f["completion_mask"])
            f_token = torch.gather(f_lp, 2, f_targets.unsqueeze(-1)).squeeze(-1)
        failures = inputs["failure_weight"] * (f_token * f_mask).sum(1).mean()
    return _exact_total(surrogate + rejected, failures, cross_entropy, mask, inputs)


def _exact_total(proposals_term, failures, cross_entropy, mask, inputs) -> tuple[torch.Tensor, dict]:
    """The loss from its parts: the proposals' terms (the cross-entropy's surrogate and the rejected proposals') and
    the known failures', over the acceptance rate, per completion token."""
    loss = (proposals_term + failures) / inputs["acceptance"].clamp(min=1e-3)
    per_token = mask.sum().clamp(min=1) / mask.shape[0]  # so that the loss is on the posterior objective's scale
    parts = {"distill/cross_entropy": cross_entropy / per_token, "distill/known_failure_term": failures.detach()}
    return loss / per_token, parts


def _chunked_exact_loss(model, inputs: dict) -> tuple[torch.Tensor, dict]:
    """[`exact_loss`] with the logits made a chunk of positions at a time (a large vocabulary; see
    [`CompletionChunks`]): the same terms, summed over the chunks."""
    chunks = CompletionChunks(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
    n = chunks.targets.shape[0]
    sparse = "teacher_top_ids" in inputs
    keys = ("teacher_top_ids", "teacher_top_log_probs", "teacher_rest") if sparse else ("teacher_log_probs",)

    def term(log_probs, sl):
        mask = chunks.mask[:, sl]
        cross_entropy, surrogate = (_sparse_cross_entropy if sparse else _cross_entropy)(
            log_probs, mask, {k: inputs[k][:, sl] for k in keys})
        token_lp = (torch.gather(log_probs, 2, chunks.targets[:, sl].unsqueeze(-1)).squeeze(-1) * mask).sum(1)
        return torch.stack([surrogate + (token_lp * inputs["rejected"]).sum() / n, cross_entropy.detach()])

    proposals_term, cross_entropy = chunks.total(term)
    failures = torch.zeros((), device=chunks.hidden.device)
    if "failures" in inputs:
        f = inputs["failures"]
        fc = CompletionChunks(model, f["input_ids"], f["attention_mask"], f["completion_mask"])
        drawn = fc.targets.shape[0]
        failures = inputs["failure_weight"] * fc.total(
            lambda lp, sl: (torch.gather(lp, 2, fc.targets[:, sl].unsqueeze(-1)).squeeze(-1) * fc.mask[:, sl]).sum()
            / drawn)
    return _exact_total(proposals_term, failures, cross_entropy, chunks.mask, inputs)


def _cross_entropy(log_probs, mask, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`CE(pi, q)` summed over the positions per sequence (for the logs) and a surrogate with its gradient, from whole
    targets."""
    n = log_probs.shape[0]
    teacher = inputs["teacher_log_probs"][:, : log_probs.shape[1]].to(log_probs.dtype).exp()
    with torch.no_grad():
        cross_entropy = -((teacher * log_probs).sum(-1) * mask).sum() / n  # for the logs
    # the cross-entropy's gradient, q - pi per position, taken as a difference: exactly 0 where pi is the generator
    # itself (the same forward pass), instead of the float noise of -sum(pi log q), which Adam would scale up
    surrogate = (((log_probs.exp() - teacher).detach() * log_probs).sum(-1) * mask).sum() / n
    return cross_entropy, surrogate


def _sparse_cross_entropy(log_probs, mask, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    r"""As `_cross_entropy`, from sparse targets: the cross-entropy to `pi` on its kept tokens `S` and one bucket `R`
    holding the rest of its mass `r`, `-sum_S pi log q - r log q(R)`. Its gradient in the logits is `q - pi` on `S`
    and `q (1 - r / q(R))` on `R`, taken as differences as with whole targets: with `a = q - pi` on `S` and
    `b = q(R) - r` (both detached), `sum_S a log q + b log q(R)` has exactly that gradient (since `sum a + b = 0`),
    and it is exactly 0 where `pi` is the generator (`q(R)` is computed as the targets' `r` was)."""
    n, width = log_probs.shape[0], log_probs.shape[1]
    ids = inputs["teacher_top_ids"][:, :width].to(log_probs.device)
    pi = inputs["teacher_top_log_probs"][:, :width].to(log_probs.dtype).exp()
    rest_pi = inputs["teacher_rest"][:, :width].to(log_probs.dtype)
    kept = torch.gather(log_probs, 2, ids)
    rest_q = 1 - kept.exp().sum(-1)
    # q(R) by difference loses precision when the kept tokens hold nearly all the mass; there the bucket's weight b is
    # as small, and a clamped q(R) passes no gradient
    log_rest_q = rest_q.clamp(min=1e-30).log()
    with torch.no_grad():
        cross_entropy = -(((pi * kept).sum(-1) + rest_pi * log_rest_q) * mask).sum() / n  # for the logs
    a, b = (kept.exp() - pi).detach(), (rest_q - rest_pi).detach()
    surrogate = (((a * kept).sum(-1) + b * log_rest_q) * mask).sum() / n
    return cross_entropy, surrogate


class ExactDistillation:
    r"""
    The exact objective's distillation of a phase: its proposals (drawn while the phase's failure models are active:
    their region is part of the posterior) with their filter outcome, and the ledger's known failures with their
    `pi(f)`, as micro-batches.

    Args:
        sampler ([`~trl_banel.sampler.Sampler`]), failures ([`~trl_banel.failure.FailureModels`]): the round's.
        ledger ([`~trl_banel.ledger.RewardLedger`]): what was evaluated (its failures are the known failures).
        args ([`BaNELConfig`]), accelerator: the run's configuration and `Accelerator`.
    """

    def __init__(self, sampler, failures, ledger, args, accelerator):
        self.sampler, self.failures, self.ledger = sampler, failures, ledger
        self.args, self.accelerator = args, accelerator
        self._known = []  # the ledger's failures as candidates, tokenised once each (the ledger only grows)
        self._synced = 0  # how many of ledger.records they cover
        self._canonical = {}  # (prompt, completion text) -> the token ids the exact term holds it as

    def targets(self, n_total: int) -> tuple[ExactTargets, list]:
        """This phase's targets on `n_total` fresh proposals (summed over processes: what the steps consume), and
        what the distillation's probe measures (accepted proposals, else one proposal)."""
        args, sampler, ledger = self.args, self.sampler, self.ledger
        cands = sampler.propose(max(1, -(-n_total // self.accelerator.num_processes)))
        accepted = sampler.filter(cands).accepted
        kept = {id(c) for c in accepted}
        self._sync_known()
        records = [ledger.lookup(c.prompt_text, c.completion) for c in cands]
        known = [args.reject_known_failures and r is not None and not r.success for r in records]
        # the exact term holds each known failure as its text tokenised; another token sequence of the same text
        # (special tokens the decoding drops, a non-canonical split) is filtered out as that failure but is in no
        # exact term: its mass is estimated from the proposals, as the region's is (else a generator moving its
        # mass there is never pushed off it: measured, the rare-letters collapse of docs/default_round.md).
        # So is a call lost in a crash: filtered out, yet no ledger failure
        exact = [k and self._canonical.get((c.prompt_text, c.completion)) == tuple(c.completion_ids)
                 for c, k in zip(cands, known)]
        rejected = torch.tensor([id(c) not in kept and not e for c, e in zip(cands, exact)], dtype=torch.bool)
        n_accepted = sum_over_ranks(self.accelerator, len(accepted))
        n_proposed = max(sum_over_ranks(self.accelerator, len(cands)), 1)
        n_region = sum_over_ranks(self.accelerator, sum(id(c) not in kept and not k for c, k in zip(cands, known)))
        n_other = sum_over_ranks(self.accelerator, sum(k and not e for k, e in zip(known, exact)))
        failures, mass = None, torch.zeros(0)
        if self._known:
            failures = sampler.collate(self._known)
            with self._teacher() as policy:
                mass = failure_mass(policy, failures, sampler.evidence, args.evidence_pseudo_count,
                                    args.scoring_batch_size)
            share = sampler.prompt_share()
            mass = mass * torch.tensor([share.get(c.prompt_text, 0.0) for c in self._known], dtype=mass.dtype)
        targets = ExactTargets(sampler.collate(cands), rejected, n_accepted / n_proposed, failures, mass,
                               n_region / max(n_region + n_accepted, 1), n_other / n_proposed)
        return targets, accepted[:64] or cands[:1]

    def _sync_known(self):
        """Tokenise the ledger's failures not yet held (the ledger only grows), with their tokens by text."""
        if not self.args.reject_known_failures:
            return
        fresh = [r for r in self.ledger.records[self._synced:] if not r.success]
        self._synced = len(self.ledger.records)
        for record in fresh:
            cand = self.sampler.record_to_candidate(record)
            self._known.append(cand)
            self._canonical[(cand.prompt_text, cand.completion)] = tuple(cand.completion_ids)

    @contextlib.contextmanager
    def _teacher(self):
        """The generator as it is now, in eval mode (failure adapters are disabled outside their fit)."""
        with eval_mode(self.failures.policy) as policy:
            yield policy

    def batches(self, targets: ExactTargets, round: int, n_micro: int) -> list[dict]:
        """The micro-batches of `targets`, on the device (their teachers computed before the first step)."""
        seed = self.args.seed + 1000 * round + self.accelerator.process_index
        k, evidence = self.args.evidence_pseudo_count, self.sampler.evidence
        with self._teacher() as policy:
            batches = micro_batches(targets, n_micro, self.args.per_device_train_batch_size, seed,
                                    lambda b: teacher_targets(policy, b, evidence, k))
        return [to_device(b, self.accelerator.device) for b in batches]


def to_device(item, device):
    """A micro-batch (nested dicts of tensors, other values as they are) on `device`."""
    if isinstance(item, dict):
        return {k: to_device(v, device) for k, v in item.items()}
    return item.to(device) if isinstance(item, torch.Tensor) else item
