"""A tiny BaNEL run that a test interrupts with SIGINT and resumes (tests/test_interrupt.py).

`PAUSE_AT=oracle:N` (or `propose:N`): at the start of the N-th reward call (or of the N-th round's proposals) of this
start, write the file `READY_FILE`, then wait `PAUSE_SECONDS` before going on: the window in which the test sends its
signal. `COUNT_FILE` receives every (prompt, completion) handed to the reward function, one JSON line each, fsynced.
After `train()` returns: `OUT/<TAG>.end.safetensors` (the generator as train() left it) and `OUT/<TAG>.json` (what the
trainer says); on a resume, `OUT/<TAG>.begin.safetensors` is the generator when training starts (the checkpoint
loaded).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import quick_skewed_generator  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402
from trl_banel.runs import last_complete_checkpoint  # noqa: E402

OUT, TAG = sys.argv[1], sys.argv[2]
COUNT_FILE = os.environ["COUNT_FILE"]
PAUSE_AT = os.environ.get("PAUSE_AT", "")
READY_FILE = os.environ.get("READY_FILE", "")
PAUSE_SECONDS = float(os.environ.get("PAUSE_SECONDS", "2"))
counts = {"oracle": 0, "propose": 0}


def pause(where: str):
    counts[where] += 1
    if PAUSE_AT == f"{where}:{counts[where]}":
        with open(READY_FILE, "w") as f:
            f.write(where)
        time.sleep(PAUSE_SECONDS)  # the signal arrives in here; the handler returns and the sleep goes on


def oracle(prompts, completions, **kwargs):
    pause("oracle")
    with open(COUNT_FILE, "a") as f:
        for p, c in zip(prompts, completions):
            f.write(json.dumps([p, c]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return [1.0 if c == "zebra" else 0.0 for c in completions]


def weights(model, path):
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)


class GeneratorAtStart(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        weights(self.trainer.model, os.path.join(OUT, f"{TAG}.begin.safetensors"))


def main():
    tok, model = quick_skewed_generator()
    args = BaNELConfig(
        output_dir=OUT, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=0,
        max_reward_evaluations=24, evaluations_per_round=4, num_candidates=32, max_completion_length=8,
        distill_every=int(os.environ.get("DISTILL_EVERY", "1")), distill_samples=16, distill_steps=2,
        per_device_train_batch_size=8, learning_rate=3e-3, failure_epochs=2, failure_learning_rate=1e-2,
        failure_lora_r=4, failure_lora_alpha=8, max_idle_rounds=10, distill_objective="posterior",
        success_replay=0.0, distill_target_kl=0.0,
        # transformers' default save_strategy ("steps", every 500 steps): no checkpoint before the interrupt's
    )
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, args=args, processing_class=tok,
                           train_dataset=Dataset.from_dict({"prompt": [""]}))
    propose = trainer.sampler.propose_accepted

    def paused_propose(want):
        pause("propose")
        return propose(want)

    trainer.sampler.propose_accepted = paused_propose
    resume = os.path.isdir(OUT) and last_complete_checkpoint(OUT) is not None
    if resume:
        trainer.add_callback(GeneratorAtStart(trainer))
    trainer.train(resume_from_checkpoint=True if resume else None)
    weights(trainer.model, os.path.join(OUT, f"{TAG}.end.safetensors"))
    with open(os.path.join(OUT, f"{TAG}.json"), "w") as f:
        json.dump({"interrupted": trainer.interrupted, "round": trainer.round, "spent": trainer.ledger.spent,
                   "global_step": trainer.state.global_step, "lost": len(trainer.ledger.lost)}, f)


if __name__ == "__main__":
    main()
