"""Negative-sample reinforcement (NSR; Zhu et al., 2025, "The Surprising Effectiveness of Negative Reinforcement in
LLM Reasoning", arXiv 2506.01347) on TRL's GRPOTrainer.

Every failure gets advantage -1, whatever the rest of its group did: no group-mean baseline, no std scaling, so a
group in which every completion fails still pushes probability away from each of them (GRPO gives it 0). Successes
get advantage `positive_weight`: 0 is the paper's NSR (learn from failures only, our default, the same information
BaNEL learns from); 0.1 is the paper's W-REINFORCE; 1 is plain +-1 REINFORCE. Unscored completions (reward `None`,
e.g. beyond the NRE budget) get 0.

TRL 1.16 has no configuration for this: `scale_rewards="none"` removes the std scaling but not the group mean. So
`NSRTrainer` overrides two protected hooks of `GRPOTrainer` and nothing else: `_calculate_rewards` (to keep the
rewards it computes) and `_generate_and_score_completions` (to replace the advantages it returns).
"""

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer


def nsr_advantages(rewards: torch.Tensor, positive_weight: float = 0.0,
                   success_threshold: float = 0.0) -> torch.Tensor:
    """-1 for a failure (reward <= threshold), `positive_weight` for a success, 0 for an unscored (NaN) reward."""
    adv = torch.where(rewards > success_threshold, torch.full_like(rewards, positive_weight),
                      torch.full_like(rewards, -1.0))
    return torch.where(torch.isnan(rewards), torch.zeros_like(rewards), adv)


@dataclass
class NSRConfig(GRPOConfig):
    r"""
    [`~trl.GRPOConfig`] for negative-sample reinforcement.

    Parameters:
        nsr_positive_weight (`float`, *optional*, defaults to `0.0`):
            Advantage of a success (failures always get -1). 0: NSR; 0.1: W-REINFORCE; 1: +-1 REINFORCE.
        nsr_success_threshold (`float`, *optional*, defaults to `0.0`):
            A (weighted, summed) reward strictly above it is a success.
    """

    nsr_positive_weight: float = field(
        default=0.0,
        metadata={"help": "Advantage of a success (failures always get -1). 0: NSR; 0.1: W-REINFORCE; 1: +-1 "
                          "REINFORCE."},
    )
    nsr_success_threshold: float = field(
        default=0.0, metadata={"help": "A (weighted, summed) reward strictly above it is a success."}
    )


class NSRTrainer(GRPOTrainer):
    r"""
    [`~trl.GRPOTrainer`] with NSR advantages (see the module docstring). Takes an [`NSRConfig`]; with a plain
    `GRPOConfig` it uses the defaults (pure NSR, threshold 0).
    """

    _tag_names = ["trl", "grpo", "nsr"]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._nsr_rewards_per_func = rewards_per_func  # gathered over processes, as GRPO normalises them
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        per_func = self._nsr_rewards_per_func
        weights = self.reward_weights.to(per_func.device)
        rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan  # every function said None: unscored
        advantages = nsr_advantages(rewards, getattr(self.args, "nsr_positive_weight", 0.0),
                                    getattr(self.args, "nsr_success_threshold", 0.0))
        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(output["advantages"].device)
        return output
