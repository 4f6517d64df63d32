"""BaNELTrainer: Bayesian Negative Evidence Learning as a TRL trainer.

One round: propose -> filter (posterior rejection) -> evaluate (ledger) -> fit a failure model -> grow the region.
Every `distill_every` rounds: draw posterior samples and distil them into the generator with ordinary Trainer
optimisation steps, then drop the failure models. The rounds run inside `_prepare_inputs` whenever the distillation
buffer is empty, the way TRL's online trainers generate there, so `train()`, checkpoints, logging, gradient
accumulation and DeepSpeed all come from `transformers.Trainer`.
"""

import contextlib
import copy
import logging
import math
import os
import random
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch.nn.utils.rnn import pad_sequence
from datasets import Dataset
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import PrinterCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.data_utils import is_conversational, maybe_apply_chat_template
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.base_trainer import _BaseTrainer

from .callbacks import BaNELProgressCallback
from .config import BaNELConfig
from .distil import ExactTargets, exact_loss, micro_batches, proposal_distribution, sequence_mass
from .adapters import gathered_copy
from .evidence import EvidenceLogitsProcessor, PrefixEvidence
from .failure import FailureModels
from .ledger import LEDGER_FILENAME, RewardFunctionError, RewardLedger
from .oracle import RewardOracle
from .report import RunReportCallback
from .runs import (BANEL_STATE_NAME, describe_resume, last_complete_checkpoint, mark_finished, refuse_rerun,
                   resolve_checkpoint, save_state_last)
from .stats import SuccessEstimate, clopper_pearson
from .threads import configure_cpu_threads
from .posterior import (Candidates, completion_log_softmax, completion_mask_after_prompt, rejection_mask,
                        sequence_log_probs, token_kl)

logger = logging.getLogger(__name__)


BEST_GENERATOR_DIR = "best_generator"


def identity(x):
    return x


class _StopWhenDone(TrainerCallback):
    """Ends `train()` once the budget (or round limit) is reached and the last distillation has been applied."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if not self.trainer._buffer:  # the last step of a distillation has been applied
            self.trainer._measure_distillation()
        if self.trainer._finished and not self.trainer._buffer:
            control.should_training_stop = True
            # a checkpoint of the final state: a later train(resume_from_checkpoint=True) continues from the trained
            # model, never from an earlier one
            control.should_save = args.save_strategy != "no"


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

    def __init__(
        self,
        model,
        reward_funcs,
        args: BaNELConfig | None = None,
        train_dataset: Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: PeftConfig | None = None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = BaNELConfig(f"{name.split('/')[-1]}-BaNEL")
        if not isinstance(args, BaNELConfig):
            raise TypeError(f"args must be a BaNELConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model)
        if not isinstance(model, (PreTrainedModel, PeftModel)):
            raise TypeError("model must be a Hub id or path, a PreTrainedModel or a PeftModel; got "
                            f"{type(model).__name__}.")
        if peft_config is not None:
            if isinstance(model, PeftModel):
                raise ValueError("model is already a PeftModel: pass peft_config=None or the base model.")
            model = get_peft_model(model, peft_config)
        if processing_class is None:
            processing_class = _load_tokenizer(model)
        if processing_class.pad_token is None:
            if processing_class.eos_token is None:
                raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
            logger.warning("The tokenizer has no pad token; using its EOS token %r for padding.",
                           processing_class.eos_token)
            processing_class.pad_token = processing_class.eos_token
        if processing_class.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token: completions could never end. Set tokenizer.eos_token.")
        _check_dataset(train_dataset)

        self.oracle = RewardOracle(
            reward_funcs, args.reward_weights, args.reward_retries, args.reward_retry_backoff, args.reward_timeout
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.add_callback(RunReportCallback(self))  # rounds.jsonl and run_report.png in output_dir
        # the console counts reward evaluations and prints one line per round, not a metrics dict per step
        printer = self.callback_handler.pop_callback(PrinterCallback)
        if self.callback_handler.pop_callback(DEFAULT_PROGRESS_CALLBACK) is not None or printer is not None:
            self.add_callback(BaNELProgressCallback(self, bar=printer is None))
        self.add_callback(_StopWhenDone(self))
        if self.accelerator.device.type == "cpu":
            configure_cpu_threads(model, args.torch_num_threads)

        main = self.accelerator.is_main_process
        self.ledger = RewardLedger(
            os.path.join(args.output_dir, LEDGER_FILENAME) if main else None,
            args.max_reward_evaluations,
            args.success_threshold,
        )
        self._sync_ledger_from_main()
        self.round = max((r.round for r in self.ledger.records), default=-1) + 1
        self.failures = FailureModels(
            self.accelerator.unwrap_model(self.model),
            args.failure_model,
            args.failure_lora_r,
            args.failure_lora_alpha,
            args.failure_lora_target_modules,
            copy_policy=self._gathered_copy if self._zero3() else None,
            prepare_copy=(lambda m: prepare_deepspeed(m, self.accelerator)) if self._zero3() else None,
        )
        if self._zero3() and args.keep_failure_models and args.failure_model == "adapter":
            # adapters injected after DeepSpeed built its engine are not DeepSpeed's: its ZeRO-3 hooks fail on them in
            # the distillation steps, so they cannot stay in the generator across a distillation
            raise ValueError("keep_failure_models=True with failure_model='adapter' is not supported under DeepSpeed "
                             "ZeRO-3; use failure_model='copy', ZeRO-2, or keep_failure_models=False.")
        self._reference = None  # the pretrained generator, for distill_kl_coef (a LoRA generator needs no copy)
        if args.distill_kl_coef > 0 and not isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
            policy = self.accelerator.unwrap_model(self.model)
            self._reference = (prepare_deepspeed(self._gathered_copy(policy), self.accelerator) if self._zero3()
                               else copy.deepcopy(policy).eval().requires_grad_(False))
        self._probe = None  # (samples, their log q before) of the last distillation, to measure what it absorbed
        self._negatives: list[dict] = []  # all negatives as sampled (for cumulative_negatives)
        self._held_out: list[dict] = []  # last round's held-out negatives: a diagnostic, then part of the next fit
        self.evidence = PrefixEvidence()  # failures per completion prefix, rebuilt from _negatives (see update_evidence)
        self._evidence_synced = 0  # how many of _negatives the evidence holds
        self._known_failures: list[dict] = []  # the ledger's failures as candidates (the exact objective's region)
        self._known_synced = 0  # how many of ledger.records they cover
        self._pending_state = None
        self._prompt_cache: dict[int, tuple] = {}
        self._buffer: list[dict] = []
        self._finished = False
        self.stop_reason: str | None = None  # why the rounds stopped, for the console and the user
        self._idle_rounds = 0
        self._rounds_in_phase = 0
        self._rounds_run = 0
        self._metrics = defaultdict(list)
        # wall seconds per phase of the method for the whole run: propose and filter (in rounds and when drawing the
        # distillation samples), oracle, failure_fit, distill (the optimisation steps); logged as `time/<phase>`
        # (seconds since the previous log)
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self._logged_seconds: dict[str, float] = {}
        self._rng = np.random.default_rng(args.seed + self.accelerator.process_index)
        self.history: list[dict] = []  # one entry per round: nre, successes, acceptance (for plots)
        self.best_generator: dict | None = None  # the best phase's generator (see save_best_generator)

    # ------------------------------------------------------------------------------------------------------------
    # Trainer hooks
    # ------------------------------------------------------------------------------------------------------------
    @property
    def distilling(self) -> bool:
        """Whether steps of the current distillation are still to run (callbacks that measure the generator wait)."""
        return bool(self._buffer)

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
        start, before = time.perf_counter(), sum(self.phase_seconds.values())
        loss = super().training_step(model, inputs, num_items_in_batch)
        inside = sum(self.phase_seconds.values()) - before
        self.phase_seconds["distill"] += time.perf_counter() - start - inside
        return loss

    @contextlib.contextmanager
    def _timed(self, phase: str):
        """Add the enclosed wall time to `phase`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] += time.perf_counter() - start

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("BaNELTrainer does not return outputs from compute_loss.")
        if inputs.get("skip"):
            # No distillation this step (distill_every=0, or an empty posterior): nothing to update.
            return torch.zeros((), device=self.accelerator.device, requires_grad=True)
        ids, att, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        if "teacher_log_probs" in inputs:  # the exact objective
            loss, parts = exact_loss(model, inputs)
            for key, value in parts.items():
                self._metrics[key].append(value)
            log_probs = None
        else:
            log_probs, targets, mask = completion_log_softmax(model, ids, att, comp)
            token_lp = torch.gather(log_probs, 2, targets.unsqueeze(-1)).squeeze(-1)
            weight = inputs.get("weight")  # the baselined objective's per-sequence weights
            weighted = token_lp * mask if weight is None else token_lp * mask * weight.unsqueeze(1)
            loss = -weighted.sum() / mask.sum().clamp(min=1)
        self._metrics["distill/loss"].append(self.accelerator.gather(loss.detach()).mean().item())
        if self.args.distill_kl_coef > 0:
            if log_probs is None:
                log_probs, _, mask = completion_log_softmax(model, ids, att, comp)
            with torch.no_grad(), self._reference_model() as reference:
                reference_log_probs = completion_log_softmax(reference, ids, att, comp)[0]
            kl = token_kl(log_probs, reference_log_probs, mask)
            self._metrics["distill/kl_to_pretrained"].append(self.accelerator.gather(kl.detach()).mean().item())
            loss = loss + self.args.distill_kl_coef * kl
        return loss

    @contextlib.contextmanager
    def _reference_model(self):
        """The pretrained generator: a LoRA generator with its adapter disabled, else the frozen copy made at start."""
        if self._reference is None:
            with self.accelerator.unwrap_model(self.model).disable_adapter():
                yield self.model
        else:
            yield self._reference

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key, values in self._metrics.items():
            valid = [v for v in values if v is not None and not math.isnan(v)]
            if valid:
                logs[key] = sum(valid) / len(valid)
        logs["nre/spent"] = self.ledger.spent
        logs["successes/found"] = len(self.ledger.successes)
        logs["round"] = self.round
        for phase, total in self.phase_seconds.items():
            logs[f"time/{phase}"] = total - self._logged_seconds.get(phase, 0.0)
        self._logged_seconds = dict(self.phase_seconds)
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
            "idle_rounds": self._idle_rounds, "negatives": self._negatives, "rng": self._rng.bit_generator.state,
            "failure_models": self.failures.state_dict(), "buffer": self._buffer, "finished": self._finished,
            "held_out": self._held_out, "best_generator": self.best_generator,
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
        if checkpoint is not None:
            # restored on the first step, once the Trainer has loaded the generator's weights
            self._pending_state = torch.load(os.path.join(checkpoint, BANEL_STATE_NAME), weights_only=False)
        found = describe_resume(output_dir, self.ledger, self.round, checkpoint)
        if found and self.accelerator.is_main_process:
            logger.warning(found)  # at the default level: a resumed run must never look like a new one
        if self.args.reevaluate_interrupted:
            self._reevaluate_lost()
        output = super().train(resume_from_checkpoint=checkpoint, trial=trial,
                               ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        # the generator goes back to the user as given: no failure adapter left inside it
        self.failures.clear()
        if self.best_generator is not None:
            b = self.best_generator
            logger.info("Best generator: the one that proposed rounds %d-%d (%d successes in %d evaluations), saved "
                        "in %s.", b["first_round"], b["last_round"], b["successes"], b["evaluated"], b["path"])
        if self.args.should_save:
            final = last_complete_checkpoint(output_dir)
            final = os.path.basename(final) if final and final.endswith(f"-{self.state.global_step}") else None
            mark_finished(output_dir, {"global_step": self.state.global_step, "checkpoint": final,
                                       "spent": self.ledger.spent, "budget": self.ledger.budget,
                                       "lost": len(self.ledger.lost), "rounds": self.round,
                                       "successes": len(self.ledger.successes)})
        return output

    def _reevaluate_lost(self):
        """Send again the evaluations a crash lost (charged again), as `reevaluate_interrupted` asks."""
        lost = [r for r in self.ledger.unrecorded_lost()
                if "row" in r.meta and r.meta["row"] < len(self.train_dataset)]
        if not lost:
            return
        if self.accelerator.is_main_process:
            logger.warning("Re-evaluating %d reward evaluation(s) lost in a crash (reevaluate_interrupted=True): "
                           "each is charged again.", len(lost))
        cands = [{"prompt": self.train_dataset[r.meta["row"]]["prompt"], "prompt_text": r.prompt,
                  "completion": r.completion, "row": r.meta["row"], "completion_ids": r.meta.get("completion_ids", [])}
                 for r in lost]
        self._evaluate(cands, retry_lost=True)

    def _restore_pending_state(self):
        state, self._pending_state = self._pending_state, None
        # The ledger is the truth for what was paid; the checkpoint may predate later rounds.
        self.round = max(state["round"], self.round)
        if state["round"] == self.round:
            self.history = state["history"]
            self._rounds_in_phase = state["rounds_in_phase"]
            self._idle_rounds = state["idle_rounds"]
            self._rng.bit_generator.state = state["rng"]
            self._buffer = state["buffer"]
            self._finished = state["finished"]
            self._held_out = state.get("held_out", [])
            if state["failure_models"]:
                self.failures.load_state_dict(state["failure_models"])
        self.best_generator = state.get("best_generator", self.best_generator)
        self._negatives = state["negatives"]
        known = {(c["prompt_text"], c["completion"]) for c in self._negatives}
        for r in self.ledger.records:  # negatives evaluated after the checkpoint, re-tokenised from the ledger
            if not r.success and (r.prompt, r.completion) not in known:
                self._negatives.append(self._record_to_candidate(r))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.accelerator.is_main_process:
            self.create_model_card(model_name=self._model_card_name())
            if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
                card = os.path.join(self.args.output_dir, "README.md")
                if os.path.exists(card):
                    Path(output_dir, "README.md").write_text(Path(card).read_text())

    def _model_card_name(self):
        if self.args.hub_model_id is None:
            return Path(self.args.output_dir).name
        return self.args.hub_model_id.split("/")[-1]

    # ------------------------------------------------------------------------------------------------------------
    # The algorithm
    # ------------------------------------------------------------------------------------------------------------
    def _done(self) -> bool:
        args = self.args
        if self.ledger.exhausted:
            self.stop_reason = f"the budget of {args.max_reward_evaluations} reward evaluations is spent"
            return True
        found = len(self.ledger.successes)
        if args.stop_after_successes is not None and found >= args.stop_after_successes:
            self.stop_reason = f"{_plural(found, 'success')} found (stop_after_successes={args.stop_after_successes})"
            return True
        if args.num_rounds is not None and self.round >= args.num_rounds:
            self.stop_reason = f"num_rounds={args.num_rounds} reached"
            return True
        if self._idle_rounds >= args.max_idle_rounds:
            self.stop_reason = f"{self._idle_rounds} idle rounds (max_idle_rounds={args.max_idle_rounds})"
            logger.warning(
                "%d consecutive rounds spent (almost) no new reward evaluation (everything rejected or already "
                "evaluated): stopping. The sampler has converged or can no longer be sampled; see "
                "trainer.ledger.successes.", self._idle_rounds)
            return True
        return False

    def _fill_buffer(self):
        """Run rounds until a distillation is due, then fill the buffer with the distillation micro-batches."""
        args = self.args
        ga = self.current_gradient_accumulation_steps
        if args.distill_every == 0:
            if not self._done():
                self._run_round()
            self._finished = self._done()
            self._buffer = [{"skip": True} for _ in range(ga)]
            return
        while self._rounds_in_phase < args.distill_every and not self._done():
            self._run_round()
        self._finished = self._done()
        if self._rounds_in_phase == 0:  # nothing new to distil (e.g. resumed with the budget spent)
            self._finished = True
            self._buffer = [{"skip": True} for _ in range(ga)]
            return
        if not args.distill_before_success and not self.ledger.successes:
            # the generator stays the prior until a success is found: no self-distillation drift, the search is
            # shaped by the filter and the prefix evidence alone
            if not args.keep_failure_models:
                self.failures.clear()
            self._rounds_in_phase = 0
            self._metrics["distill/skipped_no_success"].append(1.0)
            self._buffer = [{"skip": True} for _ in range(args.distill_steps * ga)]
            return
        if args.distill_objective == "exact" and not self.ledger.successes:
            return self._fill_exact_buffer()
        if args.distill_objective == "baselined":
            samples = self._weighted_proposals(args.distill_samples)
        else:
            samples = self._replay_successes(self._sample_posterior(args.distill_samples))
        if not args.keep_failure_models:
            self.failures.clear()
        self._keep_best_generator()  # the generator as it proposed this phase (the failure models are not part of it)
        self._rounds_in_phase = 0
        n_micro = args.distill_steps * ga
        if not samples:
            logger.warning("Nothing to distil (no posterior sample survived the filter, or, with the baselined "
                           "objective, the filter rejected nothing): skipping this distillation.")
            self._buffer = [{"skip": True} for _ in range(n_micro)]
            return
        random.Random(args.seed + self.round).shuffle(samples)
        probe = self._collate([c for c in samples if c.get("weight", 1.0) > 0][:64] or samples[:1])
        self._probe = (probe, self._generator_log_probs(probe))
        bs = args.per_device_train_batch_size
        self._buffer = []
        for s in range(n_micro):
            chunk = [samples[(s * bs + j) % len(samples)] for j in range(bs)]
            batch = self._collate(chunk)
            self._buffer.append({k: getattr(batch, k).to(self.accelerator.device)
                                 for k in ("input_ids", "attention_mask", "completion_mask")})
            if args.distill_objective == "baselined":
                self._buffer[-1]["weight"] = torch.tensor([c["weight"] for c in chunk], device=self.accelerator.device)

    def _fill_exact_buffer(self):
        """The exact objective's distillation (trl_banel.distil), while the ledger holds no success: its targets are
        made while this phase's failure models are active (their region is part of the posterior), then the models
        are dropped as usual."""
        args = self.args
        targets = self._exact_targets()
        if not args.keep_failure_models:
            self.failures.clear()
        self._keep_best_generator()
        self._rounds_in_phase = 0
        accepted = (~targets.rejected).nonzero().flatten()[:64]
        probe = targets.proposals.select(accepted if len(accepted) else [0])
        self._probe = (probe, self._generator_log_probs(probe))
        seed = args.seed + 1000 * self.round + self.accelerator.process_index
        policy, k = self.failures.policy, args.evidence_pseudo_count
        was_training = policy.training
        policy.eval()
        try:
            batches = micro_batches(targets, args.distill_steps * self.current_gradient_accumulation_steps,
                                    args.per_device_train_batch_size, seed,
                                    lambda b: proposal_distribution(policy, b, self.evidence, k, len(b)))
        finally:
            policy.train(was_training)
        self._buffer = [_to_device(b, self.accelerator.device) for b in batches]

    def _exact_targets(self) -> ExactTargets:
        """Proposals with their filter outcome, the known failures with their `pi(f)`."""
        args = self.args
        cands = self._propose(max(1, math.ceil(args.distill_samples / self.accelerator.num_processes)))
        keep, stats, _, _ = self._filter(cands)
        kept = {id(c) for c in keep}
        records = [self.ledger.lookup(c["prompt_text"], c["completion"]) for c in cands]
        known = [args.reject_known_failures and r is not None and not r.success for r in records]
        rejected = torch.tensor([id(c) not in kept and not k for c, k in zip(cands, known)])
        acceptance = self._sum_over_ranks(len(keep)) / max(self._sum_over_ranks(len(cands)), 1)
        self._metrics["distill/acceptance_rate"].append(acceptance)
        policy, k = self.failures.policy, args.evidence_pseudo_count
        was_training = policy.training
        policy.eval()
        try:
            proposals = self._collate(cands)
            failures, mass = None, torch.zeros(0)
            if args.reject_known_failures:  # tokenised once each: the ledger only grows
                fresh = self.ledger.records[self._known_synced:]
                self._known_failures += [self._record_to_candidate(r) for r in fresh if not r.success]
                self._known_synced += len(fresh)
            if self._known_failures:
                failures = self._collate(self._known_failures)
                mass = sequence_mass(proposal_distribution(policy, failures, self.evidence, k,
                                                           args.scoring_batch_size), failures)
                self._metrics["distill/known_failure_mass"].append(float(mass.sum()))
        finally:
            policy.train(was_training)
        return ExactTargets(proposals, rejected, acceptance, failures, mass)

    def _replay_successes(self, samples: list[dict]) -> list[dict]:
        """Replace a `success_replay` share of the posterior samples by the successes found so far: each of them as
        evenly as the share allows, a seeded draw among them when there are more than it holds."""
        found = self.ledger.successes
        n = int(round(self.args.success_replay * len(samples)))
        if not found or n == 0:
            return samples
        if len(found) > n:  # the same draw on every process (same seed, same ledger)
            picks = random.Random(self.args.seed + self.round).sample(range(len(found)), n)
        else:
            picks = [i % len(found) for i in range(n)]
        replayed = [self._record_to_candidate(found[i]) for i in picks]
        self._metrics["distill/replayed_successes"].append(n)
        return samples[: len(samples) - n] + replayed

    def _keep_best_generator(self):
        """Before a distillation: save the generator if its phase's evaluations have the best success rate so far.

        The rounds since the last distillation were proposed by the current generator (filtered by this phase's
        failure models), so their evaluations already measure it: selecting on them costs no reward evaluation.
        Rates are compared by the lower end of their 95% Clopper-Pearson interval, so a lucky 1-in-1 does not beat
        a steady 30-in-50."""
        phase = self.history[len(self.history) - self._rounds_in_phase:]
        successes = sum(h["round_successes"] for h in phase)
        evaluated = sum(h["round_evaluated"] for h in phase)
        first_round = self.round - self._rounds_in_phase
        if not self.args.save_best_generator or successes == 0:
            return
        lower = clopper_pearson(successes, evaluated)[0]
        if self.best_generator is not None and lower <= self.best_generator["lower"]:
            return
        path = os.path.join(self.args.output_dir, BEST_GENERATOR_DIR)
        self.save_model(path, _internal_call=True)  # on every process: ZeRO-3 gathers the weights to save them
        self.best_generator = {"first_round": first_round, "last_round": self.round - 1, "successes": successes,
                               "evaluated": evaluated, "lower": lower, "nre": self.ledger.spent, "path": path}

    @torch.no_grad()
    def _generator_log_probs(self, cands: Candidates) -> torch.Tensor:
        policy = self.failures.policy  # failure adapters, if any, are disabled outside their fit
        was_training = policy.training
        policy.eval()
        try:
            return sequence_log_probs(policy, cands.input_ids.to(self.accelerator.device),
                                      cands.attention_mask.to(self.accelerator.device),
                                      cands.completion_mask.to(self.accelerator.device),
                                      self.args.scoring_batch_size).cpu()
        finally:
            policy.train(was_training)

    def _measure_distillation(self):
        """After a distillation's last step: how much log-likelihood its posterior samples gained (mean per sample).

        A generator that does not move cannot absorb the posterior: after the first three distillations, warn with the
        setting to change when they moved it by almost nothing."""
        if self._probe is None:
            return
        probe, before = self._probe
        self._probe = None
        gain = (self._generator_log_probs(probe) - before).mean().item()
        gain = _mean_over_ranks(self, [gain])
        self._metrics["distill/log_prob_gain"].append(gain)
        if self.history:
            self.history[-1]["distill/log_prob_gain"] = gain
        gains = [h["distill/log_prob_gain"] for h in self.history if "distill/log_prob_gain" in h]
        if len(gains) == 3 and max(gains) < 0.01:
            logger.warning(
                "The first 3 distillations raised the log-likelihood of their posterior samples by at most %.2g nats "
                "(%d steps each at learning_rate=%g): the generator barely moves, so it cannot absorb what the "
                "failure models learn. Raise learning_rate (a small model may need 1e-4 to 1e-3) or distill_steps.",
                max(gains), self.args.distill_steps, self.args.learning_rate)

    def _run_round(self):
        """One BaNEL round: propose, filter, evaluate, fit a failure model."""
        args = self.args
        want = min(args.evaluations_per_round, self.ledger.remaining)
        accepted, stats = self._propose_accepted(want)
        # The oracle is the main process's: candidates from every rank, in one order.
        accepted = gather_object(accepted)
        spent_before = self.ledger.spent
        to_evaluate = self._sendable(accepted)[:want]
        try:
            with self._timed("oracle"):
                rewards = self._evaluate(to_evaluate)
        except RewardFunctionError:
            # Every evaluation made so far is already durable in the ledger; save the rest of the state too, so
            # that the run resumes (train(resume_from_checkpoint=True)) once the oracle is fixed.
            if self.args.save_strategy != "no":
                logger.error("The reward oracle failed: saving a checkpoint before stopping.")
                self._save_checkpoint(self.model, trial=None)
            raise
        spent = self.ledger.spent - spent_before
        # A round that buys almost nothing new (everything rejected, or the sampler only repeats what was already
        # evaluated) is idle: a converged or collapsed sampler would otherwise run on for thousands of rounds.
        idle = spent < max(1, math.ceil(0.05 * args.evaluations_per_round))
        self._idle_rounds = self._idle_rounds + 1 if idle else 0

        negatives = [c for c, r in zip(to_evaluate, rewards) if r is not None and not r > args.success_threshold]
        n_success = sum(1 for r in rewards if r is not None and r > args.success_threshold)
        self._negatives.extend(negatives)
        fit = self._fit_failure_model(negatives)
        evaluated = sum(1 for r in rewards if r is not None)
        proposed = max(stats["proposed"], 1)
        fresh = max(stats["proposed"] - stats["known"], 1)
        if args.evidence_pseudo_count > 0:
            fit = {**fit, "generator/tried_prefix_share": stats["tried_prefix"] / proposed}
        record = {
            "round": self.round, "nre": self.ledger.spent, "successes": len(self.ledger.successes),
            "proposed": stats["proposed"], "accepted": stats["accepted"], "ratio_rejected": stats["ratio_rejected"],
            "known_rejected": stats["known"], "acceptance_rate": stats["accepted"] / proposed,
            "round_successes": n_success, "round_evaluated": evaluated,
            # the mechanism, step by step: what the filter rejected and why, what the generator proposes
            "filter/ratio_rejected_rate": stats["ratio_rejected_fresh"] / fresh,
            "generator/entropy": stats["nll"] / max(stats["tokens"], 1),
            "generator/distinct": stats["distinct"] / proposed,
            **fit,
            "failure/num_models": len(self.failures),
        }
        m = self._metrics
        m["filter/acceptance_rate"].append(record["acceptance_rate"])
        m["filter/known_failure_rate"].append(stats["known"] / proposed)
        m["filter/log_ratio_accepted"].append(stats["log_ratio_accepted"])
        m["filter/log_ratio_rejected"].append(stats["log_ratio_rejected"])
        m["nre/round"].append(spent)
        m["success_rate/evaluated"].append(n_success / evaluated if evaluated else float("nan"))
        m["success_rate/all_evaluated"].append(
            len(self.ledger.successes) / self.ledger.spent if self.ledger.spent else float("nan"))
        for key, value in record.items():
            if "/" in key and isinstance(value, (int, float)):
                m[key].append(value)
        self.history.append(record)
        self.round += 1
        self._rounds_in_phase += 1
        self._rounds_run += 1

    def _fit_failure_model(self, negatives: list[dict]) -> dict:
        """Fit a new failure model on the round's negatives (a share held out), grow the region, and measure the fit.

        Returns the fit's metrics: its losses, steps, the margin reached on its own negatives
        (`failure/fit_log_ratio`) and the ratio-test rejection rate of the new model on held-out negatives.
        """
        args = self.args
        # the held-out share is drawn the same way on every process (the negatives are identical everywhere)
        order = list(range(len(negatives)))
        random.Random(args.seed + self.round).shuffle(order)
        n_held = int(args.failure_heldout_fraction * len(negatives))
        held_out = [negatives[i] for i in order[:n_held]]
        fresh = [negatives[i] for i in order[n_held:]]
        if args.cumulative_negatives:  # every negative so far but this round's held-out share
            held = {id(c) for c in held_out}
            fit_on = [c for c in self._negatives if id(c) not in held]
        else:
            fit_on = self._held_out + fresh
        self._held_out = held_out
        if not fit_on:
            return {}
        with self._timed("failure_fit"):
            self.failures.add()
            result = self.failures.fit(
                self._collate(fit_on), args.failure_epochs, args.failure_learning_rate, args.failure_batch_size,
                margin=args.failure_margin, max_grad_norm=args.failure_max_grad_norm,
                warmup_steps=args.failure_warmup_steps, seed=args.seed + self.round,
                rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
                min_log_ratio=-math.log(args.rejection_threshold),
            )
            while args.keep_failure_models and len(self.failures) > args.max_failure_models:
                self.failures.drop_oldest()
            # exact margin after the fit, and generalisation: the new model alone against q
            scored = self._collate(fit_on + held_out)
            policy_lp, failure_lp = self.failures.score(scored, args.scoring_batch_size, args.length_normalize)
            log_ratio = (failure_lp[-1] - policy_lp).cpu()
            rejected = rejection_mask(policy_lp.cpu(), failure_lp[-1:].cpu(), args.rejection_threshold)[0]
        fit_log_ratio = log_ratio[: len(fit_on)].mean().item()
        out = {
            "failure_losses": result.losses,
            "failure/loss_first_epoch": result.losses[0], "failure/loss": result.losses[-1],
            "failure/fit_steps": result.steps,
            "failure/fit_log_ratio": fit_log_ratio,
            "failure/fit_rejected_rate": rejected[: len(fit_on)].float().mean().item(),
            "failure/fit_target": result.target,
            # judged on the exact log-ratio after the fit (the fit's own value is one step stale)
            "failure/margin_reached": float(fit_log_ratio >= result.target),
        }
        if held_out:
            out["failure/heldout_rejected_rate"] = rejected[len(fit_on):].float().mean().item()
        return out

    def _propose_accepted(self, want: int):
        """Propose in batches until `want` candidates (over all ranks) survive the filter, or the batches run out."""
        args = self.args
        world = self.accelerator.num_processes
        per_rank = max(1, math.ceil(args.num_candidates / world))
        accepted: list[dict] = []
        totals = defaultdict(float)
        ratios_acc, ratios_rej = [], []
        for _ in range(args.max_proposal_batches):
            keep, stats, lr_acc, lr_rej = self._propose_filtered(per_rank)
            accepted.extend(keep)
            ratios_acc += lr_acc
            ratios_rej += lr_rej
            for k, v in stats.items():
                totals[k] += v
            n_accepted = self._sum_over_ranks(len(accepted))
            if n_accepted >= want:
                break
        stats = {k: self._sum_over_ranks(v) for k, v in sorted(totals.items())}
        stats["log_ratio_accepted"] = _mean_over_ranks(self, ratios_acc)
        stats["log_ratio_rejected"] = _mean_over_ranks(self, ratios_rej)
        return accepted, stats

    def _propose_filtered(self, n: int):
        """Propose `n` candidates and filter them (each step timed): `_filter`'s result."""
        with self._timed("propose"):
            cands = self._propose(n)
        with self._timed("filter"):
            return self._filter(cands)

    def _weighted_proposals(self, n_total: int) -> list[dict]:
        r"""
        Proposals weighted for the baselined distillation: `1/Z - 1` if accepted, `-1` if rejected, where `Z` is the
        acceptance rate. Their weighted log-likelihood has the gradient of `-KL(posterior || q)` (since
        `E_q[grad log q] = 0`), like the posterior samples' own, without their drift: where the filter rejects
        nothing every weight is 0 and the generator does not move, so it moves only where the failure models act.
        """
        world = self.accelerator.num_processes
        cands, accepted, proposed = [], 0, 0  # Z is measured over every proposal that gets a weight
        for _ in range(self.args.max_proposal_batches):
            batch = self._propose(max(1, math.ceil(n_total / world)))
            keep, stats, _, _ = self._filter(batch)
            accepted += self._sum_over_ranks(stats["accepted"])
            proposed += self._sum_over_ranks(stats["proposed"])
            kept = {id(c) for c in keep}
            for c in batch:
                c["accepted"] = id(c) in kept
            cands.extend(batch)
            if accepted:  # a posterior sample to move towards (if none, propose again)
                break
        self._metrics["distill/acceptance_rate"].append(accepted / max(proposed, 1))
        if not accepted or accepted == proposed:
            return []  # no sample of the posterior, or a posterior equal to the generator: nothing to distil
        z = accepted / proposed
        for c in cands:
            c["weight"] = 1.0 / z - 1.0 if c.pop("accepted") else -1.0
        return cands

    def _sample_posterior(self, n_total: int) -> list[dict]:
        """Posterior samples on this rank (no oracle call): proposals that survive the filter."""
        world = self.accelerator.num_processes
        want_local = max(1, math.ceil(n_total / world))
        samples: list[dict] = []
        for _ in range(self.args.max_proposal_batches):
            keep, stats, _, _ = self._propose_filtered(max(want_local, math.ceil(self.args.num_candidates / world)))
            samples.extend(keep)
            self._metrics["distill/acceptance_rate"].append(stats["accepted"] / max(stats["proposed"], 1))
            if self._sum_over_ranks(min(len(samples), want_local)) >= want_local * world:
                break
        return samples[:want_local]

    # -- estimate ------------------------------------------------------------------------------------------------
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
        other = None if reward_funcs is None else RewardOracle(
            reward_funcs, self.args.reward_weights, self.args.reward_retries, self.args.reward_retry_backoff,
            self.args.reward_timeout)
        world = self.accelerator.num_processes
        want = math.ceil(num_samples / world)
        samples, proposed = [], 0
        # the loop's exits are decided on counts summed over processes, so every process runs the same number of
        # generate/forward calls (ZeRO-3 gathers weights inside them and would hang otherwise)
        while self._sum_over_ranks(min(len(samples), want)) < want * world:
            batch = self._propose(min(self.args.generation_batch_size * 4, max(want - len(samples), 1)))
            proposed += len(batch)
            if posterior:
                batch = self._filter(batch)[0]
            samples.extend(batch)
            if self._sum_over_ranks(proposed) >= 50 * want * world:
                logger.warning("The posterior accepts almost nothing: estimating on %d samples.", len(samples))
                break
        samples = samples[:want]
        cache: dict[tuple[str, str], float | None] = {}
        todo = {}
        for c in samples:
            todo.setdefault((c["prompt_text"], c["completion"]), c)
        keys = list(todo)
        for start in range(0, len(keys), 4096):
            chunk = [todo[k] for k in keys[start : start + 4096]]
            rewards = self._call_oracle(chunk, oracle=other)
            cache.update(zip(keys[start : start + 4096], rewards))
        scored = [cache[(c["prompt_text"], c["completion"])] for c in samples]
        successes = sum(1 for r in scored if r is not None and r > self.args.success_threshold)
        n = sum(1 for r in scored if r is not None)
        total = [self._sum_over_ranks(x) for x in (successes, n, len(samples), proposed, len(keys))]
        return SuccessEstimate.from_counts(int(total[0]), int(total[1]), confidence,
                                           acceptance_rate=total[2] / max(total[3], 1), oracle_calls=int(total[4]))

    # -- propose -------------------------------------------------------------------------------------------------
    def _encoded_prompt(self, row: int) -> tuple:
        """`(prompt, prompt_text, prompt_ids)` of a dataset row, computed once per row."""
        cached = self._prompt_cache.get(row)
        if cached is None:
            prompt = self.train_dataset[row]["prompt"]
            cached = self._prompt_cache[row] = (prompt, *self._prompt_ids(prompt))
        return cached

    def _prompt_ids(self, prompt) -> tuple[str, list[int]]:
        text = maybe_apply_chat_template({"prompt": prompt}, self.processing_class)["prompt"]
        conversational = is_conversational({"prompt": prompt})
        ids = self.processing_class(text=text, add_special_tokens=not conversational)["input_ids"]
        if not ids:
            if self.processing_class.bos_token_id is None:
                raise ValueError(
                    f"The prompt {prompt!r} tokenizes to no token and the tokenizer has no BOS token to start "
                    "generation from; give a non-empty prompt or a tokenizer with a bos_token.")
            ids = [self.processing_class.bos_token_id]
        limit = getattr(self.accelerator.unwrap_model(self.model).config, "max_position_embeddings", None)
        if limit is not None and len(ids) + self.args.max_completion_length > limit:
            raise ValueError(
                f"A prompt of {len(ids)} tokens plus max_completion_length={self.args.max_completion_length} exceeds "
                f"the model's context of {limit} tokens; shorten the prompts or lower max_completion_length.")
        return text, ids

    @torch.no_grad()
    def _propose(self, n: int) -> list[dict]:
        """Sample `n` completions from the generator for randomly drawn prompts (no oracle call)."""
        args, tok = self.args, self.processing_class
        rows = self._rng.integers(0, len(self.train_dataset), size=n).tolist()
        cached = [self._encoded_prompt(r) for r in rows]
        prompts = [c[0] for c in cached]
        encoded = [(c[1], c[2]) for c in cached]
        eos_ids = [tok.eos_token_id]
        parts = []
        # Under ZeRO-3, TRL's helper gathers the full weights for generation, which needs every parameter to be
        # DeepSpeed's; failure adapters injected after the engine was built are not, so while any is present the
        # model generates with per-module gathering instead, the processes kept in step by `synced_gpus`.
        zero3 = self._zero3()
        self.update_evidence()
        gather = not (zero3 and len(self.failures) and self.args.failure_model == "adapter")
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=gather) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            for start in range(0, n, args.generation_batch_size):
                chunk = encoded[start : start + args.generation_batch_size]
                width = max(len(ids) for _, ids in chunk)
                input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (_, ids) in enumerate(chunk):
                    input_ids[i, width - len(ids):] = torch.tensor(ids)
                    attention[i, width - len(ids):] = 1
                processors = LogitsProcessorList()
                if args.evidence_pseudo_count > 0:
                    processors.append(EvidenceLogitsProcessor(self.evidence, [text for text, _ in chunk], width,
                                                              args.evidence_pseudo_count))
                out = unwrapped.generate(
                    input_ids=input_ids.to(self.accelerator.device), logits_processor=processors,
                    attention_mask=attention.to(self.accelerator.device),
                    do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=1.0,
                    max_new_tokens=args.max_completion_length, min_new_tokens=0,
                    pad_token_id=tok.pad_token_id, eos_token_id=eos_ids, synced_gpus=zero3 and not gather,
                ).cpu()
                completion = out[:, width:]
                comp_mask = completion_mask_after_prompt(completion, eos_ids, tok.pad_token_id)
                for i in range(len(chunk)):
                    parts.append({"prompt_ids": chunk[i][1], "completion_ids": completion[i][comp_mask[i].bool()].tolist()})
            unwrapped.train(was_training)
        texts = tok.batch_decode([p["completion_ids"] for p in parts], skip_special_tokens=True)
        for part, row, prompt, (ptext, _), text in zip(parts, rows, prompts, encoded, texts):
            part.update(row=row, prompt=prompt, prompt_text=ptext, completion=text)
        return parts

    def update_evidence(self):
        """Bring `evidence` (failures per completion prefix) up to date with the negatives recorded so far (all of them
        after a resume). Proposals call it; call it before reading `evidence` between rounds. Kept only with
        `evidence_pseudo_count > 0`: a trie of long completions is large."""
        if not self.args.evidence_pseudo_count > 0:
            return
        for c in self._negatives[self._evidence_synced:]:
            self.evidence.add(c["prompt_text"], c["completion_ids"])
        self._evidence_synced = len(self._negatives)

    def _tried_prefix_share(self, cands: list[dict]) -> float:
        """Mean share of each proposal's tokens that lie on prefixes some failure already went through: how much of
        what the generator proposes retraces evaluated failures (the prefix evidence lowers it)."""
        shares = [self.evidence.tried_depth(c["prompt_text"], c["completion_ids"]) / max(len(c["completion_ids"]), 1)
                  for c in cands]
        return sum(shares) / max(len(shares), 1)

    # -- filter --------------------------------------------------------------------------------------------------
    def _filter(self, cands: list[dict]):
        """Posterior rejection: drop candidates any failure model explains, and known failures."""
        args = self.args
        n = len(cands)
        rejected = torch.zeros(n, dtype=torch.bool)
        min_ratio = torch.full((n,), float("inf"))
        nll, tokens = 0.0, 0
        if n:
            batch = self._collate(cands)
            policy_lp, failure_lp = self.failures.score(batch, args.scoring_batch_size)
            nll, tokens = -policy_lp.sum().item(), int(batch.completion_mask.sum())  # the generator's entropy
            if args.length_normalize:
                lengths = batch.completion_mask.sum(1).clamp(min=1).to(policy_lp.device)
                policy_lp, failure_lp = policy_lp / lengths, failure_lp / lengths
            rejected, min_ratio = rejection_mask(policy_lp.cpu(), failure_lp.cpu(), args.rejection_threshold)
        records = [self.ledger.lookup(c["prompt_text"], c["completion"]) for c in cands]
        known = torch.tensor([args.reject_known_failures and r is not None and not r.success for r in records],
                             dtype=torch.bool)
        if self.ledger.lost:  # lost in a crash: charged, never sent again, so never worth proposing (nor distilling)
            known |= torch.tensor([self.ledger.is_unrecorded_lost(c["prompt_text"], c["completion"]) for c in cands],
                                  dtype=torch.bool)
        # a known success is certainly outside the failure region, whatever the failure models generalise to
        rejected &= ~torch.tensor([r is not None and r.success for r in records], dtype=torch.bool)
        reject = rejected | known
        keep = [c for c, r in zip(cands, reject.tolist()) if not r]
        finite = torch.isfinite(min_ratio)
        lr_acc = min_ratio[~reject & finite].tolist()
        lr_rej = min_ratio[reject & finite].tolist()
        stats = {"proposed": n, "accepted": len(keep), "known": int(known.sum()), "ratio_rejected": int(rejected.sum()),
                 "ratio_rejected_fresh": int((rejected & ~known).sum()), "nll": nll, "tokens": tokens,
                 "distinct": len({(c["prompt_text"], c["completion"]) for c in cands}),
                 "tried_prefix": self._tried_prefix_share(cands) * n if args.evidence_pseudo_count > 0 else 0.0}
        return keep, stats, lr_acc, lr_rej

    # -- evaluate ------------------------------------------------------------------------------------------------
    def _evaluate(self, cands: list[dict], retry_lost: bool = False) -> list[float | None]:
        """Rewards through the ledger (main process), shared with every rank."""
        payload = [None]
        if self.accelerator.is_main_process:
            try:
                before = len(self.ledger.records)
                rewards = self.ledger.evaluate(
                    [c["prompt_text"] for c in cands], [c["completion"] for c in cands],
                    lambda idx: self._call_oracle([cands[i] for i in idx], require_a_score=True), self.round,
                    # enough to send a call lost in a crash again (reevaluate_interrupted)
                    meta=[{"row": c["row"], "completion_ids": c["completion_ids"]} for c in cands],
                    retry_lost=retry_lost,
                )
                payload = [("ok", rewards, self.ledger.records[before:])]
            except Exception as e:
                payload = [("error", f"{type(e).__name__}: {e}", e)]
        payload = broadcast_object_list(payload, from_process=0) if self.accelerator.num_processes > 1 else payload
        status, *rest = payload[0]
        if status == "error":
            if self.accelerator.is_main_process and isinstance(rest[1], Exception):
                raise rest[1]
            raise RewardFunctionError(f"the reward oracle failed on the main process: {rest[0]}")
        rewards, new_records = rest
        if not self.accelerator.is_main_process:
            for r in new_records:
                self.ledger._add(r)
        return rewards

    def _sendable(self, cands: list[dict]) -> list[dict]:
        """The candidates the oracle may be asked about: not those a crash lost (charged, outcome unknown, never sent
        again), which would otherwise take the round's places and come back unscored."""
        if not self.ledger.lost:
            return cands
        return [c for c in cands if not self.ledger.is_unrecorded_lost(c["prompt_text"], c["completion"])]

    def _call_oracle(self, cands: list[dict], require_a_score: bool = False, oracle=None) -> list[float | None]:
        prompts = [c["prompt"] for c in cands]
        if cands and is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": c["completion"]}] for c in cands]
        else:
            completions = [c["completion"] for c in cands]
        columns = {}
        for key in self.train_dataset.column_names:
            if key != "prompt":
                columns[key] = [self.train_dataset[c["row"]][key] for c in cands]
        columns["completion_ids"] = [c["completion_ids"] for c in cands]
        columns["trainer_state"] = self.state
        oracle = self.oracle if oracle is None else oracle
        return oracle(prompts, completions, columns, require_a_score=require_a_score)

    def _sync_ledger_from_main(self):
        if self.accelerator.num_processes > 1:
            shared = broadcast_object_list([self.ledger.share() if self.accelerator.is_main_process else None])[0]
            if not self.accelerator.is_main_process:
                self.ledger.adopt(shared)  # lost evaluations too: every rank must agree on the budget left

    # -- helpers -------------------------------------------------------------------------------------------------
    def _record_to_candidate(self, record) -> dict:
        """A ledger record as a candidate (prompt re-tokenised; completion tokenised from its text)."""
        prompt_ids = self._prompt_ids(record.prompt)[1]  # the ledger holds the prompt as text, template applied
        completion_ids = self.processing_class(text=record.completion, add_special_tokens=False)["input_ids"]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids + [self.processing_class.eos_token_id],
                "row": 0, "prompt": record.prompt, "prompt_text": record.prompt, "completion": record.completion}

    def _collate(self, cands: list[dict]) -> Candidates:
        """Left-padded prompts followed by right-padded completions, as one batch."""
        pad = self.processing_class.pad_token_id
        prompts = [torch.tensor(c["prompt_ids"], dtype=torch.long) for c in cands]
        completions = [torch.tensor(c["completion_ids"], dtype=torch.long) for c in cands]
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
                          [c["prompt"] for c in cands], [c["prompt_text"] for c in cands],
                          [c["completion"] for c in cands], [c["row"] for c in cands])

    def _gathered_copy(self, policy):
        """A full, unsharded copy of a ZeRO-3 generator, on this process's device."""
        return gathered_copy(policy, self.accelerator.device)

    def _zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def _sum_over_ranks(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor(float(value), device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").item()


def _mean_over_ranks(trainer, values: list[float]) -> float:
    total = trainer._sum_over_ranks(sum(values))
    count = trainer._sum_over_ranks(len(values))
    return total / count if count else float("nan")


def _to_device(item, device):
    """A micro-batch (nested dicts of tensors) on `device`."""
    if isinstance(item, dict):
        return {k: _to_device(v, device) for k, v in item.items()}
    return item.to(device)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _load_tokenizer(model):
    """The tokenizer saved with `model`, or an error that says to pass `processing_class`."""
    path = getattr(model.config, "_name_or_path", "") or ""
    if not path:
        raise ValueError(f"processing_class is required: the {type(model).__name__} was passed as an object with no "
                         "path to load a tokenizer from. Pass processing_class=tokenizer to BaNELTrainer.")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, ImportError (sentencepiece, tiktoken, ...): all mean the same here
        reason = " ".join(str(e).split())  # library messages span lines
        raise ValueError(f"No tokenizer could be loaded from {path!r}, the model's path ({type(e).__name__}: "
                         f"{reason}). Pass processing_class=tokenizer to BaNELTrainer.") from e


def _check_dataset(dataset):
    if dataset is None:
        raise ValueError("train_dataset is required: a datasets.Dataset with a 'prompt' column.")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"train_dataset has no 'prompt' column (columns: {dataset.column_names}); BaNEL needs prompts, "
            "for unconditional generation a single row with an empty prompt.")
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty; give at least one prompt.")
