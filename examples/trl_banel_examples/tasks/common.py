"""What the shipped tasks share: the character tokenizer, unconditional sampling, exact sequence likelihoods.

Every shipped generator is a causal LM that writes its completion from the prompt ``""`` (``[<bos>]``) and ends it
with ``<eos>``. The helpers here work on that convention only.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Optional, Sequence

import torch

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]


def weights_hash(model) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes, bytes): equal hashes, the same sampler. Results files
    record their generator's, so a measurement is never reused for another generator."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_tokenizer(characters: Sequence[str]):
    """Builds a character-level tokenizer (``PreTrainedTokenizerFast``) locally, without a hub: the specials
    ``<pad> <bos> <eos>`` then one token per character of ``characters``.

    Encoding prepends ``<bos>`` (so ``""`` encodes to ``[bos_id]``, the generators' prompt) and never
    appends ``<eos>``; ``decode(ids, skip_special_tokens=True)`` gives the text back exactly.
    Characters outside the vocabulary raise on encoding: there is no ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(characters))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char each
    backend.decoder = decoders.Fuse()  # join tokens without the spaces a WordLevel decode inserts
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        padding_side="right", clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


@torch.inference_mode()
def sample_token_ids(model, tokenizer, n: int, max_new_tokens: int, batch_size: int = 4096,
                     temperature: float = 1.0, seed: int = 0):
    """Yields batches of unconditional samples (prompt ``[<bos>]``) as token-id tensors, ``<bos>`` included.

    A hand-written KV-cached loop: every row starts from the same one-token prompt, so no padding is
    needed, and a seeded ``torch.Generator`` makes the draw reproducible. Rows that have emitted
    ``<eos>`` emit ``<pad>`` afterwards.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        tokens = torch.full((rows, 1), tokenizer.bos_token_id, dtype=torch.long)
        done = torch.zeros(rows, dtype=torch.bool)
        past, step_input = None, tokens
        for _ in range(max_new_tokens):
            result = model(input_ids=step_input.to(model.device), past_key_values=past, use_cache=True)
            past = result.past_key_values
            probs = torch.softmax(result.logits[:, -1].float().cpu() / temperature, dim=-1)
            step_input = torch.multinomial(probs, 1, generator=generator)
            step_input[done] = tokenizer.pad_token_id  # finished rows emit padding
            tokens = torch.cat([tokens, step_input], dim=1)
            done |= step_input[:, 0] == eos
            if done.all():
                break
        yield tokens


@torch.inference_mode()
def sequence_log_probs(model, tokenizer, texts: Sequence[str], batch_size: int = 8192,
                       append_eos: bool = True) -> torch.Tensor:
    """Exact log-probability that the model, from the empty prompt, emits each text then ``<eos>``.

    With ``append_eos=False``: the probability that its completion *starts* with the text (a sample cut at
    ``max_new_tokens`` before any ``<eos>`` is such a prefix).

    Texts may differ in length: rows are right-padded and only each row's own tokens are summed (causal
    attention keeps real tokens independent of the pads after them).
    """
    out = []
    for start in range(0, len(texts), batch_size):
        log_probs, targets, mask = _next_token_log_probs(model, tokenizer, texts[start : start + batch_size],
                                                         append_eos)
        # gathered where the model runs: only the (N, T) log-probabilities leave its device
        out.append((log_probs.gather(2, targets[..., None]).squeeze(-1) * mask).sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def next_token_log_probs(model, tokenizer, texts: Sequence[str], append_eos: bool = True):
    """The model's next-token log-probabilities at every token of each text (after ``<bos>``, then ``<eos>``):
    ``(log_probs, targets, mask)`` of shapes ``(N, T, V)``, ``(N, T)``, ``(N, T)``, on the CPU."""
    return tuple(t.cpu() for t in _next_token_log_probs(model, tokenizer, texts, append_eos))


@torch.no_grad()
def _next_token_log_probs(model, tokenizer, texts: Sequence[str], append_eos: bool):
    """As :func:`next_token_log_probs`, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    eos = [tokenizer.eos_token_id] if append_eos else []
    seqs = [s + eos for s in tokenizer(list(texts)).input_ids]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return logits.float().log_softmax(-1), ids[:, 1:], mask[:, 1:]


# ------------------------------------------------------------------------------ pretraining helpers
def lm_batch(tokenizer, texts: Sequence[str], n_unlabelled: Sequence[int]):
    """Right-padded ids + eos; labels mask the pads and the first ``n_unlabelled[i]`` tokens of row i.

    Returns ``(input_ids, attention_mask, labels)``.
    """
    seqs = [s + [tokenizer.eos_token_id] for s in tokenizer(list(texts)).input_ids]
    ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for row, (seq, skip) in enumerate(zip(seqs, n_unlabelled)):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, skip : len(seq)] = ids[row, skip : len(seq)]
    return ids, (ids != tokenizer.pad_token_id).long(), labels


def train_lm(model, make_batch, steps: int, lr: float, should_stop=lambda step: False, warmup: Optional[int] = None,
             log_every: int = 500):
    """AdamW, linear warm-up then cosine decay over ``steps``, gradients clipped at 1; returns (steps run, seconds).

    ``make_batch()`` returns ``(input_ids, attention_mask, labels)``; ``should_stop(step)`` is asked after each step.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 50) if warmup is None else max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    start, model = time.time(), model.train()
    step = 0
    for step in range(1, steps + 1):
        ids, mask, labels = make_batch()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"  step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
        if should_stop(step):
            break
    model.eval()
    return step, time.time() - start
