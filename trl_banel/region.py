"""Growing the failure region: a new failure model fitted on a round's negatives, and how well it explains them.

A share of each round's negatives is held out of its fit: it measures how the new model generalises (the rejection
rate of the ratio test on negatives it never saw), then joins the next round's fit.
"""

import math
import random

from .posterior import rejection_mask


class FailureRegion:
    r"""
    Fits one failure model per round and measures it.

    Args:
        failures ([`~trl_banel.failure.FailureModels`]): the active failure models, grown here.
        args ([`BaNELConfig`]): the run's configuration.
        accelerator: the trainer's `Accelerator` (each process fits on its share of the batches).
        collate (`Callable`): candidates to a [`~trl_banel.posterior.Candidates`] batch.
        timer ([`~trl_banel.distributed.PhaseTimer`]): where the fit is timed (`failure_fit`).
    """

    def __init__(self, failures, args, accelerator, collate, timer):
        self.failures, self.args, self.accelerator = failures, args, accelerator
        self.collate, self.timer = collate, timer
        self.held_out: list = []  # last round's held-out negatives: a diagnostic, then part of the next fit

    def fit(self, negatives: list, all_negatives: list, round: int) -> dict:
        """Fit a new failure model on the round's negatives (a share held out), grow the region, and measure the fit.

        Returns the fit's metrics: its losses, steps, the margin reached on its own negatives
        (`failure/fit_log_ratio`) and the ratio-test rejection rate of the new model on held-out negatives.
        """
        fit_on, held_out = self._split(negatives, all_negatives, round)
        if not fit_on:
            return {}
        args = self.args
        with self.timer.timed("failure_fit"):
            self.failures.add()
            result = self.failures.fit(
                self.collate(fit_on), args.failure_epochs, args.failure_learning_rate, args.failure_batch_size,
                margin=args.failure_margin, max_grad_norm=args.failure_max_grad_norm,
                warmup_steps=args.failure_warmup_steps, seed=args.seed + round,
                rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
                min_log_ratio=-math.log(args.rejection_threshold),
            )
            while args.keep_failure_models and len(self.failures) > args.max_failure_models:
                self.failures.drop_oldest()
            log_ratio, rejected = self._new_model_test(fit_on + held_out)
        return self._metrics(result, log_ratio[: len(fit_on)].mean().item(), rejected, len(fit_on), bool(held_out))

    def _split(self, negatives: list, all_negatives: list, round: int) -> tuple[list, list]:
        """What to fit on, and what to hold out, of the round's negatives (the held-out share is drawn the same way on
        every process: the negatives are identical everywhere)."""
        order = list(range(len(negatives)))
        random.Random(self.args.seed + round).shuffle(order)
        n_held = int(self.args.failure_heldout_fraction * len(negatives))
        held_out = [negatives[i] for i in order[:n_held]]
        fresh = [negatives[i] for i in order[n_held:]]
        if self.args.cumulative_negatives:  # every negative so far but this round's held-out share
            held = {id(c) for c in held_out}
            fit_on = [c for c in all_negatives if id(c) not in held]
        else:
            fit_on = self.held_out + fresh
        self.held_out = held_out
        return fit_on, held_out

    def _new_model_test(self, cands: list):
        """The newest failure model alone against the generator: its exact log-ratio after the fit, and the ratio
        test's rejections."""
        args = self.args
        batch = self.collate(cands)
        policy_lp, failure_lp = self.failures.score(batch, args.scoring_batch_size, args.length_normalize)
        log_ratio = (failure_lp[-1] - policy_lp).cpu()
        return log_ratio, rejection_mask(policy_lp.cpu(), failure_lp[-1:].cpu(), args.rejection_threshold)[0]

    @staticmethod
    def _metrics(result, fit_log_ratio: float, rejected, n_fit: int, held_out: bool) -> dict:
        out = {
            "failure_losses": result.losses,
            "failure/loss_first_epoch": result.losses[0], "failure/loss": result.losses[-1],
            "failure/fit_steps": result.steps,
            "failure/fit_log_ratio": fit_log_ratio,
            "failure/fit_rejected_rate": rejected[:n_fit].float().mean().item(),
            "failure/fit_target": result.target,
            # judged on the exact log-ratio after the fit (the fit's own value is one step stale)
            "failure/margin_reached": float(fit_log_ratio >= result.target),
        }
        if held_out:
            out["failure/heldout_rejected_rate"] = rejected[n_fit:].float().mean().item()
        return out
