"""Callbacks users add to a BaNEL run."""

import json
import os

from transformers import TrainerCallback


class SuccessCurveCallback(TrainerCallback):
    r"""
    Records the sampler's success rate against the NRE spent, every `every_rounds` rounds, for plots.

    Each point is an estimate over `num_samples` samples (see [`BaNELTrainer.estimate_success_rate`]); its oracle
    calls are counted in `evaluation_calls` and never charged to the training budget. The curve is written to
    `output_dir/success_curve.json` and logged as `eval/success_rate`.
    """

    def __init__(self, trainer, every_rounds: int = 5, num_samples: int = 2000):
        self.trainer = trainer
        self.every_rounds = every_rounds
        self.num_samples = num_samples
        self.points: list[dict] = []
        self.evaluation_calls = 0
        self._last_round = None

    def measure(self):
        t = self.trainer
        est = t.estimate_success_rate(self.num_samples)
        self.evaluation_calls += est.oracle_calls
        point = {"round": t.round, "nre": t.ledger.spent, **est.to_dict()}
        self.points.append(point)
        self._last_round = t.round
        if t.accelerator.is_main_process:
            with open(os.path.join(t.args.output_dir, "success_curve.json"), "w") as f:
                json.dump({"points": self.points, "evaluation_calls": self.evaluation_calls}, f, indent=1)
        return point

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.points:
            self.measure()

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t._buffer and args.distill_every:  # mid-distillation: wait for the distilled generator
            return
        if t.round - self._last_round >= self.every_rounds:
            point = self.measure()
            t.log({"eval/success_rate": point["rate"], "eval/acceptance_rate": point["acceptance_rate"]})

    def on_train_end(self, args, state, control, **kwargs):
        if self.points and self.points[-1]["round"] != self.trainer.round:
            self.measure()
