"""Proposals, their sequence log-likelihoods, and the posterior-rejection test.

Candidates are kept as one padded batch: left-padded prompt tokens followed by right-padded completion tokens
(ending with EOS when the model stopped). Every model scores the same tokens: the completion tokens only, with
position ids that skip padding exactly as generation did.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# The most logits one scoring forward may hold: 64M values (256 MB in float32), whatever the vocabulary. Chunks of
# sequences are cut to fit (down to one sequence), so scoring memory does not grow with the number of candidates nor,
# beyond one sequence's logits, with the vocabulary (at 151,936 tokens a 128-token completion's logits are 19.6M).
MAX_LOGITS_VALUES = 64_000_000
# A training micro-batch whose completion logits would hold more values than MAX_LOGITS_VALUES is computed in chunks
# of positions of at most this many logits each (see `CompletionChunks`): at 151,936 tokens, 8 sequences of 128
# tokens take 22 chunks of 6 positions (32 MB of logits each) instead of 598 MB at once.
CHUNK_VALUES = 8_000_000


@dataclass
class Candidates:
    r"""A batch of `(prompt, completion)` pairs with the tensors needed to score or train on them."""

    input_ids: torch.LongTensor  # (N, P + C)
    attention_mask: torch.LongTensor  # (N, P + C)
    completion_mask: torch.LongTensor  # (N, P + C): 1 on completion tokens (EOS included)
    prompt_width: int  # P: completions start at this column
    prompts: list  # the prompt as given in the dataset (text or conversation)
    prompt_texts: list[str]  # the prompt as one string (the ledger key)
    completions: list[str]
    rows: list[int]  # dataset row of each candidate

    def __len__(self):
        return self.input_ids.shape[0]

    def select(self, index) -> "Candidates":
        index = [int(i) for i in index]
        t = torch.tensor(index, dtype=torch.long)
        return Candidates(
            self.input_ids[t],
            self.attention_mask[t],
            self.completion_mask[t],
            self.prompt_width,
            [self.prompts[i] for i in index],
            [self.prompt_texts[i] for i in index],
            [self.completions[i] for i in index],
            [self.rows[i] for i in index],
        )


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode (no dropout: a score or a sample judges the generator as it is), its mode restored
    after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask_after_prompt(completion_ids: torch.Tensor, eos_token_ids: list[int], pad_token_id: int):
    """1 on generated tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= completion_ids == e
    # tokens strictly after the first EOS are padding
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


def vocab_size(model) -> int | None:
    """The model's vocabulary size from its config (`None` if it has no config saying so), under a DDP wrapper or a
    DeepSpeed engine too (their `module` holds the config)."""
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "vocab_size", None)


def scoring_rows(batch_size: int, positions: int, vocab: int | None, max_values: int | None = None) -> int:
    """Sequences per forward pass: `batch_size`, fewer where their logits (`positions x vocab` values each) would
    exceed `max_values` (defaults to [`MAX_LOGITS_VALUES`]); at least one."""
    if not vocab:
        return max(1, batch_size)
    max_values = MAX_LOGITS_VALUES if max_values is None else max_values
    return max(1, min(batch_size, max_values // max(positions * vocab, 1)))


def completion_positions(completion_mask: torch.Tensor) -> int:
    """How many positions' logits scoring these sequences computes (the completion columns, plus one)."""
    start = int(completion_mask.any(0).long().argmax()) if completion_mask.any() else completion_mask.shape[1] - 1
    return completion_mask.shape[1] - start + 1


def _completion_logits(model, input_ids, attention_mask, completion_mask, **forward_kwargs):
    r"""
    Logits at every completion position with their targets and mask: shapes `(N, C, V)`, `(N, C)`, `(N, C)`.

    Completions start at the same column for every row (prompts are left-padded), so only the last `C + 1` positions'
    logits are computed (`logits_to_keep`), in fp32: the prompt's logits over a large vocabulary are never made.
    """
    start = int(completion_mask.any(0).long().argmax()) if completion_mask.any() else input_ids.shape[1] - 1
    keep = input_ids.shape[1] - start + 1
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=keep, **forward_kwargs,
    ).logits[:, -keep:-1].float()
    return logits, input_ids[:, start:], completion_mask[:, start:].to(logits.dtype)


def output_layer(model):
    """The output layer of `model` (under a DDP wrapper or a PEFT model), or None where the logits are not that layer
    applied to the last hidden state: DeepSpeed engines (their parameters are gathered only inside their forward),
    soft-capped or scaled logits."""
    if hasattr(model, "zero_optimization_stage"):  # a DeepSpeed engine
        return None
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    getter = getattr(inner, "get_output_embeddings", None)
    return getter() if getter is not None else None


def chunked(model, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> bool:
    """Whether a training micro-batch's completion logits would exceed `MAX_LOGITS_VALUES` (and the model lets its
    output layer be applied outside its forward): then the losses take them in chunks ([`CompletionChunks`])."""
    vocab = vocab_size(model)
    size = input_ids.shape[0] * completion_positions(completion_mask) * (vocab or 0)
    return size > MAX_LOGITS_VALUES and output_layer(model) is not None


class CompletionChunks:
    r"""
    One forward pass of a micro-batch that keeps the final hidden states of its completion positions instead of
    their logits. `log_softmax(sl)` makes the next-token log-probabilities of the positions `sl` from them (the output
    layer, in float32, as the model's own logits are), and `total(term)` sums `term(log_probs, sl)` over chunks of at
    most `CHUNK_VALUES` logits, each chunk's logits made again in the backward pass (activation checkpointing): one
    chunk's vocabulary-sized tensors exist at a time, not the micro-batch's. `targets` and `mask` are as
    [`completion_log_softmax`] returns them.
    """

    def __init__(self, model, input_ids, attention_mask, completion_mask, max_values: int | None = None):
        start = int(completion_mask.any(0).long().argmax()) if completion_mask.any() else input_ids.shape[1] - 1
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=1, output_hidden_states=True)
        self.hidden = out.hidden_states[-1][:, start - 1: -1]
        self.head = output_layer(model)
        self.targets = input_ids[:, start:]
        self.mask = completion_mask[:, start:].float()
        rows, width = self.targets.shape
        step = max(1, (max_values or CHUNK_VALUES) // max(rows * self.head.weight.shape[0], 1))
        self.slices = [slice(a, min(a + step, width)) for a in range(0, width, step)]

    def log_softmax(self, sl: slice, hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden[:, sl] if hidden is None else hidden).float().log_softmax(-1)

    def total(self, term) -> torch.Tensor:
        parts = [checkpoint(lambda h, sl=sl: term(self.log_softmax(sl, h), sl), self.hidden[:, sl],
                            use_reentrant=False) for sl in self.slices]
        return torch.stack(parts).sum(0)


def completion_log_softmax(model, input_ids, attention_mask, completion_mask, **forward_kwargs):
    r"""Log-softmax over the vocabulary at every completion position: `(log_probs, targets, mask)` of shapes
    `(N, C, V)`, `(N, C)` and `(N, C)` (for losses that need whole distributions, such as a KL)."""
    logits, targets, mask = _completion_logits(model, input_ids, attention_mask, completion_mask, **forward_kwargs)
    return logits.log_softmax(-1), targets, mask


def completion_token_log_probs(model, input_ids, attention_mask, completion_mask, **forward_kwargs):
    r"""Log-probabilities of the completion tokens: `(token_log_probs, mask)`, both of shape `(N, C)` (no second
    vocabulary-sized tensor is made: the scoring path's cost)."""
    logits, targets, mask = _completion_logits(model, input_ids, attention_mask, completion_mask, **forward_kwargs)
    token_lp = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return token_lp, mask


def sequence_log_probs(model, input_ids, attention_mask, completion_mask, batch_size: int, length_normalize=False,
                       **forward_kwargs) -> torch.Tensor:
    r"""
    Sum (or mean, with `length_normalize`) of the completion tokens' log-probabilities under `model`, in chunks of
    `batch_size` sequences, fewer where a chunk's logits would exceed [`MAX_LOGITS_VALUES`] (a large vocabulary).
    Extra keyword arguments (for example peft's `adapter_names`, one per sequence) are sliced per chunk when they are
    lists.
    """
    out = []
    batch_size = scoring_rows(batch_size, completion_positions(completion_mask), vocab_size(model))
    for start in range(0, input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        kwargs = {k: (v[sl] if isinstance(v, list) else v) for k, v in forward_kwargs.items()}
        token_lp, mask = completion_token_log_probs(
            model, input_ids[sl], attention_mask[sl], completion_mask[sl], **kwargs)
        total = (token_lp * mask).sum(1)
        if length_normalize:
            total = total / mask.sum(1).clamp(min=1)
        out.append(total)
    return torch.cat(out) if out else torch.zeros(0)


def support_gaps(model, input_ids, attention_mask, completion_mask, batch_size: int) -> torch.Tensor:
    r"""
    Per sequence, how far its least likely completion token lies below `model`'s most likely token at that position:
    the largest `log p(top token) - log p(token)` over the completion (0 for a greedy completion), shape `(N,)`.
    Computed from the logits alone (the normaliser cancels), in chunks as [`sequence_log_probs`] scores.
    """
    out = []
    batch_size = scoring_rows(batch_size, completion_positions(completion_mask), vocab_size(model))
    for start in range(0, input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        logits, targets, mask = _completion_logits(model, input_ids[sl], attention_mask[sl], completion_mask[sl])
        gap = logits.max(-1).values - torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)
        out.append((gap * mask).max(1).values)  # gaps are >= 0: masked positions (0) never win
    return torch.cat(out) if out else torch.zeros(0)


def completion_nll(model, input_ids, attention_mask, completion_mask, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of the completion tokens, per token (`"mean"`) or summed (`"sum"`): the MLE loss of
    failure fits and distillation."""
    token_lp, mask = completion_token_log_probs(model, input_ids, attention_mask, completion_mask)
    total = -(token_lp * mask).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


def token_kl(log_probs: torch.Tensor, reference_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Mean over masked positions of `KL(model || reference)` between next-token distributions (shapes `(N, C, V)`,
    `(N, C, V)`, `(N, C)`). It grows wherever the model puts mass the reference does not (off its support), and it
    rewards the model's entropy (`KL = -H(model) - E_model[log reference]`)."""
    kl = (log_probs.exp() * (log_probs - reference_log_probs)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def rejection_mask(policy_logp: torch.Tensor, failure_logp: torch.Tensor, rejection_threshold: float):
    r"""
    The posterior-rejection test.

    Args:
        policy_logp (`torch.Tensor` of shape `(N,)`): `log q(y|c)`.
        failure_logp (`torch.Tensor` of shape `(K, N)`): `log p_j(y|c)` for each active failure model.
        rejection_threshold (`float`): tau.

    Returns:
        `(rejected, min_log_ratio)`: a boolean `(N,)` mask, true where `log q - log p_j < log tau` for any `j`, and
        the smallest log-ratio over the failure models (`+inf` with none active).
    """
    if failure_logp.numel() == 0:
        return torch.zeros_like(policy_logp, dtype=torch.bool), torch.full_like(policy_logp, float("inf"))
    min_log_ratio = (policy_logp.unsqueeze(0) - failure_logp).min(0).values
    return min_log_ratio < torch.log(torch.tensor(rejection_threshold, dtype=min_log_ratio.dtype)), min_log_ratio
