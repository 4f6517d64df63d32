"""BaNELTrainer: Bayesian Negative Evidence Learning as a TRL trainer.

One round: propose -> filter (posterior rejection) -> evaluate (ledger) -> fit a failure model -> grow the region.
Every `distill_every` rounds: draw posterior samples and distil them into the generator with ordinary Trainer
optimisation steps, then drop the failure models. The rounds run inside `_prepare_inputs` whenever the distillation
buffer is empty, the way TRL's online trainers generate there, so `train()`, checkpoints, logging, gradient
accumulation and DeepSpeed all come from `transformers.Trainer`. Each step has its module: `generation` and
`sampler` (propose, filter), `oracle_gate`, `region` (the failure fit), `distill`, `history`; `distributed` keeps the
processes in step and times the phases. The trainer holds what the rounds change: the negatives, the failure models'
lifetime, the metrics and the history.
"""

import logging
import os
import textwrap
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedTokenizerBase
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.base_trainer import _BaseTrainer

from .callbacks import add_banel_callbacks
from .config import BaNELConfig
from .distill import (Distiller, better_phase, distillation_loss, frozen_copy, pretrained_generator, skipped,
                      stop_reason)
from .distributed import PhaseTimer, is_zero3, mean_over_ranks, sum_over_ranks
from .exact_distillation import choose_objective, to_device
from .failure import FailureModels
from .generation import TransformersGeneration
from .history import log_round, metric_means, round_record
from .inputs import check_dataset, identity, load_model, prepare_tokenizer, resolve_args
from .ledger import LEDGER_FILENAME, RewardFunctionError, RewardLedger
from .oracle import RewardOracle
from .oracle_gate import OracleGate
from .region import FailureRegion
from .runs import (copy_model_card, describe_resume, finished_info, interrupted_line, load_state, mark_finished,
                   refuse_rerun, resolve_checkpoint, save_state_last)
from .sampler import Candidate, Sampler
from .stats import SuccessEstimate
from .threads import configure_cpu_threads

logger = logging.getLogger(__name__)

BEST_GENERATOR_DIR = "best_generator"


class BaNELTrainer(_BaseTrainer):
    r"""
    Trainer for BaNEL (Bayesian Negative Evidence Learning), from the paper [BaNEL: Exploration Posteriors for
    Generative Modeling Using Only Negative Rewards](https://huggingface.co/papers/2510.09596).

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The generator `q` to improve: a Hub id or local path (loaded with `AutoModelForCausalLM`), or a model.
        reward_funcs (`Callable` or `list[Callable]`):
            The reward oracle, in TRL's convention: `f(prompts, completions, **columns) -> list[float | None]`, sync or
            async; several are summed (weighted by `args.reward_weights`). A reward above `args.success_threshold`
            is a success. Every distinct `(prompt, completion)` sent to it costs one reward evaluation.
        args ([`BaNELConfig`], *optional*):
            Configuration; defaults to `BaNELConfig(f"{model_name}-BaNEL")`.
        train_dataset ([`~datasets.Dataset`]):
            Prompts: a `"prompt"` column of text or conversations (as in TRL); other columns are passed to the
            reward functions. For unconditional generation use a single row with an empty prompt.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer; loaded from the model's path when omitted. Without a pad token, the EOS token is used.
        peft_config ([`~peft.PeftConfig`], *optional*):
            Train the generator as a LoRA adapter. Failure adapters then start as copies of it.
        callbacks (`list[TrainerCallback]`, *optional*), optimizers (*optional*):
            As in [`~transformers.Trainer`]; the optimizer updates the generator during distillation.
    """

    _tag_names = ["trl", "banel"]
    _name = "BaNEL"
    _paper = {
        "title": "BaNEL: Exploration Posteriors for Generative Modeling Using Only Negative Rewards",
        "id": "2510.09596",
        "citation": textwrap.dedent("""\
            @article{lee2025banel,
                title        = {{BaNEL: Exploration Posteriors for Generative Modeling Using Only Negative Rewards}},
                author       = {Sangyun Lee and Brandon Amos and Giulia Fanti},
                year         = 2025,
                eprint       = {arXiv:2510.09596},
            }"""),
    }
    loss_is_scaled_for_ga = False

    def __init__(self, model, reward_funcs, args: BaNELConfig | None = None, train_dataset: Dataset | None = None,
                 processing_class: PreTrainedTokenizerBase | None = None, peft_config: PeftConfig | None = None,
                 callbacks=None, optimizers=(None, None)):
        args = resolve_args(model, args)
        model = load_model(model, peft_config)
        processing_class = prepare_tokenizer(processing_class, model)
        check_dataset(train_dataset, processing_class)
        self.oracle = RewardOracle.from_config(reward_funcs, args)
        super().__init__(model=model, args=args, data_collator=identity, train_dataset=train_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.interrupts = add_banel_callbacks(self)  # SIGINT/SIGTERM: train() installs it, the rounds ask it
        if self.accelerator.device.type == "cpu":
            configure_cpu_threads(model, args.torch_num_threads)
        self._metrics = defaultdict(list)
        self._build_round()
        self._resolve_objective()
        self._pending_state = None
        self._buffer: list[dict] = []
        self._finished = False
        self.stop_reason: str | None = None  # why the rounds stopped, for the console and the user
        self._idle_rounds = 0
        self._rounds_in_phase = 0
        self.history: list[dict] = []  # one entry per round: nre, successes, acceptance (for plots)
        self.best_generator: dict | None = None  # the best phase's generator (see save_best_generator)

    def _build_round(self):
        """The ledger and the parts of a round: the oracle gate, the failure models, the sampler, the region."""
        args, accelerator = self.args, self.accelerator
        path = os.path.join(args.output_dir, LEDGER_FILENAME) if accelerator.is_main_process else None
        self.ledger = RewardLedger(path, args.max_reward_evaluations, args.success_threshold)
        self.gate = OracleGate(self.ledger, self.oracle, self.train_dataset, accelerator, lambda: self.state)
        self.gate.sync_from_main()
        self.round = max((r.round for r in self.ledger.records), default=-1) + 1
        zero3 = is_zero3(accelerator, self.is_deepspeed_enabled)
        self._build_failure_models(zero3)
        # wall seconds per phase (see PhaseTimer), logged as `time/<phase>` (seconds since the previous log)
        self.timer = PhaseTimer()
        self.phase_seconds = self.timer.seconds
        policy = accelerator.unwrap_model(self.model)
        # every completion of the run comes from this one call (trl_banel.generation: where a faster engine would go)
        generation = TransformersGeneration(args, self.processing_class, accelerator, lambda: self.model_wrapped,
                                            self.failures, zero3)
        self.sampler = Sampler(args, self.processing_class, self.train_dataset, accelerator, self.failures,
                               self.ledger, generation, self.timer,
                               np.random.default_rng(args.seed + accelerator.process_index),
                               getattr(policy.config, "max_position_embeddings", None),
                               partial(pretrained_generator, policy, policy, self._reference))
        self.region = FailureRegion(self.failures, args, accelerator, self.sampler.collate, self.timer)
        self.distiller = Distiller(self.sampler, self.failures, self.ledger, args, accelerator)
        self.negatives: list[Candidate] = []  # every negative evaluated (the fit's with cumulative_negatives)

    def _resolve_objective(self):
        """`distill_objective="auto"` decided once, from the vocabulary and the longest of the first prompts; the
        distiller holds the choice (`args` stay as the user gave them)."""
        if self.args.distill_objective != "auto":
            return
        policy = self.accelerator.unwrap_model(self.model)
        try:
            prompt_tokens = max(len(self.sampler.encoded_prompt(r)[2])
                                for r in range(min(len(self.train_dataset), 256)))
        except ValueError:  # a prompt too long for the model: the first round says so, with the fix
            prompt_tokens = 0
        self.distiller.objective, why = choose_objective(self.args, policy.config.vocab_size, prompt_tokens)
        logger.info(why)

    @property
    def distill_objective(self) -> str:
        """The distillation objective this run uses (`distill_objective="auto"` resolved)."""
        return self.distiller.objective

    def _build_failure_models(self, zero3: bool):
        """The failure models, and the frozen pretrained generator that `distill_kl_coef` and `support_min_p` need."""
        args, policy = self.args, self.accelerator.unwrap_model(self.model)
        self.failures = FailureModels.from_config(policy, args, self.accelerator, zero3)
        # the pretrained generator, for distill_kl_coef and support_min_p (a LoRA generator needs no copy)
        self._reference = None
        if (args.distill_kl_coef > 0 or args.support_min_p > 0) and not isinstance(policy, PeftModel):
            self._reference = frozen_copy(policy, self.accelerator, zero3)

    # -- Trainer hooks -------------------------------------------------------------------------------------------
    @property
    def distilling(self) -> bool:
        """Whether steps of the current distillation are still to run (callbacks that measure the generator wait)."""
        return bool(self._buffer)

    @property
    def reference_model(self):
        """The frozen pretrained generator of `distill_kl_coef` and `support_min_p`; `None` without them or for a LoRA
        generator (its adapter is disabled instead)."""
        return self._reference

    @property
    def finished(self) -> bool:
        """Whether the rounds are over (budget, stop rule or idle): `train()` ends once the last distillation is applied."""
        return self._finished

    @property
    def evidence(self):
        """Failures per completion prefix ([`~trl_banel.evidence.PrefixEvidence`]): every negative recorded so far
        (all of them after a resume, once training started). Kept only with `evidence_pseudo_count > 0`: a trie of
        long completions is large."""
        return self.sampler.evidence

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def _prepare_inputs(self, inputs):
        if self._pending_state is not None:
            self._restore_pending_state()
        if not self._buffer:
            self._fill_buffer()
        return self._buffer.pop(0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # a step = (a round when the buffer is empty, timed by phase inside) + one distillation micro-batch
        with self.timer.outside("distill"):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("BaNELTrainer does not return outputs from compute_loss.")
        if inputs.get("skip"):
            # No distillation this step (distill_every=0, or an empty posterior): nothing to update.
            return torch.zeros((), device=self.accelerator.device, requires_grad=True)
        reference = partial(pretrained_generator, self.model, self.accelerator.unwrap_model(self.model),
                            self._reference)
        loss, logs = distillation_loss(model, inputs, self.args.distill_kl_coef, reference)
        # one collective for every logged part (each rank logs the same keys, in the same order)
        means = self.accelerator.gather(torch.stack(list(logs.values())).reshape(1, -1)).mean(0).tolist()
        for key, value in zip(logs, means):
            self._metrics[key].append(value)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(metric_means(self._metrics))
        logs["nre/spent"] = self.ledger.spent
        logs["successes/found"] = len(self.ledger.successes)
        logs["round"] = self.round
        logs.update(self.timer.since_last_log())
        super().log(logs, start_time)
        self._metrics.clear()

    def _save_checkpoint(self, model, trial):
        self.create_model_card(model_name=self._model_card_name())
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_state_last(self._banel_state(), folder)  # last and atomic: it marks the checkpoint complete

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Failure adapters live inside the generator between distillations: save the generator without them.
        if len(self.failures) and self.args.failure_model == "adapter":
            if self.failures.policy_adapter is not None:
                output_dir = output_dir or self.args.output_dir
                os.makedirs(output_dir, exist_ok=True)
                self.model.save_pretrained(output_dir, selected_adapters=[self.failures.policy_adapter])
                self.processing_class.save_pretrained(output_dir)
                return
            state_dict = self.failures.policy_state_dict()
        super()._save(output_dir, state_dict)

    def _banel_state(self) -> dict:
        """What a resumed run needs beyond the model, the optimizer and the ledger."""
        return {
            "round": self.round, "history": self.history, "rounds_in_phase": self._rounds_in_phase,
            "idle_rounds": self._idle_rounds, "distill_kl_target": self.distiller.step_size.target,
            **self.sampler.state_dict(), "failure_models": self.failures.state_dict(),
            "negatives": [c.to_dict() for c in self.negatives],
            "buffer": self._buffer, "finished": self._finished,
            "held_out": [c.to_dict() for c in self.region.held_out], "best_generator": self.best_generator,
        }

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        r"""
        Run BaNEL until the budget is spent (or `num_rounds`, or the sampler stops producing anything new).

        `resume_from_checkpoint`: `True` for the last complete checkpoint of `output_dir`, or a checkpoint folder (one
        a crash left incomplete falls back to the last complete one before it). Without it, a run whose ledger is in
        `output_dir` resumes the ledger (nothing is paid for twice) with the model passed in. A run that finished in
        `output_dir` is continued only from its final checkpoint: starting it again from an earlier state raises
        [`~trl_banel.runs.FinishedRunError`] before anything is trained or saved.
        """
        output_dir = self.args.output_dir
        checkpoint = resolve_checkpoint(output_dir, resume_from_checkpoint)
        refuse_rerun(output_dir, checkpoint)
        self._pending_state = load_state(checkpoint)  # restored on the first step, once the generator is loaded
        found = describe_resume(output_dir, self.ledger, self.round, checkpoint)
        if found and self.accelerator.is_main_process:
            logger.warning(found)  # at the default level: a resumed run must never look like a new one
        if self.args.reevaluate_interrupted:
            self.gate.reevaluate_lost(self.round)
        with self.interrupts.installed():  # SIGINT/SIGTERM: stop at the next safe point, with a checkpoint
            output = super().train(resume_from_checkpoint=checkpoint, trial=trial,
                                   ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        # the generator goes back to the user as given: no failure adapter left inside it
        self.failures.clear()
        if self.best_generator is not None:
            b = self.best_generator
            logger.info("Best generator: the one that proposed rounds %d-%d (%d successes in %d evaluations), saved "
                        "in %s.", b["first_round"], b["last_round"], b["successes"], b["evaluated"], b["path"])
        if self.args.should_save:
            mark_finished(output_dir, finished_info(output_dir, self.state.global_step, self.ledger, self.round,
                                                    interrupted=self.interrupts.stopped))
        if self.interrupts.stopped and self.accelerator.is_main_process:
            logger.warning(interrupted_line(output_dir, self.state.global_step, self.ledger, self.round,
                                            self.interrupts.stopped))
        return output

    @property
    def interrupted(self) -> str | None:
        """The signal (`"SIGINT"`, `"SIGTERM"`) that stopped the last `train()` early, or `None`."""
        return self.interrupts.stopped

    def _restore_pending_state(self):
        state, self._pending_state = self._pending_state, None
        # The ledger is the truth for what was paid; the checkpoint may predate later rounds.
        self.round = max(state["round"], self.round)
        if state["round"] == self.round:
            self.history = state["history"]
            self._rounds_in_phase = state["rounds_in_phase"]
            self._idle_rounds = state["idle_rounds"]
            # the target the learning rate was last set for (a grown one, after idle rounds)
            self.distiller.step_size.target = state.get("distill_kl_target", self.distiller.step_size.target)
            # a checkpoint's tensors load on the CPU (the exact objective's micro-batches nest their known failures)
            self._buffer = [to_device(batch, self.accelerator.device) for batch in state["buffer"]]
            self._finished = state["finished"]
            self.region.held_out = [Candidate.from_dict(c) for c in state.get("held_out", [])]
            if state["failure_models"]:
                self.failures.load_state_dict(state["failure_models"])
            self.sampler.load_state_dict(state)
        self.best_generator = state.get("best_generator", self.best_generator)
        self._restore_negatives(state["negatives"])

    def _restore_negatives(self, saved: list[dict]):
        """The checkpoint's negatives, and those the ledger recorded after it (re-tokenised from the ledger)."""
        self.negatives = [Candidate.from_dict(c) for c in saved]
        known = {(c.prompt_text, c.completion) for c in self.negatives}
        self.negatives += [self.sampler.record_to_candidate(r) for r in self.ledger.records
                           if not r.success and (r.prompt, r.completion) not in known]
        self.sampler.add_failures(self.negatives)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.accelerator.is_main_process:
            self.create_model_card(model_name=self._model_card_name())
            if output_dir is not None:
                copy_model_card(self.args.output_dir, output_dir)

    def _model_card_name(self):
        if self.args.hub_model_id is None:
            return Path(self.args.output_dir).name
        return self.args.hub_model_id.split("/")[-1]

    # -- the algorithm -------------------------------------------------------------------------------------------
    def _done(self) -> bool:
        reason = stop_reason(self.args, self.ledger, self.round, self._idle_rounds)
        if reason is not None:
            self.stop_reason = reason
        return reason is not None

    def _fill_buffer(self):
        """Run rounds until a distillation is due, then fill the buffer with the distillation micro-batches."""
        args, ga = self.args, self.current_gradient_accumulation_steps
        if args.distill_every == 0:
            if not self._done():
                self._run_round()
            self._finished = self._done()
            self._buffer = skipped(ga)
            return
        while self._rounds_in_phase < args.distill_every and not self._done() and not self.interrupts.requested():
            self._run_round()
        if self.interrupts.requested():  # stop between rounds: the phase (and its distillation) goes on at resume
            self._buffer = skipped(ga)
            return
        self._finished = self._done()
        if self._rounds_in_phase == 0:  # nothing new to distil (e.g. resumed with the budget spent)
            self._finished = True
            self._buffer = skipped(ga)
        elif not args.distill_before_success and not self.ledger.successes:
            # the generator stays the prior until a success is found: no self-distillation drift, the search is
            # shaped by the filter and the prefix evidence alone
            self._end_phase(keep_best=False)
            self._metrics["distill/skipped_no_success"].append(1.0)
            self._buffer = skipped(args.distill_steps * ga)
        else:
            self._buffer = self._distill(args.distill_steps * ga)

    def _distill(self, n_micro: int) -> list[dict]:
        """The phase's distillation: draw its samples while its failure models act, end the phase, and return the
        micro-batches that the next `n_micro` training steps consume."""
        draw = self.distiller.draw(self.round, n_micro)
        for key, value in draw.metrics.items():
            self._metrics[key].append(value)
        if self.history:
            # the share of the distillation's draw the filter accepted, and of its fresh proposals the failure region
            # rejected: where the phase's failure models act (with distill_every=1 a distillation clears them before
            # the next round's filter sees a proposal, whose filter/ratio_rejected_rate is then 0 by construction)
            # (and of its proposals, the known failures' texts by other tokens than the exact term holds)
            for key in ("distill/acceptance_rate", "distill/rejected_fresh_rate", "distill/known_other_tokens_rate"):
                if key in draw.metrics:  # (the baselined objective's draw has no fresh-rejection count)
                    self.history[-1][key] = draw.metrics[key]
        self._end_phase(keep_best=True)
        batches = self.distiller.micro_batches(draw, self.round, n_micro, idle_rounds=self._idle_rounds)
        if self.args.distill_target_kl > 0:
            self.distiller.step_size.prepare(self.optimizer, self.lr_scheduler)
        return batches

    def _end_phase(self, keep_best: bool):
        """A phase ends: its failure models are dropped (unless `keep_failure_models`) and, with `keep_best`, the
        generator that proposed its rounds is kept if they were the best so far."""
        if not self.args.keep_failure_models:
            self.failures.clear()
        if keep_best:
            self._keep_best_generator()
        self._rounds_in_phase = 0

    def _keep_best_generator(self):
        """Before a distillation: save the generator if its phase's evaluations are the best so far (`better_phase`)."""
        better = self.args.save_best_generator and better_phase(self.history, self._rounds_in_phase, self.round,
                                                                self.best_generator)
        if better:
            path = os.path.join(self.args.output_dir, BEST_GENERATOR_DIR)
            self.save_model(path, _internal_call=True)  # on every process: ZeRO-3 gathers the weights to save them
            self.best_generator = {**better, "nre": self.ledger.spent, "path": path}

    def measure_distillation(self):
        """After a distillation's last step: what it moved (the probe, the step size), in the metrics and history."""
        measured = self.distiller.probe.measure(self.history)
        logs = dict([measured]) if measured is not None else {}
        logs.update(self.distiller.step_size.after(self.optimizer, self.lr_scheduler))
        for key, value in logs.items():
            self._metrics[key].append(value)
        if self.history:
            self.history[-1].update(logs)

    def _run_round(self):
        """One BaNEL round: propose and filter, evaluate, fit a failure model (the failure region grows by it)."""
        args = self.args
        want = min(args.evaluations_per_round, self.ledger.remaining)
        proposals = self.sampler.propose_accepted(want)
        log_ratios = [mean_over_ranks(self.accelerator, r)
                      for r in (proposals.log_ratio_accepted, proposals.log_ratio_rejected)]
        accepted = gather_object(proposals.accepted)  # the oracle is the main process's: from every rank, in one order
        spent_before = self.ledger.spent
        to_evaluate = self.gate.sendable(accepted)[:want]
        rewards = self._evaluate(to_evaluate)
        spent = self.ledger.spent - spent_before
        # A round that fills fewer than half of its places with new evaluations (nearly everything rejected, or the
        # accepted proposals repeat what was already evaluated) is idle: a converged or collapsed sampler would
        # otherwise crawl on for thousands of rounds, each buying a handful of evaluations.
        idle = spent < want / 2
        self._idle_rounds = self._idle_rounds + 1 if idle else 0
        negatives = [c for c, r in zip(to_evaluate, rewards) if r is not None and not r > args.success_threshold]
        self.negatives.extend(negatives)
        self.sampler.add_failures(negatives)
        fit = self.region.fit(negatives, self.negatives, self.round)
        record = round_record(self.round, self.ledger, proposals.stats, rewards, args.success_threshold, fit,
                              len(self.failures), args.evidence_pseudo_count > 0, spent, want)
        log_round(self._metrics, record, proposals.stats, log_ratios, spent, self.ledger)
        self.history.append(record)
        self.round += 1
        self._rounds_in_phase += 1

    def _evaluate(self, cands: list[Candidate]) -> list[float | None]:
        """The round's rewards; a failing oracle stops the run with a checkpoint to resume from."""
        try:
            with self.timer.timed("oracle"):
                return self.gate.evaluate(cands, self.round)
        except RewardFunctionError:
            # every evaluation made is durable in the ledger: save the rest too, to resume once the oracle is fixed
            if self.args.save_strategy != "no":
                logger.error("The reward oracle failed: saving a checkpoint before stopping.")
                self._save_checkpoint(self.model, trial=None)
            raise

    @torch.no_grad()
    def estimate_success_rate(self, num_samples: int, reward_funcs=None, confidence: float = 0.95,
                              posterior: bool = True) -> SuccessEstimate:
        r"""
        Estimate the success rate of the current sampler with a Clopper-Pearson interval.

        With `posterior=True` the sampler is BaNEL's posterior: the generator's proposals filtered by the active
        failure models and the known failures, normalised over the accepted ones (the acceptance rate is reported
        beside the estimate). The reward calls made here are NOT charged to the training budget and do not enter the
        training ledger; each distinct `(prompt, completion)` is scored once and counted in `oracle_calls`.

        Args:
            num_samples (`int`): samples to score (summed over processes).
            reward_funcs (*optional*): the reward functions to score with, called as the trainer calls its own
                (dataset columns, retries, `reward_timeout`, `reward_weights`); the trainer's by default.
        """
        other = None if reward_funcs is None else RewardOracle.from_config(reward_funcs, self.args)
        samples, proposed = self.sampler.draw(num_samples, posterior)
        scored, calls = self.gate.score_once(samples, oracle=other)
        successes = sum(1 for r in scored if r is not None and r > self.args.success_threshold)
        n = sum(1 for r in scored if r is not None)
        total = [sum_over_ranks(self.accelerator, x) for x in (successes, n, len(samples), proposed, calls)]
        return SuccessEstimate.from_counts(int(total[0]), int(total[1]), confidence,
                                           acceptance_rate=total[2] / max(total[3], 1), oracle_calls=int(total[4]))
