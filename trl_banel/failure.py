"""Failure models: what the negatives say about where the generator wastes its mass.

Each failure model `p_k` starts as an exact copy of the current generator `q` (so `log q - log p_k` starts at 0) and is
fitted by maximum likelihood on negatives. Two storage modes:

- `"adapter"`: `p_k` is a LoRA adapter on the generator's own weights (one copy of the base weights whatever the
  number of failure models). For a plain generator the new adapter starts at zero (peft's default init: `B = 0`);
  for a LoRA generator it starts as a copy of the generator's adapter. Scoring runs one forward per model, each LoRA
  layer using `W + s * B @ A` built on the fly (one layer at a time, freed after), so a failure model's forward costs
  what the bare model's does; where that does not apply (ZeRO-3 sharded weights, DoRA or other LoRA variants,
  transposed weights) all models are scored in one mixed-adapter batch (peft's `adapter_names`). `scoring` chooses
  the path explicitly.
- `"copy"`: `p_k` is a full copy of the generator, the fallback for models peft cannot wrap.
"""

import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
from peft import PeftModel
from trl.models.utils import prepare_deepspeed

from . import adapters
from .posterior import (Candidates, completion_nll, completion_positions, eval_mode, scoring_rows, sequence_log_probs,
                        vocab_size)

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a failure-model fit did: the mean loss of each epoch (each batch measured before its update), the
    optimiser steps taken, the mean `log p_fail - log q` over the fitted negatives at the last epoch, the target it
    aimed at, and whether it reached it."""

    losses: list[float]
    steps: int
    log_ratio: float
    target: float
    reached: bool


class FailureModels:
    r"""
    The active failure models of one phase (between two distillations).

    Args:
        policy (`torch.nn.Module`):
            The generator `q`, unwrapped (a `PreTrainedModel` or a LoRA `PeftModel`).
        mode (`str`): `"adapter"` or `"copy"`.
        lora_r, lora_alpha, target_modules: the failure adapters' LoRA settings (plain generators only).
        scoring (`str`, *optional*, defaults to `"auto"`):
            How `"adapter"` failure models are scored: `"merged"`, one forward per model with each LoRA layer's
            merged weight built on the fly (plain float32 linear LoRA only); `"peft"`, one mixed-adapter batch through
            peft's own forward; `"auto"`, merged wherever it applies. Both compute the same scores.
    """

    def __init__(self, policy, mode: str = "adapter", lora_r: int = 16, lora_alpha: int = 32,
                 target_modules="all-linear", copy_policy=None, prepare_copy=None, scoring: str = "auto"):
        if scoring not in adapters.SCORING_CHOICES:
            raise ValueError(f"scoring={scoring!r}: must be one of {adapters.SCORING_CHOICES}.")
        self.policy = policy
        self.mode = mode
        self.scoring = scoring
        # how to copy the generator (a plain deepcopy unless its weights are sharded), and how to store a fitted copy
        # (for example sharded with DeepSpeed); the trainer supplies both under ZeRO-3
        self.copy_policy = copy_policy or copy.deepcopy
        self.prepare_copy = prepare_copy
        self.copies: list[torch.nn.Module] = []
        self.names: list[str] = []
        self._peft: PeftModel | None = None  # the PEFT model holding the failure adapters
        self._counter = 0
        self._layers: list | None = None  # the LoRA layers, found once per set of adapters
        self.policy_adapter = None
        if mode == "adapter" and isinstance(policy, PeftModel):
            self.policy_adapter, self.lora_config = adapters.generator_lora_config(policy)
        else:
            self.lora_config = adapters.new_lora_config(lora_r, lora_alpha, target_modules, policy)

    @classmethod
    def from_config(cls, policy, args, accelerator, zero3: bool = False) -> "FailureModels":
        """The failure models a [`BaNELConfig`] describes; under ZeRO-3 they copy the generator gathered from its
        shards and store a fitted copy sharded again."""
        if zero3 and args.keep_failure_models and args.failure_model == "adapter":
            # adapters injected after DeepSpeed built its engine are not DeepSpeed's: its ZeRO-3 hooks fail on them in
            # the distillation steps, so they cannot stay in the generator across a distillation
            raise ValueError("keep_failure_models=True with failure_model='adapter' is not supported under DeepSpeed "
                             "ZeRO-3; use failure_model='copy', ZeRO-2, or keep_failure_models=False.")
        copy_policy = prepare_copy = None
        if zero3:
            copy_policy = partial(adapters.gathered_copy, device=accelerator.device)
            prepare_copy = partial(prepare_deepspeed, accelerator=accelerator)
        return cls(policy, args.failure_model, args.failure_lora_r, args.failure_lora_alpha,
                   args.failure_lora_target_modules, copy_policy=copy_policy, prepare_copy=prepare_copy)

    def __len__(self):
        return len(self.copies) if self.mode == "copy" else len(self.names)

    # -- growth ----------------------------------------------------------------------------------------------------
    def add(self) -> str:
        """Add a failure model equal to the current generator; returns its name."""
        self._counter += 1
        self._layers = None
        name = f"failure_{self._counter}"
        if self.mode == "copy":
            model = self.copy_policy(self.policy)
            model.eval()
            self.copies.append(model)
            self.names.append(name)
            return name
        flags = {p: p.requires_grad for p in self.policy.parameters()}
        config = copy.deepcopy(self.lora_config)
        if self.policy_adapter is not None:
            self._peft = self.policy
            self.policy.add_adapter(name, config)
            adapters.copy_adapter_weights(self.policy, self.policy_adapter, name)
            self.policy.set_adapter(self.policy_adapter)
        elif self._peft is None:
            self._peft = adapters.inject(self.policy, config, name)
        else:
            self._peft.add_adapter(name, config)
            adapters.set_adapter_layers(self._peft, enabled=False)
        self._restore_flags(flags)
        self.names.append(name)
        return name

    def drop_oldest(self):
        """Drop the oldest failure model (the rejection region keeps the most recent ones)."""
        if len(self) <= 1:
            self.clear()
            return
        self._layers = None
        name = self.names.pop(0)
        if self.mode == "copy":
            self.copies.pop(0)
            return
        flags = {p: p.requires_grad for p in self.policy.parameters()}
        self._peft.delete_adapter(name)
        if self.policy_adapter is not None:
            self.policy.set_adapter(self.policy_adapter)
        else:
            adapters.set_adapter_layers(self._peft, enabled=False)
        self._restore_flags(flags)

    def _restore_flags(self, flags):
        for p in self.policy.parameters():
            p.requires_grad_(flags.get(p, False))

    def clear(self):
        """Drop every failure model (after a distillation the generator carries the rejection region itself)."""
        self._layers = None
        if self.mode == "copy":
            self.copies.clear()
        elif self._peft is not None:
            flags = {p: p.requires_grad for p in self.policy.parameters()}
            if self.policy_adapter is not None:
                for name in self.names:
                    self.policy.delete_adapter(name)
                self.policy.set_adapter(self.policy_adapter)
            else:
                adapters.unload(self._peft)
                self._peft = None
            self._restore_flags(flags)
        self.names.clear()

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def policy_state_dict(self) -> dict:
        """The generator's own state dict, without the failure adapters injected into it."""
        state = self.policy.state_dict()
        if self.mode == "copy" or self._peft is None or self.policy_adapter is not None:
            return state
        return adapters.without_adapters(state)

    def state_dict(self) -> list[dict]:
        """The failure models' own weights (adapters, or full copies), to rebuild them on resume."""
        if self.mode == "copy":
            return [{k: v.cpu() for k, v in m.state_dict().items()} for m in self.copies]
        state = self.policy.state_dict()
        return [{k: v.cpu() for k, v in adapters.adapter_state(state, name).items()} for name in self.names]

    def load_state_dict(self, states: list[dict]):
        """Rebuild failure models saved by `state_dict` on top of the current generator."""
        self.clear()
        for state in states:
            name = self.add()
            if self.mode == "copy":
                self.copies[-1].load_state_dict(state)
            else:
                saved_name, own = adapters.renamed_adapter_state(state, name)
                result = self.policy.load_state_dict(own, strict=False)
                if result.unexpected_keys:
                    raise RuntimeError(f"failure adapter {saved_name} does not fit the generator: "
                                       f"{result.unexpected_keys[:3]}")

    # -- fitting ---------------------------------------------------------------------------------------------------
    def fit(self, negatives: Candidates, max_epochs: int, learning_rate: float, batch_size: int,
            margin: float = 0.0, max_grad_norm: float | None = 1.0, warmup_steps: int = 0, seed: int = 0,
            rank: int = 0, world_size: int = 1, min_log_ratio: float = 0.0) -> "FitResult":
        r"""
        Fit the newest failure model by maximum likelihood on `negatives` (as sampled, repeats included), until the
        mean over the negatives of `log p_fail - log q` reaches its target or `max_epochs` epochs have run.

        The target is `margin` nats, capped at half the most any model could reach on these negatives: their
        empirical distribution `p_emp` scores `KL(p_emp || q)` (per prompt), which is small where the generator is
        already sharp (a few completions repeated) and large where every negative is new. With `margin=0` every epoch
        runs and the target is `min_log_ratio` (the trainer passes `log(1 / rejection_threshold)`, what the ratio
        test needs to reject the average negative): `reached` then says whether the fixed fit did its job.

        The negatives are samples of `q` itself, so the likelihood gradient on them is finite-sample noise: the
        model has to learn these particular failures, which takes many small stable steps (AdamW with gradient
        clipping and a linear warm-up). The margin is checked once per epoch, from the epoch's summed likelihood (each
        batch measured before its update) against `log q` computed once before the fit; 0 fits every epoch.

        Data-parallel over `world_size` processes: every process holds the same negatives and the same shuffled
        order, takes its share of each batch, and the failure model's gradients are summed across processes, so
        every process ends with the same failure model as a single process would.
        """
        model, params, restore = self._train_view(self.names[-1])
        loop = _FitLoop(model, params, negatives, learning_rate, warmup_steps, max_grad_norm, rank, world_size)
        generator = torch.Generator().manual_seed(seed)
        losses, log_ratio = [], 0.0
        log_q = self._log_q(model, negatives, loop.device)  # the new model starts as q
        if margin > 0:
            target = min(margin, 0.5 * self._achievable_log_ratio(negatives, log_q))
        else:
            target = min_log_ratio
        try:
            model.train()
            for _ in range(max_epochs):
                loss, nll = loop.epoch(torch.randperm(len(negatives), generator=generator), batch_size)
                losses.append(loss)
                log_ratio = (-nll - log_q.sum().item()) / max(len(negatives), 1)
                if margin > 0 and log_ratio >= target:
                    break
        finally:
            loop.optimizer.zero_grad(set_to_none=True)  # no stale gradients (nor their memory) left behind
            restore()
        if self.mode == "copy" and self.prepare_copy is not None:
            self.copies[-1] = self.prepare_copy(self.copies[-1])
        return FitResult(losses, loop.steps, log_ratio, target, log_ratio >= target)

    @staticmethod
    @torch.no_grad()
    def _log_q(model, negatives: Candidates, device) -> torch.Tensor:
        """`log q` of each negative, under the model about to be fitted (it starts as q)."""
        with eval_mode(model):
            return sequence_log_probs(model, negatives.input_ids.to(device), negatives.attention_mask.to(device),
                                      negatives.completion_mask.to(device), batch_size=512).cpu()

    @staticmethod
    def _achievable_log_ratio(negatives: Candidates, log_q: torch.Tensor) -> float:
        """`KL(p_emp || q)` over the negatives: the mean log-ratio of their empirical distribution (per prompt)."""
        pairs = Counter(zip(negatives.prompt_texts, negatives.completions))
        prompts = Counter(negatives.prompt_texts)
        log_emp = torch.tensor([math.log(pairs[(c, y)] / prompts[c])
                                for c, y in zip(negatives.prompt_texts, negatives.completions)])
        return max(0.0, (log_emp - log_q).mean().item())

    def _train_view(self, name):
        """The model to train for failure model `name`, its trainable parameters, and a function undoing the view."""
        if self.mode == "copy":
            model = self.copies[-1]
            params = [p for p in model.parameters() if p.requires_grad]

            def restore():
                model.eval()

            return model, params, restore
        flags = {p: p.requires_grad for p in self.policy.parameters()}
        was_training = self.policy.training
        adapters.set_adapter_layers(self._peft, enabled=True)
        self._peft.base_model.set_adapter(name)
        params = []
        for n, p in self.policy.named_parameters():
            trainable = f".{name}." in n
            p.requires_grad_(trainable)
            if trainable:
                params.append(p)

        def restore():
            if self.policy_adapter is not None:
                self.policy.set_adapter(self.policy_adapter)
            else:
                adapters.set_adapter_layers(self._peft, enabled=False)
            self._restore_flags(flags)
            self.policy.train(was_training)

        return self.policy, params, restore

    # -- scoring ---------------------------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: ZeRO-3 gathers parameters inside, which must stay usable for training
    def score(self, candidates: Candidates, batch_size: int, length_normalize: bool = False):
        r"""
        Log-likelihoods of the candidates' completions under the generator and every failure model.

        Returns:
            `(policy_logp, failure_logp)`: shapes `(N,)` and `(K, N)`.
        """
        device = next(self.policy.parameters()).device
        ids = candidates.input_ids.to(device)
        att = candidates.attention_mask.to(device)
        comp = candidates.completion_mask.to(device)
        n, k = ids.shape[0], len(self)
        was_training = self.policy.training
        wrapper = self._peft if self._peft is not None else self.policy
        wrapper.eval()  # peft refuses mixed-adapter batches in training mode
        try:
            if self.mode == "copy" or k == 0:
                policy_lp = sequence_log_probs(self.policy, ids, att, comp, batch_size, length_normalize)
                failure_lp = [sequence_log_probs(m, ids, att, comp, batch_size, length_normalize) for m in self.copies]
                return policy_lp, torch.stack(failure_lp) if failure_lp else policy_lp.new_zeros((0, n))
            if self.scoring_path() == "merged":
                # one forward per model over the same tokens, each at the bare model's cost
                lps = []
                for name in [self.policy_adapter] + self.names:
                    with adapters.merged(self._lora_layers(), name):
                        lps.append(sequence_log_probs(self._peft, ids, att, comp, batch_size, length_normalize))
                return lps[0], torch.stack(lps[1:])
            # one mixed-adapter pass: each sequence repeated once per model, each copy routed to its adapter
            base = self.policy_adapter or "__base__"
            names = [name for name in [base] + self.names for _ in range(n)]
            adapters.set_adapter_layers(self._peft, enabled=True)
            try:
                lp = sequence_log_probs(
                    self._peft,
                    ids.repeat(k + 1, 1), att.repeat(k + 1, 1), comp.repeat(k + 1, 1),
                    batch_size, length_normalize, adapter_names=names,
                )
            finally:
                if self.policy_adapter is None:
                    adapters.set_adapter_layers(self._peft, enabled=False)
            lp = lp.view(k + 1, n)
            return lp[0], lp[1:]
        finally:
            wrapper.train(was_training)

    def _lora_layers(self) -> list:
        if self._layers is None:
            self._layers = adapters.lora_layers(self.policy)
        return self._layers

    def scoring_path(self) -> str:
        """The path `score` takes with the current adapters: `"merged"` or `"peft"` (`"copy"` in copy mode).

        Raises a `ValueError` when `scoring="merged"` was asked for adapters it cannot merge."""
        if self.mode == "copy":
            return "copy"
        if self.scoring == "peft":
            return "peft"
        can_merge = adapters.mergeable(self._lora_layers())
        if self.scoring == "merged" and not can_merge:
            raise ValueError("scoring='merged' needs plain float32 linear LoRA layers on unsharded weights; use "
                             "scoring='auto' or 'peft'.")
        return "merged" if can_merge else "peft"


class _FitLoop:
    """The optimisation of one failure-model fit (`FailureModels.fit`): AdamW with a linear warm-up and gradient
    clipping, each process taking its share of every batch and the gradients summed across processes."""

    def __init__(self, model, params, negatives: Candidates, learning_rate: float, warmup_steps: int,
                 max_grad_norm: float | None, rank: int, world_size: int):
        self.model, self.params, self.negatives = model, params, negatives
        self.learning_rate, self.warmup_steps, self.max_grad_norm = learning_rate, warmup_steps, max_grad_norm
        self.rank, self.world_size = rank, world_size
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        self.device = next(model.parameters()).device
        self.steps = 0

    def epoch(self, order: torch.Tensor, batch_size: int) -> tuple[float, float]:
        """One pass over the negatives in `order`: the mean loss (each batch measured before its update) and the
        summed negative log-likelihood."""
        epoch_loss, epoch_nll, n = 0.0, 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss, nll = self.step(idx)
            epoch_loss += loss * len(idx)
            epoch_nll += nll
            n += len(idx)
        return epoch_loss / max(n, 1), epoch_nll

    def step(self, idx: torch.Tensor) -> tuple[float, float]:
        """One optimiser step on the batch `idx`: its loss and summed negative log-likelihood over all processes."""
        negatives, device = self.negatives, self.device
        # tokens of the whole batch: each process divides its share by the global count
        batch_tokens = negatives.completion_mask[idx].sum().clamp(min=1)
        mine = idx[self.rank::self.world_size]
        # a large vocabulary's logits of the whole share would not fit: forward and backward it in parts whose logits
        # stay within MAX_LOGITS_VALUES (their gradients add up to the share's); every process runs as many parts as
        # the largest share needs (ZeRO-3 gathers in every forward)
        share = -(-len(idx) // self.world_size)
        rows = scoring_rows(share, completion_positions(negatives.completion_mask[idx]), vocab_size(self.model))
        self.optimizer.zero_grad(set_to_none=True)
        nll_sum = torch.zeros((), device=device)
        for part in torch.arange(share).split(rows):
            part = part[part < len(mine)]
            rows_part, weight = (mine[part], 1.0) if len(part) else (idx[:1], 0.0)  # an empty part: same forwards
            ids, att = negatives.input_ids[rows_part].to(device), negatives.attention_mask[rows_part].to(device)
            comp = negatives.completion_mask[rows_part].to(device)
            nll = weight * completion_nll(self.model, ids, att, comp, reduction="sum")
            (nll / batch_tokens.to(device)).backward()
            nll_sum = nll_sum + nll.detach()
        loss = nll_sum / batch_tokens.to(device)
        sums = torch.stack([loss, nll_sum])
        if self.world_size > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
            torch.distributed.all_reduce(sums)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate * min(1.0, (self.steps + 1) / (self.warmup_steps + 1))
        self.optimizer.step()
        self.steps += 1
        return sums[0].item(), sums[1].item()
