"""Configuration of [`BaNELTrainer`]."""

import logging
import math
from dataclasses import dataclass, field

import torch

from trl.trainer.base_config import _BaseConfig

logger = logging.getLogger(__name__)


@dataclass
class BaNELConfig(_BaseConfig):
    r"""
    Configuration class for the [`BaNELTrainer`].

    BaNEL (Bayesian Negative Evidence Learning; Lee, Amos and Fanti, 2025) improves a generator on tasks where it
    essentially never succeeds, counting its cost in reward evaluations (NRE). One *round* proposes candidates from the
    generator, rejects those the failure models explain (posterior rejection), sends the survivors to the reward
    oracle, fits a new failure model on the negatives and adds it to the rejection region. Every `distill_every`
    rounds the generator is fine-tuned on posterior samples (ordinary [`~transformers.Trainer`] optimisation steps)
    and the failure models are dropped.

    Most runs set only the budget (`max_reward_evaluations`), `max_completion_length`, the batch sizes and the stop
    rules: the other fields say in their help when to change them. A field whose help starts with "Experimental" is
    not needed by the default round; it is kept to reproduce the paper's round and the example tasks' measured
    settings (`examples/`).

    Only the parameters specific to BaNEL are listed here; every [`~transformers.TrainingArguments`] field also
    applies (`learning_rate`, `per_device_train_batch_size` and `gradient_accumulation_steps` configure the
    distillation steps, `use_cpu`, `report_to`, `save_steps`, `push_to_hub`, ...). `bf16` defaults to `True` where
    the device computes in bfloat16 (a CUDA GPU from Ampere on, an Intel XPU) and to `False` elsewhere, a CPU
    included (TRL's configs default it to `True` and refuse to start on a CPU without `use_cpu=True`).

    Parameters:
        > Budget and rounds

        max_reward_evaluations (`int`, *optional*, defaults to `7500`):
            The NRE budget: the total number of reward-oracle evaluations, a hard cap across all rounds and processes.
        evaluations_per_round (`int`, *optional*, defaults to `25`):
            At most this many accepted candidates are sent to the oracle per round (`m` in the paper); above
            `max_reward_evaluations` it is lowered to it, with a warning. Rounds of 25 with a distillation target of
            0.025 nats found successes on more of the tuning seeds than rounds of 50 at 0.1 (docs/default_round.md).
        num_candidates (`int`, *optional*, defaults to `512`):
            The most proposals drawn from the generator per proposal batch (summed over processes). Each batch is
            sized to what its round (or distillation) still needs at the yield measured so far, with a margin; a
            batch reaches `num_candidates` only when the filter rejects much or proposals repeat known completions.
        max_proposal_batches (`int`, *optional*, defaults to `4`):
            When fewer than the needed candidates survive the filter, propose again up to this many batches per round
            (and per distillation draw).
        num_rounds (`int` or `None`, *optional*, defaults to `None`):
            Stop after this many rounds. `None`: run until the budget is spent.
        max_idle_rounds (`int`, *optional*, defaults to `5`):
            Stop when this many consecutive rounds each fill fewer than half of their evaluation places with new
            evaluations (the filter rejected nearly everything over `max_proposal_batches` batches, or the accepted
            proposals repeat completions already evaluated): the sampler has converged onto known completions, or the
            posterior can no longer be sampled.
        stop_after_successes (`int` or `None`, *optional*, defaults to `None`):
            Stop once the ledger holds this many successes (a resumed run counts the ones it loaded). Checked after
            each round, so the round that finds them still evaluates its batch (up to `evaluations_per_round`).
            `None`: run until the budget is spent.

        > Generation

        max_completion_length (`int`, *optional*, defaults to `32`):
            Maximum number of tokens generated per completion.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the proposals. The likelihoods of the filter are those of the model at
            temperature 1; a temperature other than 1 samples from a tempered generator.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k sampling of the proposals; `0` disables it.
        generation_batch_size (`int`, *optional*, defaults to `512`):
            Number of sequences generated per `generate` call on each process.
        scoring_batch_size (`int`, *optional*, defaults to `512`):
            Number of sequences per teacher-forced forward pass when scoring candidates.

        > Posterior filter

        rejection_threshold (`float`, *optional*, defaults to `0.97`):
            tau, as a ratio in (0, 1]: a candidate is rejected when, for any active failure model `p`,
            `q(y|c) / p(y|c) < tau`. The paper's factors `f = 1/tau` range from 1.032 to 16.
        reject_known_failures (`bool`, *optional*, defaults to `True`):
            Reject outright any candidate whose exact `(prompt, completion)` the ledger holds as a failure: known
            failures are in the rejection region by definition, and rejecting them is free.
        skip_known_successes (`bool`, *optional*, defaults to `False`):
            Give a round's evaluation places only to completions the ledger does not hold: a known success the
            generator proposes again is skipped (it stays in the distillation draws, and in `success_replay`). It
            costs nothing to re-evaluate but teaches nothing, and once the generator concentrates on its first
            successes they fill every place, the round buys nothing new and the run stops as idle with a handful of
            distinct successes. On, the rounds keep evaluating new completions next to them. Off: the paper's round.
        length_normalize (`bool`, *optional*, defaults to `False`):
            Compare per-token mean log-likelihoods instead of sequence log-likelihoods. Off by default: the posterior
            is defined on sequence likelihoods.

        > Failure models

        failure_model (`str`, *optional*, defaults to `"adapter"`):
            `"adapter"`: each failure model is a LoRA adapter on the generator's own weights (one copy of the base
            weights in memory whatever the number of failure models). `"copy"`: a full copy of the generator.
        failure_margin (`float`, *optional*, defaults to `0.0`):
            When above 0, fit each failure model until the mean over its negatives of `log p_fail - log q` reaches
            this many nats, capped at half of `KL(empirical || q)` (the most any model reaches on these negatives),
            or until `failure_epochs` run out; `0` fits every epoch.
        failure_epochs (`int`, *optional*, defaults to `20`):
            Epochs (at most, with `failure_margin`) of maximum-likelihood fitting over the negatives per failure
            model. Many epochs over the same negatives are how BaNEL spends compute instead of oracle calls.
        failure_learning_rate (`float`, *optional*, defaults to `3e-3`):
            Learning rate (AdamW) of the failure-model fit.
        failure_batch_size (`int`, *optional*, defaults to `16`):
            Sequences per optimisation step of the failure-model fit.
        failure_max_grad_norm (`float`, *optional*, defaults to `0.0`):
            Gradient clipping of the failure-model fit (`0` disables it).
        failure_warmup_steps (`int`, *optional*, defaults to `0`):
            Linear learning-rate warm-up steps of each failure-model fit.
        failure_heldout_fraction (`float`, *optional*, defaults to `0.1`):
            Share of each round's negatives kept out of that round's fit to measure how far the fit generalises
            (logged as `failure/heldout_rejected_rate`); they join the next round's fit.
        max_failure_models (`int`, *optional*, defaults to `3`):
            With `keep_failure_models`, the rejection region is the union of the regions of at most this many most
            recent failure models (otherwise every model of the phase is active until the next distillation).
        keep_failure_models (`bool`, *optional*, defaults to `False`):
            Keep the most recent failure models active after a distillation, so that the ratio test filters the
            proposals the oracle sees and not only the distillation draw. `False`: drop them all after each
            distillation (the distilled generator is assumed to carry the region).
        cumulative_negatives (`bool`, *optional*, defaults to `False`):
            Fit each failure model on every negative evaluated so far (all rounds, as sampled) instead of this round's.
        failure_lora_r (`int`, *optional*, defaults to `16`):
            LoRA rank of failure adapters (ignored when the generator is itself a LoRA model: its adapter config is
            reused so that a failure adapter can start as an exact copy of it).
        failure_lora_alpha (`int`, *optional*, defaults to `32`):
            LoRA alpha of failure adapters.
        failure_lora_target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`):
            Modules that carry failure adapters.

        > Distillation

        distill_every (`int`, *optional*, defaults to `1`):
            Distil the posterior into the generator every this many rounds; `0` never distils (the policy is not
            updated and the failure models accumulate).
        distill_samples (`int`, *optional*, defaults to `512`):
            Posterior samples drawn (with no oracle call) for each distillation, summed over processes.
        distill_steps (`int`, *optional*, defaults to `8`):
            Optimiser steps per distillation; each uses `per_device_train_batch_size * gradient_accumulation_steps`
            posterior samples per process, cycling through the drawn samples.
        distill_objective (`str`, *optional*, defaults to `"auto"`):
            `"posterior"`: maximum likelihood on posterior samples (the paper's distillation). `"baselined"`: every
            proposal of the draw, weighted `1/Z - 1` when accepted and `-1` when rejected (`Z`: the acceptance rate).
            Both have the gradient of `-KL(posterior || generator)` in expectation, but maximum likelihood on the
            generator's own samples is also a random walk (finite samples, even where the filter rejects nothing),
            while the baselined weights are all 0 where nothing is rejected: the generator moves only where the
            failure models act. `"exact"` (while the ledger holds no success; then `"posterior"`): the posterior's
            log-likelihood split into the proposal distribution's (each sampled token replaced by its expectation: a
            per-token cross-entropy to the proposal distribution), minus the known failures' (their exact
            probability mass, drawn in proportion to it) and the ratio-rejected proposals'
            (`trl_banel.exact_distillation`). Same expected gradient as `"posterior"`, without its sampling drift:
            with no region and no prefix evidence the gradient is exactly 0. Keeps each micro-batch's next-token
            distributions (batch x completion length x vocabulary) as targets where they fit in 64M values, else
            sparse ones (each position's 256 most probable tokens and the rest of the mass). `"auto"`: `"exact"`,
            with whole or sparse targets, decided when the trainer is built (logged; `trainer.distill_objective`
            holds the choice, `args` stay as given).
        distill_target_kl (`float`, *optional*, defaults to `0.025`):
            When above 0, the distillation's learning rate is set by what each distillation moved the generator: the
            KL from the generator before a distillation to after it (sequence level, nats, estimated on 64 fresh
            proposals) is measured, and the learning rate scaled by `clip(sqrt(target / measured), 1/4, 4)` for the
            next one (`trl_banel.distill.StepSize`). `learning_rate` is then only the first distillation's: the same
            setting serves a 30k-parameter model and a large one. `0`: the learning rate stays `learning_rate`.
            Each distillation's target is logged as `distill/kl_target` (see `distill_posterior_bound`).
        distill_posterior_bound (`bool`, *optional*, defaults to `False`):
            Experimental. With the exact objective, each distillation's target KL is at most `-log Z`, `Z` the share
            of the proposals the posterior keeps: the posterior's own distance from the generator. A move beyond it
            is noise, and noise lowers the expected log-probability of every string, the successes' too
            (docs/default_round.md: measured on two shipped tasks, not yet on the evaluation set).
        distill_idle_kl_growth (`float`, *optional*, defaults to `4.0`):
            Each consecutive idle round (see `max_idle_rounds`) multiplies the next distillation's target KL by this
            factor (the learning rate follows at once, by its square root), never past the posterior's own distance
            `-log Z` (`Z` the share of the proposals it keeps) and never below `distill_target_kl`; a round that
            fills its places resets it. When evaluations cover the generator's mass faster than distillations held
            to `distill_target_kl` move it, every proposal becomes a known failure and the run stops idle with
            nothing found (the shipped digits task, 2 of 3 seeds, before it was on); growing steps move it off them
            first. A run with no idle round is unchanged by it. `1`: off (docs/default_round.md).
        distill_max_learning_rate (`float`, *optional*, defaults to `1e-2`):
            Experimental. The largest learning rate the step size (`distill_target_kl`) may set. With Adam a step moves
            each parameter by about the learning rate, so 1e-2 is already large; with `optim="sgd"` a step's size
            follows the gradient's, and the rate that reaches the target can be far above it.
        distill_backoff_factor (`float`, *optional*, defaults to `3.0`):
            When above 0 (with `distill_target_kl`), a distillation measured to have moved the generator by more than
            `distill_backoff_factor` times its target (`distill_target_kl`, or less: see there) is pulled back along
            its own update, `theta0 + a (theta1 - theta0)` with `a = sqrt(target / measured)`, so that no single
            distillation moves the generator far beyond the target however the step size misjudged it (the move that
            is left is measured again; `distill/backoff` logs `a`). Keeps a copy of the trainable weights on the CPU
            during a distillation; not under DeepSpeed, whose engine keeps its own copy of the weights.
        distill_kl_coef (`float`, *optional*, defaults to `0.0`):
            Weight of a per-token `KL(generator || pretrained)` term in the distillation loss, on the posterior
            samples' positions (TRL's `beta`): it keeps the generator on the pretrained model's support and rewards its
            entropy, so that repeated distillation on finite samples neither drifts onto outputs the pretrained model
            never makes nor collapses. Needs a frozen copy of the pretrained generator (none for a LoRA generator: its
            adapter is disabled instead).
        support_min_p (`float`, *optional*, defaults to `0.0`):
            Reject a proposal (before the oracle, and from the distillation's samples) if any of its tokens has, under
            the pretrained generator, a probability below `support_min_p` times that of the pretrained generator's
            most likely token at its position: min-p on the pretrained model's support, so that the search stays on
            outputs the pretrained model could write however far the generator moved. Costs one forward of the
            pretrained generator per batch of proposals and, for a generator without LoRA, a frozen copy of its
            weights. 0 turns it off. Logged as `filter/off_support_rate`. Not for tasks whose successes lie off the
            pretrained support: the digits demo's first six holds a token 17.6 nats below the pretrained generator's
            most likely one, which any useful `support_min_p` rejects.
        success_replay (`float` or `None`, *optional*, defaults to `None`):
            Share of each distillation's samples replaced by the successes found so far (all of them in turn, or a
            seeded draw among them when there are more than the share holds; with the `"posterior"` objective). BaNEL's
            posterior treats every output outside the rejection region alike; a known success is more: it is a sample
            of the distribution the user wants (the generator conditioned on success), so distilling on it is maximum
            likelihood towards that target. It turns a success found by exploration into a generator that keeps
            producing it, instead of leaving it to the next rounds' drift. `0` distils posterior samples only (the
            paper's method). `None` (the default): 0.5, or 0 with the `"baselined"` objective (which has no samples
            to replace).
        save_best_generator (`bool`, *optional*, defaults to `True`):
            Keep the best round's generator: before each distillation, if the candidates evaluated since the last one
            have the highest success rate so far (by the lower end of its 95% Clopper-Pearson interval, at least one
            success), save the generator that proposed them to `output_dir/best_generator`. The selection reads
            evaluations already made for training: it never calls the reward functions. `trainer.best_generator`
            says which round it is.

        > Rewards

        success_threshold (`float`, *optional*, defaults to `0.0`):
            A reward strictly above this value is a success; anything else is a failure.
        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of the reward functions when several are given (the reward is their weighted sum); `None`: all 1.
        reward_retries (`int`, *optional*, defaults to `2`):
            A reward function that raises (or times out) is retried this many times before the run stops.
        reward_retry_backoff (`float`, *optional*, defaults to `1.0`):
            Seconds to wait before the first retry; doubled for each further retry.
        reward_timeout (`float` or `None`, *optional*, defaults to `None`):
            Seconds one reward-function call may take before it counts as failed (and is retried); `None`: no limit.
        reevaluate_interrupted (`bool`, *optional*, defaults to `False`):
            Evaluations that were in flight when a run crashed were, or may have been, paid for: they are always
            charged to the budget and their rewards are unknown. `False`: never send them again. `True`: at the start
            of the resumed run, send them to the oracle again and record their rewards, each charged a second time.

        > Runtime

        torch_num_threads (`int` or `None`, *optional*, defaults to `None`):
            torch threads of a run on the CPU (process-wide, `torch.set_num_threads`). `None`: a model under 10M
            parameters runs with one thread unless `OMP_NUM_THREADS` or `torch.set_num_threads` already chose a count
            (small models are several times faster on one thread); larger models keep torch's default.
        save_every_minutes (`float` or `None`, *optional*, defaults to `30`):
            Also save a checkpoint when this many minutes of wall time have passed since the last one (at the end of
            the step that passes it), whatever `save_steps` says, so that a killed run loses at most that much
            training. `None`: only `save_strategy` decides. Nothing is saved with `save_strategy="no"`. A run stopped
            by SIGINT or SIGTERM saves one at its next safe point in any case (unless `save_strategy="no"`).
    """


    # Overrides of TrainingArguments defaults
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Learning rate of the first distillation (AdamW); distill_target_kl sets the next ones'. "
                          "Leave it: change it only if the first distillations warn that the generator barely "
                          "moves."},
    )
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule of the distillation steps. Constant by default: the number of steps "
                    "depends on how fast the budget is spent and is not known in advance. Leave it."
        },
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X distillation steps (or rounds). Raise it "
                                                              "for shorter logs."})
    # None, not False: transformers (>= 5.22) warns that the name is deprecated whenever it is set; None is off
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Enable gradient checkpointing in the distillation steps (None: off). Turn "
                                        "it on when a distillation step runs out of memory."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep every dataset column: they are passed to the reward functions. Leave it: the reward "
                          "functions need the columns."},
    )
    dataloader_pin_memory: bool = field(
        default=False,
        metadata={"help": "Off: the training dataloader carries only prompt rows (a round builds its own tensors), "
                          "nothing worth pinning. Leave it."},
    )

    # Budget and rounds
    max_reward_evaluations: int = field(
        default=7500,
        metadata={"help": "The NRE budget: total reward evaluations, a hard cap across rounds and processes. Set it "
                          "to the evaluations you can pay for."},
    )
    evaluations_per_round: int = field(
        default=25, metadata={"help": "At most this many accepted candidates go to the oracle per round (m). Lower "
                                      "it (10) for budgets under about 250, so that the run has rounds to learn in."}
    )
    num_candidates: int = field(
        default=512, metadata={"help": "The most proposals per proposal batch (summed over processes); each batch is "
                                       "sized to what is still needed at the measured yield. Raise it when rounds "
                                       "cannot fill their places (a logged round/places_filled well below 1)."}
    )
    max_proposal_batches: int = field(
        default=4,
        metadata={"help": "Experimental (the default round does not need it): Proposal batches per round (or "
                          "distillation draw) while too few candidates survive."},
    )
    num_rounds: int | None = field(
        default=None, metadata={"help": "Stop after this many rounds; None runs until the budget is spent. Set it to "
                                        "bound wall time instead of the budget."}
    )
    max_idle_rounds: int = field(
        default=5,
        metadata={"help": "Stop after this many consecutive rounds that each fill fewer than half of their "
                          "evaluation places with new evaluations (the sampler converged onto known completions). "
                          "Leave it."},
    )
    stop_after_successes: int | None = field(
        default=None,
        metadata={"help": "Stop once this many successes are found (checked after each round); None spends the "
                          "budget. Set it when a few successes are all you need."},
    )

    # Generation
    max_completion_length: int = field(default=32, metadata={"help": "Maximum generated tokens per completion. Set "
                                                                     "it to the length of a useful answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the proposals. Leave it at "
                                                              "1: the filter's likelihoods are the generator's at "
                                                              "temperature 1."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the proposals; 0 disables it. Leave it at 0, "
                                                    "for the same reason."})
    generation_batch_size: int = field(
        default=512, metadata={"help": "Sequences per generate call on each process. Lower it when generation runs "
                                       "out of memory."}
    )
    scoring_batch_size: int = field(
        default=512, metadata={"help": "Sequences per teacher-forced forward pass when scoring candidates. Lower it "
                                       "when scoring runs out of memory."}
    )

    # Posterior filter
    rejection_threshold: float = field(
        default=0.97,
        metadata={
            "help": "Experimental (the default round does not need it): tau in (0, 1]: reject a candidate when "
                    "q(y|c) / p(y|c) < tau for any active failure model p."
        },
    )
    reject_known_failures: bool = field(
        default=True, metadata={"help": "Reject outright candidates the ledger already holds as failures. Leave it "
                                        "on: rejecting a known failure is free and never wrong."}
    )
    skip_known_successes: bool = field(
        default=False, metadata={"help": "Give a round's evaluation places only to completions the ledger does not "
                                         "hold (known successes proposed again are skipped, still distilled). Turn "
                                         "it on when you want many distinct successes rather than the first ones "
                                         "kept."}
    )
    length_normalize: bool = field(
        default=False, metadata={"help": "Experimental (the default round does not need it): Compare per-token mean "
                                         "log-likelihoods instead of sequence ones."}
    )

    # Failure models
    failure_model: str = field(
        default="adapter",
        metadata={
            "help": "'adapter': LoRA adapters on the generator's shared weights; 'copy': a full copy per model. Use "
                    "'copy' only for a model that cannot carry LoRA adapters.",
            "choices": ["adapter", "copy"],
        },
    )
    failure_margin: float = field(
        default=0.0,
        metadata={"help": "Experimental (the default round does not need it): Fit each failure model until mean(log "
                          "p_fail - log q) over its negatives reaches this (nats), or failure_epochs run out; 0 "
                          "fits every epoch."},
    )
    failure_epochs: int = field(
        default=20, metadata={"help": "Experimental (the default round does not need it): Epochs (at most, with "
                                      "failure_margin) of the MLE fit of each failure model."}
    )
    failure_learning_rate: float = field(
        default=3e-3, metadata={"help": "Experimental (the default round does not need it): Learning rate (AdamW) of "
                                        "the failure-model fit."}
    )
    failure_batch_size: int = field(
        default=16, metadata={"help": "Experimental (the default round does not need it): Sequences per optimisation "
                                      "step of the failure-model fit."}
    )
    failure_max_grad_norm: float = field(
        default=0.0, metadata={"help": "Experimental (the default round does not need it): Gradient clipping of the "
                                       "failure-model fit; 0 disables it."}
    )
    failure_warmup_steps: int = field(
        default=0, metadata={"help": "Experimental (the default round does not need it): Linear learning-rate "
                                     "warm-up steps of each failure-model fit."}
    )
    failure_heldout_fraction: float = field(
        default=0.1,
        metadata={"help": "Experimental (the default round does not need it): Share of a round's negatives kept out "
                          "of its fit to measure generalisation; they join the next fit."},
    )
    max_failure_models: int = field(
        default=3,
        metadata={"help": "Experimental (the default round does not need it): With keep_failure_models: the region "
                          "is the union of at most this many recent models."},
    )
    keep_failure_models: bool = field(
        default=False,
        metadata={"help": "Experimental (the default round does not need it): Keep the recent failure models active "
                          "after a distillation (False: drop them all)."},
    )
    cumulative_negatives: bool = field(
        default=False,
        metadata={"help": "Experimental (the default round does not need it): Fit each failure model on all "
                          "negatives so far (as sampled) instead of this round's."},
    )
    failure_lora_r: int = field(default=16, metadata={"help": "Experimental (the default round does not need it): "
                                                              "LoRA rank of the failure adapters."})
    failure_lora_alpha: int = field(default=32, metadata={"help": "Experimental (the default round does not need "
                                                                  "it): LoRA alpha of the failure adapters."})
    failure_lora_target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "Experimental (the default round does not need it): Modules that "
                                                "carry failure adapters."}
    )

    # Distillation
    distill_every: int = field(
        default=1, metadata={"help": "Experimental (the default round does not need it): Distil the posterior into "
                                     "the generator every N rounds; 0 never."}
    )
    distill_samples: int = field(
        default=512, metadata={"help": "Experimental (the default round does not need it): Posterior samples drawn "
                                       "per distillation (summed over processes)."}
    )
    distill_steps: int = field(default=8, metadata={"help": "Experimental (the default round does not need it): "
                                                            "Optimiser steps per distillation."})
    distill_objective: str = field(
        default="auto",
        metadata={"help": "'posterior': MLE on posterior samples; 'baselined': every proposal weighted 1/Z - 1 if "
                          "accepted, -1 if rejected (same expected gradient, no drift where nothing is rejected); "
                          "'exact': the posterior's log-likelihood with each part computed exactly where it can be "
                          "(per-token expectations under the proposal distribution, the known failures' exact mass; "
                          "trl_banel.exact_distillation), no sampling drift; 'auto': 'exact' (whole next-token "
                          "distributions as targets where a micro-batch's fit in 64M values, else each position's "
                          "256 most probable tokens and the rest of the mass). Leave it at 'auto'; 'posterior' "
                          "reproduces the paper's distillation.",
                  "choices": ["posterior", "baselined", "exact", "auto"]},
    )
    distill_target_kl: float = field(
        default=0.025,
        metadata={"help": "Adapt the distillation learning rate so that each distillation moves the generator by "
                          "about this KL (nats, sequence level, measured on fresh proposals); 0: fixed "
                          "learning_rate. Leave it; 0 with a hand-set learning_rate gives a fixed step size."},
    )
    distill_posterior_bound: bool = field(
        default=False,
        metadata={"help": "Experimental: with the exact objective, bound each distillation's target KL by the "
                          "posterior's own distance from the generator, -log of the share of proposals it keeps "
                          "(a larger move is noise)."},
    )
    distill_idle_kl_growth: float = field(
        default=4.0,
        metadata={"help": "Each consecutive idle round multiplies the next distillation's target KL by this factor "
                          "(at most the posterior's distance -log Z), so that a generator whose every proposal is a "
                          "known failure is moved off them before the idle stop. Leave it; 1 turns it off."},
    )
    distill_max_learning_rate: float = field(
        default=1e-2,
        metadata={"help": "Experimental: the largest learning rate the step size (distill_target_kl) may set; with "
                          "optim='sgd' the rate that reaches the target can be far above Adam's 1e-2."},
    )
    distill_backoff_factor: float = field(
        default=3.0,
        metadata={"help": "A distillation measured to have moved the generator by more than this multiple of "
                          "distill_target_kl is pulled back along its update to about the target (without it, one "
                          "distillation in ten moved the generator more than 5x the target). Leave it; 0 turns it "
                          "off."},
    )
    distill_kl_coef: float = field(
        default=0.0,
        metadata={"help": "Experimental (the default round does not need it): Weight of KL(generator || pretrained) "
                          "per token in the distillation loss; 0 disables it."},
    )
    support_min_p: float = field(
        default=0.0,
        metadata={"help": "Experimental (off in the default round): Reject proposals with a token whose probability "
                          "under the pretrained generator is below this multiple of its most likely token's (min-p "
                          "on the pretrained support); 0 disables it. At 1e-2 it kept subword runs on the format but "
                          "found no more successes on the evaluation tasks; never set it where success needs tokens "
                          "the pretrained model all but never picks (the digits demo's six: 17.6 nats below)."},
    )
    success_replay: float | None = field(
        default=None,
        metadata={"help": "Share of each distillation's samples replaced by the successes found so far (0: "
                          "posterior samples only, the paper's distillation); None: 0.5, or 0 with the baselined "
                          "objective. Leave it; 0 reproduces the paper's distillation."},
    )
    evidence_pseudo_count: float = field(
        default=0.0,
        metadata={"help": "Experimental (the default round does not need it): Negative evidence on prefixes: "
                          "proposals are drawn with each next token's probability multiplied by k / (k + n), n the "
                          "evaluated failures whose completion starts with that prefix and k this setting (a Beta "
                          "prior's pseudo-counts per prefix), then renormalised. Moves what the oracle sees into "
                          "the generator's untried branches; 0 disables it."},
    )
    distill_before_success: bool = field(
        default=True,
        metadata={"help": "Experimental (the default round does not need it): Distil before the first success is "
                          "found. False keeps the generator (the prior) fixed until the ledger holds a success: no "
                          "self-distillation drift; the search is shaped by the filter and the prefix evidence "
                          "alone."},
    )
    save_best_generator: bool = field(
        default=True,
        metadata={"help": "Save the generator of the phase with the best success rate among its training "
                          "evaluations (no extra oracle calls) to output_dir/best_generator. Turn it off to save "
                          "disk."},
    )

    # Rewards
    success_threshold: float = field(
        default=0.0, metadata={"help": "A reward strictly above this value is a success. Set it to your reward's "
                                       "success level."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of several reward functions (weighted sum); None: all 1. Set it "
                                        "when several reward functions count differently."}
    )
    reward_retries: int = field(
        default=2, metadata={"help": "Retries of a reward function that raises or times out, then stop. Raise it for "
                                     "an oracle that fails transiently."}
    )
    reward_retry_backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry; doubled for each further retry. Raise it for "
                                       "an oracle with rate limits."}
    )
    reward_timeout: float | None = field(
        default=None, metadata={"help": "Seconds a reward-function call may take; None: no limit. Set it for an "
                                        "oracle that can hang."}
    )
    reevaluate_interrupted: bool = field(
        default=False,
        metadata={"help": "On resume, send again (charged again) the evaluations a crash cut short; False: they "
                          "stay charged, unrecorded, and are never sent again. Turn it on only if an interrupted "
                          "evaluation may not have been paid for."},
    )

    # Runtime
    torch_num_threads: int | None = field(
        default=None,
        metadata={"help": "torch threads on the CPU; None: 1 for models under 10M parameters unless OMP_NUM_THREADS "
                          "or torch.set_num_threads chose, else torch's default. Set it when several runs share one "
                          "CPU."},
    )
    save_every_minutes: float | None = field(
        default=30.0,
        metadata={"help": "Also checkpoint after this many minutes of wall time since the last checkpoint (not with "
                          "save_strategy='no'); None: save_strategy alone decides. Lower it for runs on preemptible "
                          "machines."},
    )

    def __post_init__(self):
        if self.bf16 is None:  # bf16 where the device supports it (TRL's default would refuse to start on a CPU)
            self.bf16 = not self.fp16 and not self.use_cpu and bf16_supported()
        super().__post_init__()
        self.validate()

    def validate(self):
        r"""
        Check every BaNEL setting (and the TrainingArguments ones that could not train) and set the derived fields.

        Called by `__post_init__`; call it again after changing fields of a built config. Raises a `ValueError` naming
        the field. Derived: `max_steps`, when not given, is an upper bound on the distillation steps (the run stops
        when the budget, `num_rounds` or `max_idle_rounds` says so, usually much earlier); re-derived here as long as
        it was not set by hand since.
        """
        if self.success_replay is None:  # the default: replay found successes wherever the objective can
            self.success_replay = 0.0 if self.distill_objective == "baselined" else 0.5
        self._check_fields()
        derived = getattr(self, "_derived_max_steps", None)
        if self.max_steps is None or self.max_steps <= 0 or self.max_steps == derived:
            max_rounds = self.num_rounds or (self.max_reward_evaluations + self.max_idle_rounds)
            phases = max_rounds if self.distill_every == 0 else math.ceil(max_rounds / self.distill_every)
            self.max_steps = self._derived_max_steps = phases * (1 if self.distill_every == 0 else self.distill_steps)

    def _check_fields(self):
        self._check_search_fields()
        self._check_training_fields()
        self._check_reward_fields()

    def _bad(self, name: str, valid: str):
        raise ValueError(f"BaNELConfig.{name}={getattr(self, name)!r} is invalid: it must be {valid}.")

    def _check_at_least(self, name: str, low: float, strict: bool = False, note: str = ""):
        """A finite number `>= low` (`> low` with `strict`)."""
        value = getattr(self, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (strict and value == low):
            self._bad(name, f"a finite number {'>' if strict else '>='} {low:g}{note}")

    def _check_search_fields(self):
        """The budget, the rounds, the proposals and the failure models."""
        bad = self._bad
        tau = self.rejection_threshold
        if not isinstance(tau, (int, float)) or not math.isfinite(tau) or not 0 < tau <= 1:
            bad("rejection_threshold", "a ratio tau with 0 < tau <= 1")
        if not _is_int(self.max_reward_evaluations) or self.max_reward_evaluations < 1:
            bad("max_reward_evaluations", "an integer >= 1")
        if not _is_int(self.evaluations_per_round) or self.evaluations_per_round < 1:
            bad("evaluations_per_round", "an integer >= 1")
        if self.evaluations_per_round > self.max_reward_evaluations:  # a round cannot spend more than the budget
            logger.warning("evaluations_per_round=%d is above max_reward_evaluations=%d: using %d (the whole budget "
                           "in one round; lower evaluations_per_round to spend it over several rounds).",
                           self.evaluations_per_round, self.max_reward_evaluations, self.max_reward_evaluations)
            self.evaluations_per_round = self.max_reward_evaluations
        for name in ("num_candidates", "max_proposal_batches", "max_idle_rounds", "max_completion_length",
                     "generation_batch_size", "scoring_batch_size", "failure_epochs", "failure_batch_size",
                     "failure_lora_r", "failure_lora_alpha", "distill_samples", "distill_steps",
                     "max_failure_models"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if self.num_rounds is not None and self.num_rounds < 1:
            bad("num_rounds", "None or an integer >= 1")
        for name in ("stop_after_successes", "torch_num_threads"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                bad(name, "None or an integer >= 1")
        if self.distill_every < 0:
            bad("distill_every", "an integer >= 0 (0 never distils)")
        if not self.temperature > 0:
            bad("temperature", "> 0")
        if self.top_k < 0:
            bad("top_k", ">= 0 (0 disables top-k)")
        if self.distill_objective not in ("posterior", "baselined", "exact", "auto"):
            bad("distill_objective", "'posterior', 'baselined', 'exact' or 'auto'")
        if not isinstance(self.success_replay, (int, float)) or not 0 <= self.success_replay < 1:
            bad("success_replay", "a share with 0 <= share < 1 (0 disables it)")
        if self.success_replay > 0 and self.distill_objective == "baselined":
            bad("success_replay", "0 with distill_objective='baselined' (replay needs the 'posterior' or 'exact' "
                                  "objective)")
        if self.failure_model not in ("adapter", "copy"):
            bad("failure_model", "'adapter' or 'copy'")

    def _check_training_fields(self):
        """The optimisation: TrainingArguments fields that transformers accepts but that cannot train are refused
        here, by name, rather than as a NaN loss or an empty batch much later; and the failure fit's."""
        bad = self._bad
        for name in ("learning_rate", "failure_learning_rate", "adam_epsilon", "distill_max_learning_rate"):
            self._check_at_least(name, 0, strict=True)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "a number with 0 <= beta < 1")
        if str(getattr(self.save_strategy, "value", self.save_strategy)) == "steps" and not self.save_steps > 0:
            bad("save_steps", "> 0 with save_strategy='steps' (or set save_strategy='no')")
        for name in ("weight_decay", "max_grad_norm", "failure_margin", "failure_max_grad_norm", "distill_kl_coef",
                     "evidence_pseudo_count", "distill_target_kl"):
            self._check_at_least(name, 0)
        self._check_at_least("distill_idle_kl_growth", 1, note=" (1: off)")
        if not 0 <= self.support_min_p < 1:
            bad("support_min_p", "0 (off) or a probability ratio with 0 < ratio < 1, such as 1e-3")
        if not (self.distill_backoff_factor == 0 or self.distill_backoff_factor > 1):
            bad("distill_backoff_factor", "0 (off) or a multiple > 1 of distill_target_kl")
        if not isinstance(self.failure_warmup_steps, int) or self.failure_warmup_steps < 0:
            bad("failure_warmup_steps", "an integer >= 0")
        if not 0 <= self.failure_heldout_fraction < 1:
            bad("failure_heldout_fraction", "a share with 0 <= share < 1")

    def _check_reward_fields(self):
        bad = self._bad
        if not math.isfinite(self.success_threshold):
            bad("success_threshold", "a finite number")
        if not _is_int(self.reward_retries) or self.reward_retries < 0:
            bad("reward_retries", "an integer >= 0")
        if self.reward_retry_backoff < 0:
            bad("reward_retry_backoff", ">= 0")
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            bad("reward_timeout", "None or > 0 seconds")
        if self.reward_weights is not None and any(not math.isfinite(w) for w in self.reward_weights):
            bad("reward_weights", "None or a list of finite numbers")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bf16_supported() -> bool:
    """Whether this machine has an accelerator that computes in bfloat16 (a CUDA GPU from Ampere on, or an Intel XPU);
    on a CPU bfloat16 is slower than float32, so it is left off."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()
