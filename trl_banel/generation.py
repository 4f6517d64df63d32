"""Where the round gets its completions: one call, prompts in, completion token ids out.

Every proposal of a run (the completions a round evaluates, the distillation's draws, the success estimates) is
sampled by [`TransformersGeneration`]; an inference engine such as vLLM (which TRL's GRPO uses on GPUs) would replace
this class and nothing else, as long as it samples from the generator as it is now (its current weights, temperature
1, no top-k: the filter's likelihoods are the generator's) and applies the prefix evidence's logits processor. None
is provided here: no such code lands untested, and it needs a GPU to test.
"""

import torch
from transformers import LogitsProcessorList
from trl.models.utils import unwrap_model_for_generation

from .adapters import no_checkpointing_deprecation
from .evidence import EvidenceLogitsProcessor
from .posterior import completion_mask_after_prompt, eval_mode, scoring_rows, vocab_size


class TransformersGeneration:
    r"""
    Samples completions with `model.generate` (KV-cached), in chunks whose logits stay within
    [`~trl_banel.posterior.MAX_LOGITS_VALUES`].

    Args:
        args ([`BaNELConfig`]): `temperature`, `top_k`, `max_completion_length`, `generation_batch_size`,
            `evidence_pseudo_count`, `failure_model`.
        tokenizer: pads prompts and ends completions (its pad and EOS tokens).
        accelerator: the trainer's `Accelerator`.
        model (`Callable`): returns the model to generate with (the trainer's `model_wrapped`, set in `train()`).
        failures ([`~trl_banel.failure.FailureModels`]): the active failure models (see the ZeRO-3 note below).
        zero3 (`bool`): whether the generator is sharded by DeepSpeed ZeRO-3.
    """

    def __init__(self, args, tokenizer, accelerator, model, failures, zero3: bool):
        self.args, self.tokenizer, self.accelerator = args, tokenizer, accelerator
        self.model, self.failures, self.zero3 = model, failures, zero3

    @torch.no_grad()
    def __call__(self, prompts: list[tuple[str, list[int]]], evidence) -> list[list[int]]:
        """One completion per `(prompt_text, prompt_ids)`: its token ids, EOS included when the generator stopped,
        no padding. `evidence` ([`~trl_banel.evidence.PrefixEvidence`]) lowers the logits of prefixes failures went
        through, with `evidence_pseudo_count > 0`."""
        # Under ZeRO-3, TRL's helper gathers the full weights for generation, which needs every parameter to be
        # DeepSpeed's; failure adapters injected after the engine was built are not, so while any is present the
        # model generates with per-module gathering instead, the processes kept in step by `synced_gpus`.
        gather = not (self.zero3 and len(self.failures) and self.args.failure_model == "adapter")
        completion_ids = []
        unwrap = unwrap_model_for_generation(self.model(), self.accelerator, gather_deepspeed3_params=gather)
        with no_checkpointing_deprecation(), unwrap as model, eval_mode(model) as unwrapped:
            # each generation step holds a few copies of the next-token logits of every sequence generating: at a
            # large vocabulary fewer sequences per call, so that they stay within MAX_LOGITS_VALUES
            per_call = scoring_rows(self.args.generation_batch_size, 1, vocab_size(unwrapped))
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start : start + per_call]
                completion_ids += self._sample(unwrapped, chunk, evidence, synced_gpus=self.zero3 and not gather)
        return completion_ids

    def _sample(self, model, chunk: list[tuple[str, list[int]]], evidence, synced_gpus: bool) -> list[list[int]]:
        """The completions' token ids (EOS included, padding not) for a chunk of `(prompt_text, prompt_ids)`."""
        args, tok = self.args, self.tokenizer
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (_, ids) in enumerate(chunk):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        processors = LogitsProcessorList()
        if args.evidence_pseudo_count > 0:
            processors.append(EvidenceLogitsProcessor(evidence, [text for text, _ in chunk], width,
                                                      args.evidence_pseudo_count))
        eos_ids = [tok.eos_token_id]
        out = model.generate(
            input_ids=input_ids.to(self.accelerator.device), logits_processor=processors,
            attention_mask=attention.to(self.accelerator.device),
            do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=1.0,
            max_new_tokens=args.max_completion_length, min_new_tokens=0,
            pad_token_id=tok.pad_token_id, eos_token_id=eos_ids, synced_gpus=synced_gpus, use_cache=True,
        ).cpu()
        completion = out[:, width:]
        comp_mask = completion_mask_after_prompt(completion, eos_ids, tok.pad_token_id)
        return [completion[i][comp_mask[i].bool()].tolist() for i in range(len(chunk))]
