"""Around a distillation: when the rounds stop, which generator was the best, and what a distillation absorbed.

The optimisation steps themselves are the Trainer's (`BaNELTrainer.compute_loss`); this module holds the decisions
and the measurement around them.
"""

import contextlib
import copy
import logging
import math
import random
from dataclasses import dataclass, field

import torch
from trl.models.utils import prepare_deepspeed

from .adapters import gathered_copy
from .distributed import mean_over_ranks
from .exact_distillation import ExactDistillation, ExactTargets, exact_loss
from .posterior import (CompletionChunks, chunked, completion_log_softmax, eval_mode, sequence_log_probs,
                        token_kl)
from .stats import clopper_pearson

logger = logging.getLogger(__name__)


def distillation_loss(model, inputs: dict, kl_coef: float = 0.0, reference=None):
    r"""
    The distillation objective on a micro-batch: the mean token negative log-likelihood of the samples (weighted per
    sequence by `inputs["weight"]`, the baselined objective's; the exact objective's loss for its micro-batches),
    plus `kl_coef` times the token KL to the pretrained generator.

    Returns `(loss, logs)`: `logs` holds the detached `distill/loss` (the objective without the KL),
    `distill/kl_to_pretrained` with `kl_coef`, and the exact objective's parts (`distill/cross_entropy`, the
    expected log-loss under the proposal distribution, and `distill/known_failure_term`). `reference` opens the
    pretrained generator (a context manager, see [`pretrained_generator`]).
    """
    ids, att, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    exact = "teacher_log_probs" in inputs or "teacher_top_ids" in inputs  # the exact objective (whole, sparse targets)
    if not kl_coef > 0 and chunked(model, ids, comp):  # a large vocabulary: one chunk of positions' logits at a time
        nll, logs = exact_loss(model, inputs) if exact else (_chunked_nll(model, inputs), {})
        logs["distill/loss"] = nll.detach()
        return nll, logs
    log_probs, targets, mask = completion_log_softmax(model, ids, att, comp)  # one forward, for the KL too
    if exact:
        nll, logs = exact_loss(model, inputs, (log_probs, targets, mask))
    else:
        logs = {}
        token_lp = torch.gather(log_probs, 2, targets.unsqueeze(-1)).squeeze(-1)
        weight = inputs.get("weight")
        weighted = token_lp * mask if weight is None else token_lp * mask * weight.unsqueeze(1)
        nll = -weighted.sum() / mask.sum().clamp(min=1)
    logs["distill/loss"] = nll.detach()
    if not kl_coef > 0:
        return nll, logs
    with torch.no_grad(), reference() as pretrained:
        reference_log_probs = completion_log_softmax(pretrained, ids, att, comp)[0]
    kl = token_kl(log_probs, reference_log_probs, mask)
    logs["distill/kl_to_pretrained"] = kl.detach()
    return nll + kl_coef * kl, logs


def _chunked_nll(model, inputs: dict) -> torch.Tensor:
    """[`distillation_loss`]'s weighted token negative log-likelihood, its logits made one chunk of positions at a
    time."""
    chunks = CompletionChunks(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
    weight = inputs.get("weight")
    weighted_mask = chunks.mask if weight is None else chunks.mask * weight.unsqueeze(1)
    total = chunks.total(lambda log_probs, sl: (torch.gather(log_probs, 2, chunks.targets[:, sl].unsqueeze(-1))
                                                .squeeze(-1) * weighted_mask[:, sl]).sum())
    return -total / chunks.mask.sum().clamp(min=1)


def frozen_copy(policy, accelerator, zero3: bool):
    """A frozen copy of the pretrained generator, made at start (sharded again under ZeRO-3)."""
    if zero3:
        return prepare_deepspeed(gathered_copy(policy, accelerator.device), accelerator)
    return copy.deepcopy(policy).eval().requires_grad_(False)


@contextlib.contextmanager
def pretrained_generator(model, policy, frozen=None):
    """The pretrained generator: `frozen` if there is one, else the LoRA generator `model` (whose unwrapped form is
    `policy`) with its adapter disabled."""
    if frozen is not None:
        yield frozen
        return
    with policy.disable_adapter():
        yield model


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def stop_reason(args, ledger, round: int, idle_rounds: int) -> str | None:
    """Why the rounds stop now (the budget, `stop_after_successes`, `num_rounds`, idle rounds), or `None`."""
    if ledger.exhausted:
        return f"the budget of {args.max_reward_evaluations} reward evaluations is spent"
    found = len(ledger.successes)
    if args.stop_after_successes is not None and found >= args.stop_after_successes:
        return f"{_plural(found, 'success')} found (stop_after_successes={args.stop_after_successes})"
    if args.num_rounds is not None and round >= args.num_rounds:
        return f"num_rounds={args.num_rounds} reached"
    if idle_rounds >= args.max_idle_rounds:
        logger.warning(
            "%d consecutive rounds filled fewer than half of their evaluation places with new evaluations (nearly "
            "every proposal rejected, or already evaluated): stopping. The sampler has converged or can no longer be "
            "sampled; see trainer.ledger.successes. If nearly every proposal was a known failure (`known_rejected` "
            "in trainer.history) long before a success, the generator's mass sits on completions already evaluated "
            "and its distillations (distill_target_kl=%g nats, times distill_idle_kl_growth=%g per idle round) could "
            "not move it off them in time: a larger max_idle_rounds gives the growing steps more rounds (the shipped "
            "digits task stopped so within about 150 evaluations on 2 of 3 seeds before the growth was on; "
            "docs/default_round.md).",
            idle_rounds, args.distill_target_kl, args.distill_idle_kl_growth)
        return (f"{idle_rounds} idle rounds, each filling fewer than half of its places "
                f"(max_idle_rounds={args.max_idle_rounds})")
    return None


def better_phase(history: list[dict], rounds_in_phase: int, round: int, best: dict | None) -> dict | None:
    """The phase that just ended (its last `rounds_in_phase` rounds of `history`, before `round`), if it beats `best`.

    The rounds since the last distillation were proposed by the current generator (filtered by this phase's failure
    models), so their evaluations already measure it: selecting on them costs no reward evaluation. Rates are
    compared by the lower end of their 95% Clopper-Pearson interval, so a lucky 1-in-1 does not beat a steady
    30-in-50. Returns `best_generator`'s entry without its `nre` and `path`, or `None`."""
    phase = history[len(history) - rounds_in_phase:]
    # with `skip_known_successes`, the known successes the phase's generator proposed were skipped, not evaluated:
    # they are successes of that generator all the same (free ones), and leaving them out would rate it too low
    skipped = sum(h.get("known_successes_skipped", 0) for h in phase)
    successes = sum(h["round_successes"] for h in phase) + skipped
    evaluated = sum(h["round_evaluated"] for h in phase) + skipped
    if successes == 0:
        return None
    lower = clopper_pearson(successes, evaluated)[0]
    if best is not None and lower <= best["lower"]:
        return None
    return {"first_round": round - rounds_in_phase, "last_round": round - 1, "successes": successes,
            "evaluated": evaluated, "lower": lower}


class DistillationProbe:
    r"""
    What a distillation did to the generator, measured on a probe set of completions before and after it: the mean
    per-sample log-likelihood its posterior samples gained (`distill/log_prob_gain`) or, for the exact objective
    with known failures, the log-likelihood those failures lost (`distill/known_failure_log_prob_drop`: it moves
    the generator off them, and the rest of its mass moves up in proportion, so that is what shows it worked).

    A generator that does not move cannot absorb the posterior: after the first three distillations of a kind, it
    warns with the setting to change when they moved it by almost nothing.

    Args:
        policy (`torch.nn.Module`): the generator (failure adapters, if any, are disabled outside their fit).
        args ([`BaNELConfig`]), accelerator: the run's configuration and `Accelerator`.
    """

    GAIN, DROP = "distill/log_prob_gain", "distill/known_failure_log_prob_drop"

    def __init__(self, policy, args, accelerator):
        self.policy, self.args, self.accelerator = policy, args, accelerator
        self._probe = None  # (samples, their log q before, metric name) of the last distillation

    def start(self, samples, known_failures: bool = False):
        """Before the distillation: remember `samples` (a [`~trl_banel.posterior.Candidates`]) and their log q;
        `known_failures`: they are known failures, whose log q the distillation should lower."""
        self._probe = (samples, self.log_probs(samples), self.DROP if known_failures else self.GAIN)

    @torch.no_grad()
    def log_probs(self, cands) -> torch.Tensor:
        device = self.accelerator.device
        with eval_mode(self.policy) as policy:
            return sequence_log_probs(policy, cands.input_ids.to(device), cands.attention_mask.to(device),
                                      cands.completion_mask.to(device), self.args.scoring_batch_size).cpu()

    def measure(self, history: list[dict]) -> tuple[str, float] | None:
        """After the distillation's last step: `(metric name, value)` over all processes (the earlier distillations'
        values, read from `history`, decide the warning); `None` when no distillation is waiting to be measured."""
        if self._probe is None:
            return None
        probe, before, key = self._probe
        self._probe = None
        change = (self.log_probs(probe) - before).mean().item()
        value = mean_over_ranks(self.accelerator, [-change if key == self.DROP else change])
        values = [h[key] for h in history[:-1] if key in h] + [value]
        if len(values) == 3 and max(values) < 0.01:
            what = ("lowered the log-likelihood of the known failures" if key == self.DROP
                    else "raised the log-likelihood of their posterior samples")
            logger.warning(
                "The first 3 distillations %s by at most %.2g nats (%d steps each at learning_rate=%g): the "
                "generator barely moves, so it cannot absorb what the failure models learn. Raise learning_rate "
                "(a small model may need 1e-4 to 1e-3) or distill_steps.",
                what, max(values), self.args.distill_steps, self.args.learning_rate)
        return key, value


class StepSize:
    r"""
    The distillation's learning rate, set by what each distillation moved the generator instead of guessed by model
    size: before a distillation it draws `PROBE_SIZE` fresh proposals and remembers their log q; after it, the mean
    drop of their log q estimates `KL(q_before || q_after)` (sequence level, nats), and the learning rate is scaled by
    `clip(sqrt(distill_target_kl / measured), 1/4, 4)` (within [`MIN_LR`, `distill_max_learning_rate`]). With Adam
    a step's size is about the learning rate whatever the gradient's scale, so a measured KL near 0 means a learning
    rate too small for this model, and the next distillation takes larger steps. Logged: `distill/kl_step`
    (measured) and `distill/learning_rate` (the next distillation's). Each distillation starts with fresh Adam moments
    (`fresh_optimizer`). `distill_target_kl=0`: the learning rate stays fixed.
    """

    PROBE_SIZE, MIN_LR, MAX_FACTOR = 64, 1e-8, 4.0

    def __init__(self, probe: DistillationProbe, sampler, args, accelerator):
        self.probe, self.sampler, self.args, self.accelerator = probe, sampler, args, accelerator
        self._before = None
        self._pending_factor = None  # the learning rate's rescale to this distillation's target, before its steps
        self._start_weights = None  # (parameter, its value before the distillation), with a backoff factor
        self.target = args.distill_target_kl if args is not None else 0.0  # this distillation's
        self.backs_off = args is not None and args.distill_backoff_factor > 0 and args.distill_target_kl > 0
        if self.backs_off and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            self.backs_off = False
            logger.info("distill_backoff_factor=%g is not applied under DeepSpeed (its engine keeps its own copy of "
                        "the weights): a distillation that moves the generator far beyond the target is kept.",
                        args.distill_backoff_factor)

    @torch.no_grad()
    def back_off(self, start: list, factor: float, batch, before) -> dict[str, float]:
        """Pull the generator back along the distillation's update, `theta0 + factor (theta1 - theta0)` (a KL grows
        about as the square of a small move), and measure the move that is left. The learning rate is still rescaled
        by the move the distillation made (`distill/kl_step`), so the next one takes smaller steps."""
        for param, initial in start:
            param.lerp_(initial.to(param.device), 1.0 - factor)
        left = mean_over_ranks(self.accelerator, [(before - self.probe.log_probs(batch)).mean().item()])
        return {"distill/backoff": factor, "distill/kl_after_backoff": left}

    def start(self, acceptance: float | None = None, idle_rounds: int = 0, exact: bool = True):
        """Before a distillation: fresh proposals of the generator as it is, and their log q (with a target only:
        the extra proposals would change the run's random draws); with `distill_backoff_factor`, its trainable
        weights (on the CPU: a copy of the generator's trainable part for the length of one distillation).

        `acceptance`: the share `Z` of the proposal distribution the posterior keeps (the exact objective's). With
        `distill_posterior_bound` the posterior is `KL = -log Z` nats from the generator, so the target is at most
        that: a move beyond what the posterior asks is noise, which lowers the expected log-probability of every
        string (the success set's too; measured: without the ratio test, rare letters drifted to 4e-6x the prior at
        the largest rate). `idle_rounds`: the consecutive idle rounds before this distillation, each of which
        multiplies the target by `distill_idle_kl_growth` (see `target_for`); `exact`: whether `acceptance` is the
        exact objective's (the posterior objective's bounds only a grown target)."""
        if not self.args.distill_target_kl > 0:
            return
        previous, self.target = self.target, self.target_for(acceptance, idle_rounds, exact)
        if self.args.distill_idle_kl_growth > 1 and previous > 0:
            # the learning rate was set for the previous target: a KL grows about as the square of the step
            self._pending_factor = (self.target / previous) ** 0.5
        n = max(1, self.PROBE_SIZE // self.accelerator.num_processes)
        batch = self.sampler.collate(self.sampler.propose(n))
        self._before = (batch, self.probe.log_probs(batch))
        if self.backs_off:
            self._start_weights = [(p, p.detach().to("cpu", copy=True)) for p in self.probe.policy.parameters()
                                   if p.requires_grad]

    def target_for(self, acceptance: float | None, idle_rounds: int, exact: bool = True) -> float:
        """A distillation's target KL: `distill_target_kl`, times `distill_idle_kl_growth` per consecutive idle round
        but never past the posterior's distance `-log Z` (`acceptance`, a move beyond it is noise), and with
        `distill_posterior_bound` and the `exact` objective at most that distance."""
        base = self.args.distill_target_kl
        grown = base * self.args.distill_idle_kl_growth ** idle_rounds
        if acceptance is None:
            return grown
        distance = -math.log(min(max(acceptance, 1e-12), 1.0))
        if self.args.distill_posterior_bound and exact:
            return min(grown, distance)
        return min(grown, max(base, distance))

    def prepare(self, optimizer, scheduler) -> None:
        """Just before a distillation's first step: fresh optimizer moments, and the learning rate rescaled to a
        target that changed since the previous distillation (with `distill_idle_kl_growth`)."""
        self.fresh_optimizer(optimizer)
        factor, self._pending_factor = self._pending_factor, None
        if factor is not None and factor != 1.0 and optimizer is not None:
            scale_learning_rate(optimizer, scheduler, factor, self.MIN_LR, self.args.distill_max_learning_rate)

    @staticmethod
    def fresh_optimizer(optimizer):
        """Start a distillation with no Adam moments: its steps are then about the learning rate in size whatever the
        previous distillations' gradients were (moments carried over from a large one would shrink the next one's
        steps and confound the learning rate's effect). A torch optimizer only; others (DeepSpeed's) keep theirs."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if isinstance(inner, torch.optim.Optimizer):
            inner.state.clear()

    def after(self, optimizer, scheduler) -> dict[str, float]:
        """After the distillation's last step: the measured KL and, with a target, the rescaled learning rate."""
        if self._before is None:
            return {}
        batch, before = self._before
        self._before = None
        kl = mean_over_ranks(self.accelerator, [(before - self.probe.log_probs(batch)).mean().item()])
        target = self.target
        logs = {"distill/kl_step": kl, "distill/kl_target": target}
        start, self._start_weights = self._start_weights, None
        if start and kl > self.args.distill_backoff_factor * target:
            logs.update(self.back_off(start, (target / kl) ** 0.5, batch, before))
        if optimizer is not None:
            factor = self.MAX_FACTOR if kl <= 0 else (target / kl) ** 0.5  # a target of 0: the least factor
            factor = min(max(factor, 1 / self.MAX_FACTOR), self.MAX_FACTOR)
            logs["distill/learning_rate"] = scale_learning_rate(optimizer, scheduler, factor, self.MIN_LR,
                                                                self.args.distill_max_learning_rate)
        return logs


def scale_learning_rate(optimizer, scheduler, factor: float, low: float, high: float) -> float:
    """Multiply every parameter group's learning rate by `factor` (clamped to [low, high]), in the optimizer and in the
    scheduler's base rates (a constant schedule would otherwise restore the old one); returns the first group's."""
    inner = getattr(scheduler, "scheduler", scheduler)
    base = list(getattr(inner, "base_lrs", []))
    for i, group in enumerate(optimizer.param_groups):
        new = min(max(group["lr"] * factor, low), high)
        ratio = new / group["lr"] if group["lr"] > 0 else 0.0
        group["lr"] = new
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
        if i < len(base):
            base[i] *= ratio
    if base:
        inner.base_lrs = base
    return optimizer.param_groups[0]["lr"]


@dataclass
class Draw:
    """What a distillation drew while its phase's failure models were active: the exact objective's `targets`, or the
    `samples` to distil (posterior samples, or the baselined objective's weighted proposals); what its probe measures;
    and the draw's metrics (`distill/acceptance_rate`, ...)."""

    metrics: dict[str, float]
    targets: ExactTargets | None = None
    samples: list = field(default_factory=list)
    probe: list = field(default_factory=list)


class Distiller:
    r"""
    The distillation that ends a phase: its samples (posterior samples with successes replayed, the baselined
    objective's weighted proposals, or the exact objective's targets) as micro-batches, and the probe that measures
    what it absorbed. The trainer calls [`~Distiller.draw`] while the phase's failure models are active, drops them,
    then calls [`~Distiller.micro_batches`].

    Args:
        sampler ([`~trl_banel.sampler.Sampler`]), failures ([`~trl_banel.failure.FailureModels`]): the round's.
        ledger ([`~trl_banel.ledger.RewardLedger`]): what was evaluated (its failures enter the exact objective).
        args ([`BaNELConfig`]), accelerator: the run's configuration and `Accelerator`.
    """

    def __init__(self, sampler, failures, ledger, args, accelerator):
        self.sampler, self.ledger, self.args, self.accelerator = sampler, ledger, args, accelerator
        self.objective = args.distill_objective  # "auto" is resolved by the trainer once it knows the model
        self.probe = DistillationProbe(failures.policy, args, accelerator)
        self.step_size = StepSize(self.probe, sampler, args, accelerator)
        self.exact = ExactDistillation(sampler, failures, ledger, args, accelerator)

    def draw(self, round: int, n_micro: int) -> Draw:
        """The phase's samples for `n_micro` micro-batches, drawn while its failure models are active: each
        micro-batch cycles through them, so draw what the steps consume, at most `distill_samples`."""
        args, sampler = self.args, self.sampler
        world = self.accelerator.num_processes
        consumed = min(args.distill_samples, n_micro * args.per_device_train_batch_size * world)
        if self.objective == "exact" and not self.ledger.successes:
            # the exact objective serves the search; from the first success on, the posterior objective (with
            # success replay) distils what was found (trl_banel.exact_distillation says why)
            targets, probe = self.exact.targets(consumed)
            metrics = {"distill/acceptance_rate": targets.acceptance,
                       "distill/rejected_fresh_rate": targets.rejected_fresh_rate,
                       "distill/known_other_tokens_rate": targets.other_tokens_rate}
            if targets.failures is not None:
                metrics["distill/known_failure_mass"] = float(targets.failure_mass.sum())
            return Draw(metrics, targets=targets, probe=probe)
        if self.objective == "baselined":
            samples, acceptance = sampler.weighted_proposals(args.distill_samples)
            return Draw({"distill/acceptance_rate": acceptance}, samples=samples)
        samples, stats = sampler.sample_posterior(consumed)
        samples, replayed = sampler.replay_successes(samples, args.seed + round)
        metrics = {"distill/acceptance_rate": stats.acceptance,
                   "distill/rejected_fresh_rate": stats.rejected_fresh_rate}
        if replayed:
            metrics["distill/replayed_successes"] = replayed
        return Draw(metrics, samples=samples)

    def micro_batches(self, draw: Draw, round: int, n_micro: int, idle_rounds: int = 0) -> list[dict]:
        """`draw` as `n_micro` micro-batches for the generator as it is now (its phase's failure models dropped), the
        probe and the step size started (`idle_rounds`: the consecutive idle rounds before it); skipped steps when
        there is nothing to distil."""
        sampler = self.sampler
        if draw.targets is not None:
            targets = draw.targets
            self.step_size.start(acceptance=targets.acceptance, idle_rounds=idle_rounds)
            if targets.failures is not None:  # the most probable known failures: what the objective pushes down
                top = targets.failure_mass.argsort(descending=True)[:64]
                self.probe.start(targets.failures.select(top.tolist()), known_failures=True)
            else:
                self.probe.start(sampler.collate(draw.probe))
            return self.exact.batches(targets, round, n_micro)
        samples = draw.samples
        if not samples:
            logger.warning("Nothing to distil (no posterior sample survived the filter, or, with the baselined "
                           "objective, the filter rejected nothing): skipping this distillation.")
            return skipped(n_micro)
        random.Random(self.args.seed + round).shuffle(samples)
        self.step_size.start(draw.metrics.get("distill/acceptance_rate"), idle_rounds, exact=False)
        self.probe.start(sampler.collate([c for c in samples if c.weight > 0][:64] or samples[:1]))
        return sampler.micro_batches(samples, n_micro, weighted=self.objective == "baselined")


def skipped(n: int) -> list[dict]:
    """`n` micro-batches of steps that update nothing."""
    return [{"skip": True} for _ in range(n)]
