"""The sampler of a round: propose with the generator, filter by posterior rejection, collate, draw posterior samples.

The generator proposes completions for dataset prompts (its logits lowered, with `evidence_pseudo_count > 0`, on
completion prefixes that failures already went through); the filter drops the candidates any failure model explains
and the known failures. What survives is a sample of BaNEL's posterior: evaluated in a round, or distilled into the
generator (with a share of the successes found so far replayed among them).
"""

import dataclasses
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from trl.data_utils import is_conversational, maybe_apply_chat_template

from .distributed import sum_over_ranks
from .evidence import PrefixEvidence
from .posterior import Candidates, eval_mode, rejection_mask, support_gaps

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Candidate:
    """One proposed `(prompt, completion)`, before it is collated into a batch ([`~trl_banel.posterior.Candidates`]).
    """

    prompt: object  # as in the dataset (text or conversation): what the reward functions get
    prompt_text: str  # the prompt as one string, chat template applied (the ledger key)
    completion: str
    completion_ids: list[int]  # EOS included when the generator stopped
    row: int  # dataset row of the prompt
    prompt_ids: list[int] = field(default_factory=list)
    weight: float = 1.0  # the baselined distillation's weight of this sample

    def to_dict(self) -> dict:
        """A plain dict, as checkpoints keep candidates."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Candidate":
        return cls(**values)


@dataclass
class FilterStats:
    """Counts of a filtered batch (summed over batches, or processes, by `+` and `summed_over_ranks`)."""

    proposed: float = 0.0
    accepted: float = 0.0
    known: float = 0.0  # rejected as known failures (evaluated, or lost in a crash)
    ratio_rejected: float = 0.0  # rejected by the ratio test
    ratio_rejected_fresh: float = 0.0  # rejected by the ratio test and not known
    nll: float = 0.0  # the generator's negative log-likelihood of the proposals, summed over tokens
    tokens: float = 0.0
    distinct: float = 0.0
    tried_prefix: float = 0.0  # summed share of each proposal's tokens on prefixes of evaluated failures
    known_successes: float = 0.0  # known successes skipped (rounds with `skip_known_successes` only)
    off_support: float = 0.0  # rejected as off the pretrained generator's support (`support_min_p`), not known

    def __add__(self, other: "FilterStats") -> "FilterStats":
        return FilterStats(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def rejected_fresh_rate(self) -> float:
        """The share of the proposals that are no known failure which the filter rejected anyway: the failure models'
        ratio test (and the support guard): what the fitted region did."""
        return (self.ratio_rejected_fresh + self.off_support) / max(self.proposed - self.known, 1)

    def summed_over_ranks(self, accelerator) -> "FilterStats":
        return FilterStats(*(sum_over_ranks(accelerator, getattr(self, f.name)) for f in dataclasses.fields(self)))


@dataclass
class FilterResult:
    """What the filter kept of a batch of proposals, its counts, and the minimum log-ratio test statistic of the
    accepted and of the rejected candidates (those with a finite one)."""

    accepted: list[Candidate]
    stats: FilterStats
    log_ratio_accepted: list[float]
    log_ratio_rejected: list[float]

    def __add__(self, other: "FilterResult") -> "FilterResult":
        return FilterResult(self.accepted + other.accepted, self.stats + other.stats,
                            self.log_ratio_accepted + other.log_ratio_accepted,
                            self.log_ratio_rejected + other.log_ratio_rejected)


PROPOSAL_MARGIN, MIN_PROPOSALS = 1.25, 8


def proposal_batch_size(missing: int, acceptance: float, world: int, cap: int) -> int:
    """Proposals per process for `missing` accepted candidates (over all processes) at `acceptance`: a quarter more
    than the expected need plus a few (so that one batch usually suffices), at least `MIN_PROPOSALS`, at most
    `cap`."""
    expected = missing / max(acceptance, 1.0 / (cap * world))
    return min(cap, max(MIN_PROPOSALS, math.ceil((PROPOSAL_MARGIN * expected + MIN_PROPOSALS) / world)))


class Sampler:
    r"""
    Proposes, filters and collates candidates; draws posterior samples.

    Args:
        args ([`BaNELConfig`]): the run's configuration.
        tokenizer: the trainer's `processing_class` (a pad and an EOS token set).
        dataset ([`~datasets.Dataset`]): the prompts.
        accelerator: the trainer's `Accelerator`.
        failures ([`~trl_banel.failure.FailureModels`]): the active failure models.
        ledger ([`RewardLedger`]): what was evaluated (known failures and successes).
        generation ([`~trl_banel.generation.TransformersGeneration`]): samples completions for prompts (every
            proposal of the round comes from it).
        timer ([`~trl_banel.distributed.PhaseTimer`]): where proposing and filtering are timed.
        rng (`numpy.random.Generator`): draws the prompts' rows.
        max_positions (`int`, *optional*): the model's context, to reject prompts too long for it.
        pretrained (`Callable`, *optional*): opens a context holding the pretrained generator (`support_min_p`).
    """

    def __init__(self, args, tokenizer, dataset, accelerator, failures, ledger, generation, timer, rng,
                 max_positions=None, pretrained=None):
        self.args, self.tokenizer, self.dataset, self.accelerator = args, tokenizer, dataset, accelerator
        self.pretrained = pretrained
        self.failures, self.ledger, self.generation = failures, ledger, generation
        self.timer, self.rng, self.max_positions = timer, rng, max_positions
        self.evidence = PrefixEvidence()  # failures per completion prefix (see add_failures)
        self._prompt_cache: dict[int, tuple] = {}
        self._prompt_share: dict[str, float] | None = None
        # accepted candidates per proposal, as the last round measured it (sizes the next round's proposals)
        self.proposal_acceptance = 1.0
        self.draw_acceptance = 1.0  # the same for the distillation's posterior draws (accepted per proposal)

    # -- prompts -------------------------------------------------------------------------------------------------
    def encoded_prompt(self, row: int) -> tuple:
        """`(prompt, prompt_text, prompt_ids)` of a dataset row, computed once per row."""
        cached = self._prompt_cache.get(row)
        if cached is None:
            prompt = self.dataset[row]["prompt"]
            cached = self._prompt_cache[row] = (prompt, *self.prompt_ids(prompt))
        return cached

    def prompt_ids(self, prompt) -> tuple[str, list[int]]:
        """The prompt as text (chat template applied) and its token ids."""
        tok = self.tokenizer
        text = maybe_apply_chat_template({"prompt": prompt}, tok)["prompt"]
        ids = tok(text=text, add_special_tokens=not is_conversational({"prompt": prompt}))["input_ids"]
        if not ids:
            if tok.bos_token_id is None:
                raise ValueError(
                    f"The prompt {prompt!r} tokenizes to no token and the tokenizer has no BOS token to start "
                    "generation from; give a non-empty prompt or a tokenizer with a bos_token.")
            ids = [tok.bos_token_id]
        limit, length = self.max_positions, self.args.max_completion_length
        if limit is not None and len(ids) + length > limit:
            raise ValueError(
                f"A prompt of {len(ids)} tokens plus max_completion_length={length} exceeds "
                f"the model's context of {limit} tokens; shorten the prompts or lower max_completion_length.")
        return text, ids

    def prompt_share(self) -> dict[str, float]:
        """`p(c)`: the share of the dataset's rows whose prompt is `c` (the ledger key), as proposals draw rows
        uniformly."""
        if self._prompt_share is None:
            rows = len(self.dataset)
            counts = Counter(self.encoded_prompt(r)[1] for r in range(rows))
            self._prompt_share = {c: n / rows for c, n in counts.items()}
        return self._prompt_share

    def record_to_candidate(self, record) -> Candidate:
        """A ledger record as a candidate (prompt re-tokenised; completion tokenised from its text)."""
        prompt_ids = self.prompt_ids(record.prompt)[1]  # the ledger holds the prompt as text, template applied
        completion_ids = self.tokenizer(text=record.completion, add_special_tokens=False)["input_ids"]
        return Candidate(record.prompt, record.prompt, record.completion,
                         completion_ids + [self.tokenizer.eos_token_id], 0, prompt_ids)

    # -- propose -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, n: int) -> list[Candidate]:
        """Sample `n` completions from the generator for randomly drawn prompts (no oracle call)."""
        rows = self.rng.integers(0, len(self.dataset), size=n).tolist()
        cached = [self.encoded_prompt(r) for r in rows]
        completion_ids = self.generation([(c[1], c[2]) for c in cached], self.evidence)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return [Candidate(c[0], c[1], text, ids, row, c[2])
                for c, row, ids, text in zip(cached, rows, completion_ids, texts)]

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the sampler: the state of its prompt draws and its measured acceptances."""
        return {"rng": self.rng.bit_generator.state, "proposal_acceptance": self.proposal_acceptance,
                "draw_acceptance": self.draw_acceptance}

    def load_state_dict(self, state: dict):
        """Restore the state of the prompt draws and the measured acceptances (of the checkpoint's last round)."""
        self.rng.bit_generator.state = state["rng"]
        self.proposal_acceptance = state.get("proposal_acceptance", 1.0)
        self.draw_acceptance = state.get("draw_acceptance", 1.0)

    def add_failures(self, negatives: list[Candidate]):
        """Learn evaluated failures: their completion prefixes enter `evidence` (kept only with
        `evidence_pseudo_count > 0`: a trie of long completions is large)."""
        if self.args.evidence_pseudo_count > 0:
            for c in negatives:
                self.evidence.add(c.prompt_text, c.completion_ids)

    def tried_prefix_share(self, cands: list[Candidate]) -> float:
        """Mean share of each proposal's tokens that lie on prefixes some failure already went through: how much of
        what the generator proposes retraces evaluated failures (the prefix evidence lowers it)."""
        shares = [self.evidence.tried_depth(c.prompt_text, c.completion_ids) / max(len(c.completion_ids), 1)
                  for c in cands]
        return sum(shares) / max(len(shares), 1)

    # -- filter --------------------------------------------------------------------------------------------------
    def filter(self, cands: list[Candidate], skip_successes: bool = False) -> FilterResult:
        """Posterior rejection: drop candidates any failure model explains, and known failures; with
        `skip_successes` (a round's proposals under `skip_known_successes`), known successes too."""
        args, n = self.args, len(cands)
        batch = self.collate(cands) if cands else None  # one batch for the ratio test and the support guard
        rejected, min_ratio, nll, tokens = self._ratio_test(batch, n)
        known, succeeded = self._known(cands)
        # a known success is certainly outside the failure region, whatever the failure models generalise to
        rejected &= ~succeeded
        off_support = self._off_support(batch, n) & ~succeeded & ~known
        skipped = succeeded & ~known if skip_successes else torch.zeros(n, dtype=torch.bool)
        reject = rejected | known | skipped | off_support
        keep = [c for c, r in zip(cands, reject.tolist()) if not r]
        finite = torch.isfinite(min_ratio)
        stats = FilterStats(
            proposed=n, accepted=len(keep), known=int(known.sum()), ratio_rejected=int(rejected.sum()),
            ratio_rejected_fresh=int((rejected & ~known).sum()), nll=nll, tokens=tokens,
            distinct=len({(c.prompt_text, c.completion) for c in cands}),
            tried_prefix=self.tried_prefix_share(cands) * n if args.evidence_pseudo_count > 0 else 0.0,
            known_successes=int(skipped.sum()), off_support=int(off_support.sum()))
        # skipped known successes are outside the region: they count in neither log-ratio list
        return FilterResult(keep, stats, min_ratio[~reject & finite].tolist(),
                            min_ratio[(rejected | known) & finite].tolist())

    def _ratio_test(self, batch: Candidates | None, n: int):
        """The likelihood-ratio rejection under the active failure models of the `n` collated candidates `batch`:
        `(rejected, min_ratio, nll, tokens)`, the last two the generator's summed negative log-likelihood of the
        completions and their token count."""
        if not n:
            return torch.zeros(n, dtype=torch.bool), torch.full((n,), float("inf")), 0.0, 0
        policy_lp, failure_lp = self.failures.score(batch, self.args.scoring_batch_size)
        nll, tokens = -policy_lp.sum().item(), int(batch.completion_mask.sum())  # the generator's entropy
        if self.args.length_normalize:
            lengths = batch.completion_mask.sum(1).clamp(min=1).to(policy_lp.device)
            policy_lp, failure_lp = policy_lp / lengths, failure_lp / lengths
        rejected, min_ratio = rejection_mask(policy_lp.cpu(), failure_lp.cpu(), self.args.rejection_threshold)
        return rejected, min_ratio, nll, tokens

    def _off_support(self, batch: Candidates | None, n: int) -> torch.Tensor:
        """Which of the `n` collated candidates hold a token the pretrained generator gives less than `support_min_p`
        times its most likely token's probability (all `False` with `support_min_p=0`)."""
        if not (self.args.support_min_p > 0 and n):
            return torch.zeros(n, dtype=torch.bool)
        with torch.no_grad(), self.pretrained() as pretrained, eval_mode(pretrained) as model:
            device = next(model.parameters()).device
            gaps = support_gaps(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                batch.completion_mask.to(device), self.args.scoring_batch_size)
        return gaps.cpu() > -math.log(self.args.support_min_p)

    def _known(self, cands: list[Candidate]) -> tuple[torch.Tensor, torch.Tensor]:
        """Which candidates are known failures (rejected with `reject_known_failures`), and which known successes."""
        records = [self.ledger.lookup(c.prompt_text, c.completion) for c in cands]
        known = torch.tensor([self.args.reject_known_failures and r is not None and not r.success for r in records],
                             dtype=torch.bool)
        if self.ledger.lost:  # lost in a crash: charged, never sent again, so never worth proposing (nor distilling)
            known |= torch.tensor([self.ledger.is_unrecorded_lost(c.prompt_text, c.completion) for c in cands],
                                  dtype=torch.bool)
        return known, torch.tensor([r is not None and r.success for r in records], dtype=torch.bool)

    def propose_filtered(self, n: int, skip_successes: bool = False) -> FilterResult:
        """Propose `n` candidates and filter them (each step timed)."""
        with self.timer.timed("propose"):
            cands = self.propose(n)
        with self.timer.timed("filter"):
            return self.filter(cands, skip_successes)

    def propose_accepted(self, want: int) -> FilterResult:
        """Propose in batches until `want` candidates (over all ranks) survive the filter, or `max_proposal_batches`
        batches ran.

        Each batch is sized to what is still missing at the acceptance the previous batches measured, with a margin,
        and holds at most `num_candidates`: a round whose filter accepts nearly everything draws about its evaluation
        places, not `num_candidates`. The accepted candidates are this process's; the counts are summed over
        processes."""
        world = self.accelerator.num_processes
        cap = max(1, math.ceil(self.args.num_candidates / world))
        result = FilterResult([], FilterStats(), [], [])
        for _ in range(self.args.max_proposal_batches):
            missing = want - sum_over_ranks(self.accelerator, len(result.accepted))
            if missing <= 0:
                break
            size = proposal_batch_size(missing, self.proposal_acceptance, world, cap)
            result = result + self.propose_filtered(size, self.args.skip_known_successes)
            self.proposal_acceptance = (sum_over_ranks(self.accelerator, len(result.accepted))
                                        / max(sum_over_ranks(self.accelerator, result.stats.proposed), 1))
        result.stats = result.stats.summed_over_ranks(self.accelerator)
        return result

    # -- posterior samples ---------------------------------------------------------------------------------------
    def sample_posterior(self, n_total: int) -> tuple[list[Candidate], FilterStats]:
        """Posterior samples on this rank (no oracle call): proposals that survive the filter, drawn in batches sized
        to what is still missing at the acceptance the previous draws measured (at most `num_candidates`). Returns
        them and the draw's filter counts (over all its batches and processes)."""
        world = self.accelerator.num_processes
        want_local = max(1, math.ceil(n_total / world))
        cap = max(1, math.ceil(self.args.num_candidates / world))
        samples: list[Candidate] = []
        total = FilterStats()
        for _ in range(self.args.max_proposal_batches):
            missing = want_local * world - sum_over_ranks(self.accelerator, min(len(samples), want_local))
            if missing <= 0:
                break
            result = self.propose_filtered(proposal_batch_size(missing, self.draw_acceptance, world, cap))
            samples.extend(result.accepted)
            stats = result.stats.summed_over_ranks(self.accelerator)
            self.draw_acceptance = stats.acceptance
            total = total + stats
        return samples[:want_local], total

    def weighted_proposals(self, n_total: int) -> tuple[list[Candidate], float]:
        r"""
        Proposals weighted for the baselined distillation: `1/Z - 1` if accepted, `-1` if rejected, where `Z` is the
        acceptance rate. Their weighted log-likelihood has the gradient of `-KL(posterior || q)` (since
        `E_q[grad log q] = 0`), like the posterior samples' own, without their drift: where the filter rejects
        nothing every weight is 0 and the generator does not move, so it moves only where the failure models act.
        Returns them (none when there is nothing to distil) and `Z`.
        """
        world = self.accelerator.num_processes
        cands, kept, accepted, proposed = [], set(), 0, 0  # Z is measured over every proposal that gets a weight
        for _ in range(self.args.max_proposal_batches):
            batch = self.propose(max(1, math.ceil(n_total / world)))
            result = self.filter(batch)
            accepted += sum_over_ranks(self.accelerator, result.stats.accepted)
            proposed += sum_over_ranks(self.accelerator, result.stats.proposed)
            kept |= {id(c) for c in result.accepted}
            cands.extend(batch)
            if accepted:  # a posterior sample to move towards (if none, propose again)
                break
        z = accepted / max(proposed, 1)
        if not accepted or accepted == proposed:
            return [], z  # no sample of the posterior, or a posterior equal to the generator: nothing to distil
        for c in cands:
            c.weight = 1.0 / z - 1.0 if id(c) in kept else -1.0
        return cands, z

    def replay_successes(self, samples: list[Candidate], seed: int) -> tuple[list[Candidate], int]:
        """Replace a `success_replay` share of the posterior samples by the successes found so far: each of them as
        evenly as the share allows, a draw seeded by `seed` among them when there are more than it holds. Returns
        the samples and how many were replaced."""
        found = self.ledger.successes
        n = int(round(self.args.success_replay * len(samples)))
        if not found or n == 0:
            return samples, 0
        if len(found) > n:  # the same draw on every process (same seed, same ledger)
            picks = random.Random(seed).sample(range(len(found)), n)
        else:
            picks = [i % len(found) for i in range(n)]
        replayed = [self.record_to_candidate(found[i]) for i in picks]
        return samples[: len(samples) - n] + replayed, n

    def draw(self, num_samples: int, posterior: bool) -> tuple[list[Candidate], int]:
        """`num_samples` samples (summed over processes) of the generator, or of the posterior: this process's
        samples and how many proposals they took."""
        world = self.accelerator.num_processes
        want = math.ceil(num_samples / world)
        samples, proposed = [], 0
        # the loop's exits are decided on counts summed over processes, so every process runs the same number of
        # generate/forward calls (ZeRO-3 gathers weights inside them and would hang otherwise)
        while sum_over_ranks(self.accelerator, min(len(samples), want)) < want * world:
            batch = self.propose(min(self.args.generation_batch_size * 4, max(want - len(samples), 1)))
            proposed += len(batch)
            samples.extend(self.filter(batch).accepted if posterior else batch)
            if sum_over_ranks(self.accelerator, proposed) >= 50 * want * world:
                logger.warning("The posterior accepts almost nothing: estimating on %d samples.", len(samples))
                break
        return samples[:want], proposed

    # -- collate -------------------------------------------------------------------------------------------------
    def collate(self, cands: list[Candidate]) -> Candidates:
        """Left-padded prompts followed by right-padded completions, as one batch."""
        pad = self.tokenizer.pad_token_id
        prompts = [torch.tensor(c.prompt_ids, dtype=torch.long) for c in cands]
        completions = [torch.tensor(c.completion_ids, dtype=torch.long) for c in cands]
        p_len = torch.tensor([len(p) for p in prompts])
        c_len = torch.tensor([len(y) for y in completions])
        p_ids = pad_sequence(prompts, batch_first=True, padding_value=pad, padding_side="left")
        c_ids = pad_sequence(completions, batch_first=True, padding_value=pad)
        if c_ids.shape[1] == 0:  # every completion empty: keep one (masked) column
            c_ids = torch.full((len(cands), 1), pad, dtype=torch.long)
        p_mask = (torch.arange(p_ids.shape[1]) >= p_ids.shape[1] - p_len[:, None]).long()
        c_mask = (torch.arange(c_ids.shape[1]) < c_len[:, None]).long()
        return Candidates(torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1),
                          torch.cat([torch.zeros_like(p_mask), c_mask], 1), p_ids.shape[1],
                          [c.prompt for c in cands], [c.prompt_text for c in cands],
                          [c.completion for c in cands], [c.row for c in cands])

    def micro_batches(self, samples: list[Candidate], count: int, weighted: bool) -> list[dict]:
        """`count` distillation micro-batches of `per_device_train_batch_size` samples (cycling through them), on the
        device; with `weighted`, each sample's baselined weight too."""
        bs, device = self.args.per_device_train_batch_size, self.accelerator.device
        batches = []
        for s in range(count):
            chunk = [samples[(s * bs + j) % len(samples)] for j in range(bs)]
            batch = self.collate(chunk)
            keys = ("input_ids", "attention_mask", "completion_mask")
            batches.append({k: getattr(batch, k).to(device) for k in keys})
            if weighted:
                batches[-1]["weight"] = torch.tensor([c.weight for c in chunk], device=device)
        return batches

