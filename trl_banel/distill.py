"""Around a distillation: when the rounds stop, which generator was the best, and what a distillation absorbed.

The optimisation steps themselves are the Trainer's (`BaNELTrainer.compute_loss`); this module holds the decisions
and the measurement around them.
"""

import logging

import torch

from .distributed import mean_over_ranks
from .posterior import sequence_log_probs
from .stats import clopper_pearson

logger = logging.getLogger(__name__)


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
            "%d consecutive rounds spent (almost) no new reward evaluation (everything rejected or already "
            "evaluated): stopping. The sampler has converged or can no longer be sampled; see "
            "trainer.ledger.successes.", idle_rounds)
        return f"{idle_rounds} idle rounds (max_idle_rounds={args.max_idle_rounds})"
    return None


def better_phase(history: list[dict], rounds_in_phase: int, round: int, best: dict | None) -> dict | None:
    """The phase that just ended (its last `rounds_in_phase` rounds of `history`, before `round`), if it beats `best`.

    The rounds since the last distillation were proposed by the current generator (filtered by this phase's failure
    models), so their evaluations already measure it: selecting on them costs no reward evaluation. Rates are
    compared by the lower end of their 95% Clopper-Pearson interval, so a lucky 1-in-1 does not beat a steady
    30-in-50. Returns `best_generator`'s entry without its `nre` and `path`, or `None`."""
    phase = history[len(history) - rounds_in_phase:]
    successes = sum(h["round_successes"] for h in phase)
    evaluated = sum(h["round_evaluated"] for h in phase)
    if successes == 0:
        return None
    lower = clopper_pearson(successes, evaluated)[0]
    if best is not None and lower <= best["lower"]:
        return None
    return {"first_round": round - rounds_in_phase, "last_round": round - 1, "successes": successes,
            "evaluated": evaluated, "lower": lower}


class DistillationProbe:
    r"""
    How much log-likelihood a distillation's posterior samples gained under the generator (mean per sample).

    A generator that does not move cannot absorb the posterior: after the first three distillations, it warns with
    the setting to change when they moved it by almost nothing.

    Args:
        policy (`torch.nn.Module`): the generator (failure adapters, if any, are disabled outside their fit).
        args ([`BaNELConfig`]), accelerator: the run's configuration and `Accelerator`.
    """

    def __init__(self, policy, args, accelerator):
        self.policy, self.args, self.accelerator = policy, args, accelerator
        self._probe = None  # (samples, their log q before) of the last distillation

    def start(self, samples):
        """Before the distillation: remember `samples` (a [`~trl_banel.posterior.Candidates`]) and their log q."""
        self._probe = (samples, self.log_probs(samples))

    @torch.no_grad()
    def log_probs(self, cands) -> torch.Tensor:
        policy, device = self.policy, self.accelerator.device
        was_training = policy.training
        policy.eval()
        try:
            return sequence_log_probs(policy, cands.input_ids.to(device), cands.attention_mask.to(device),
                                      cands.completion_mask.to(device), self.args.scoring_batch_size).cpu()
        finally:
            policy.train(was_training)

    def measure(self, history: list[dict]) -> float | None:
        """After the distillation's last step: the gain (over all processes), also set in `history`'s last entry;
        `None` when no distillation is waiting to be measured."""
        if self._probe is None:
            return None
        probe, before = self._probe
        self._probe = None
        gain = mean_over_ranks(self.accelerator, [(self.log_probs(probe) - before).mean().item()])
        if history:
            history[-1]["distill/log_prob_gain"] = gain
        gains = [h["distill/log_prob_gain"] for h in history if "distill/log_prob_gain" in h]
        if len(gains) == 3 and max(gains) < 0.01:
            logger.warning(
                "The first 3 distillations raised the log-likelihood of their posterior samples by at most %.2g nats "
                "(%d steps each at learning_rate=%g): the generator barely moves, so it cannot absorb what the "
                "failure models learn. Raise learning_rate (a small model may need 1e-4 to 1e-3) or distill_steps.",
                max(gains), self.args.distill_steps, self.args.learning_rate)
        return gain
