"""Baselines BaNEL is compared against, usable on their own with TRL's `GRPOTrainer`.

- `BudgetedReward`: the sparse oracle behind the same `RewardLedger` BaNEL uses (hard NRE budget, free exact
  repeats, jsonl log; `None` beyond the budget), with `StopOnBudgetCallback` to end a run when it is spent;
- `RNDBonus`: random-network-distillation novelty bonus (a reward function; no oracle call);
- `SimHashCountBonus`: count-based bonus `beta / sqrt(n)` with SimHash pseudo-counts (a reward function; no oracle
  call);
- `NSRConfig`, `NSRTrainer`: negative-sample reinforcement (every failure gets advantage -1);
- `PolicySuccessCurveCallback`: a policy's success rate against the NRE spent, keeping the best point's weights.

GRPO with the sparse reward alone is `GRPOTrainer(reward_funcs=BudgetedReward(oracle, budget), ...)`.
"""

from .budget import BudgetedReward, PolicySuccessCurveCallback, StopOnBudgetCallback, budgeted_reward_for_run
from .counts import CountMinSketch, SimHashCountBonus
from .nsr import NSRConfig, NSRTrainer, nsr_advantages
from .rnd import RNDBonus, ngram_features

__all__ = [
    "BudgetedReward", "StopOnBudgetCallback", "PolicySuccessCurveCallback", "budgeted_reward_for_run",
    "RNDBonus", "ngram_features", "SimHashCountBonus", "CountMinSketch", "NSRConfig", "NSRTrainer", "nsr_advantages",
]
