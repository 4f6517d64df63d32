"""Charging baselines the same reward evaluations as BaNEL.

`BudgetedReward` wraps a sparse reward oracle as a TRL reward function whose every call goes through a
[`~trl_banel.RewardLedger`], the class BaNEL uses: a hard NRE budget, exact repeats of an evaluated
`(prompt, completion)` answered from the ledger for free, and a durable JSON-lines log. Completions beyond the budget
get `None` (TRL turns it into NaN: not scored, no advantage). `StopOnBudgetCallback` ends a `GRPOTrainer` run once
the budget is spent, and `PolicySuccessCurveCallback` records a policy's success rate against the NRE spent, keeping
the weights of the best point for a later, separately counted, re-estimate.
"""

import copy
import os
from collections.abc import Callable

from transformers import TrainerCallback

from trl_banel.callbacks import SuccessCurveRecorder
from trl_banel.ledger import LEDGER_FILENAME, RewardLedger
from trl_banel.oracle import RewardOracle, message_text


class BudgetedReward:
    r"""
    A TRL reward function that charges every new evaluation to an NRE budget.

    Args:
        reward_funcs (`Callable` or `list[Callable]`):
            The sparse oracle(s), TRL's convention `f(prompts, completions, **kwargs) -> list[float | None]`, sync or
            async (several are summed with `weights`). Called only for `(prompt, completion)` pairs the ledger has
            never seen, and never for more pairs than the budget has left.
        budget (`int`):
            Maximum number of reward evaluations (the ledger's hard cap).
        path (`str` or `None`):
            JSON-lines ledger file (`None`: in memory). An existing file is loaded: nothing is paid for twice.
        success_threshold (`float`): a reward strictly above it is a success.
        weights, retries, backoff, timeout: as in [`~trl_banel.oracle.RewardOracle`] (BaNEL's own validation:
            NaN, inf or a wrong-length answer raise instead of becoming failures).

    One instance is one ledger and one budget: TRL calls reward functions on every process with that process's
    completions, so in a multi-process run each rank would hold its own ledger (give each rank its own `path` and a
    share of the budget). The benchmarks run single-process.

    The instance keeps `ledger` (a [`~trl_banel.RewardLedger`]), `oracle_calls` (pairs actually sent to the oracle)
    and `unscored` (completions answered `None` because the budget was spent).
    """

    def __init__(self, reward_funcs, budget: int, path: str | None = None, success_threshold: float = 0.0,
                 weights=None, retries: int = 2, backoff: float = 1.0, timeout: float | None = None):
        self.oracle = RewardOracle(reward_funcs, weights, retries, backoff, timeout)
        self.ledger = RewardLedger(path, budget, success_threshold)
        self.oracle_calls = 0
        self.unscored = 0
        self.calls = 0
        self.__name__ = "budgeted_" + "_".join(self.oracle.names)  # TRL names the reward column after it

    @property
    def exhausted(self) -> bool:
        return self.ledger.exhausted

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [""] * n
        # per-completion columns are forwarded to the oracle (sliced to the pairs it scores), the rest as they are
        per_item = {k: v for k, v in kwargs.items() if isinstance(v, (list, tuple)) and len(v) == n}
        shared = {k: v for k, v in kwargs.items() if k not in per_item and k not in ("log_extra", "log_metric")}

        def call(idx: list[int]) -> list[float | None]:
            self.oracle_calls += len(idx)
            columns = {**shared, **{k: [v[i] for i in idx] for k, v in per_item.items()}}
            return self.oracle([prompts[i] for i in idx], [completions[i] for i in idx], columns)

        self.calls += 1
        rewards = self.ledger.evaluate([message_text(p) for p in prompts], [message_text(c) for c in completions],
                                       call,
                                       round=self.calls)
        self.unscored += sum(r is None for r in rewards)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("nre/spent", float(self.ledger.spent))
            log_metric("successes/found", float(len(self.ledger.successes)))
        return rewards


def budgeted_reward_for_run(reward_funcs, budget: int, output_dir: str, **kwargs) -> BudgetedReward:
    """A `BudgetedReward` whose ledger lives at `output_dir/evaluations.jsonl`, the path BaNEL uses."""
    return BudgetedReward(reward_funcs, budget, os.path.join(output_dir, LEDGER_FILENAME), **kwargs)


class StopOnBudgetCallback(TrainerCallback):
    """Stops training at the end of the step in which the budget was spent (no later step calls the oracle)."""

    def __init__(self, budgeted: BudgetedReward):
        self.budgeted = budgeted

    def on_step_end(self, args, state, control, **kwargs):
        if self.budgeted.exhausted:
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.on_step_end(args, state, control)


class PolicySuccessCurveCallback(SuccessCurveRecorder):
    r"""
    The policy's success rate against the NRE spent: at the start, every `every_nre` reward evaluations, and at the
    end. The GRPO-side twin of [`~trl_banel.callbacks.SuccessCurveCallback`].

    Args:
        budgeted (`BudgetedReward`): whose ledger gives the NRE spent.
        estimate (`Callable[[model], SuccessEstimate]`):
            Estimates the policy's success rate (a [`~trl_banel.stats.SuccessEstimate`] whose `oracle_calls` says how
            many oracle calls it made; they are counted in `evaluation_calls`, never charged to the budget).
        every_nre (`int`): measure each time this many more evaluations have been spent.
        keep_best (`bool`): keep a CPU copy of the weights at the point with the best estimate (`best_state`).
        path (`str`, *optional*): JSON file the points are written to after every measurement.
    """

    def __init__(self, budgeted: BudgetedReward, estimate: Callable, every_nre: int = 500, keep_best: bool = True,
                 path: str | None = None):
        super().__init__(keep_best, path)
        self.budgeted = budgeted
        self.estimate = estimate
        self.every_nre = every_nre
        self._next = 0

    def measure(self, model, step: int) -> dict:
        was_training = model.training
        est = self.estimate(model)
        model.train(was_training)
        point = self.record({"step": step, "nre": self.budgeted.ledger.spent}, est, model.state_dict)
        self._next = point["nre"] + self.every_nre
        return point

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.points:
            self.measure(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.budgeted.ledger.spent >= self._next:
            self.measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.points and self.points[-1]["step"] != state.global_step:
            self.measure(model, state.global_step)

    def best_model(self, model):
        """A copy of `model` carrying the best point's weights."""
        best = copy.deepcopy(model)
        if self.best_state is not None:
            best.load_state_dict(self.best_state)
        return best
