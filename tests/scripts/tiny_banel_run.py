"""A tiny BaNEL training for subprocess tests (crash/resume, multi-process).

The oracle counts every evaluation it returns in `COUNT_FILE` (one line per completion, with the process id), so a
test can compare what was paid for across processes with what the ledger holds. `KILL_AT_CALL=N` makes the oracle
SIGKILL its own process at the start of its N-th call: a crash in the middle of a round, after earlier evaluations
reached the disk. `CHUNK_LOGITS=1` lowers the logits limits so that every loss takes the chunked path of a large
vocabulary (`trl_banel.posterior.CompletionChunks`). Each rank writes `rank{N}.json`: a digest of its generator's
weights after training (DDP keeps the ranks' weights equal) and how many chunked passes it made.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import quick_skewed_generator  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from trl_banel import BaNELConfig, BaNELTrainer, posterior  # noqa: E402

OUT = sys.argv[1]
COUNT_FILE = os.environ["COUNT_FILE"]
KILL_AT_CALL = int(os.environ.get("KILL_AT_CALL", "0"))
calls = 0


def oracle(prompts, completions, **kwargs):
    global calls
    calls += 1
    if calls == KILL_AT_CALL:
        os.kill(os.getpid(), signal.SIGKILL)
    with open(COUNT_FILE, "a") as f:
        for c in completions:
            f.write(f"{os.getpid()}\t{c}\n")
        f.flush()
        os.fsync(f.fileno())
    success = os.environ.get("ORACLE_SUCCESS")  # a completion that succeeds (the best generator is then saved)
    return [1.0 if c == success else 0.0 for c in completions]


chunked_passes = 0


def count_chunked_passes():
    """Lower the logits limits (a 45-token vocabulary then chunks as 152k tokens do) and count the chunked passes."""
    posterior.MAX_LOGITS_VALUES, posterior.CHUNK_VALUES = 1, 1_000
    init = posterior.CompletionChunks.__init__

    def counted(self, *args, **kwargs):
        global chunked_passes
        chunked_passes += 1
        init(self, *args, **kwargs)

    posterior.CompletionChunks.__init__ = counted


def write_rank_digest(trainer):
    import hashlib
    import json

    digest = hashlib.sha256()
    for name, p in sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict().items()):
        digest.update(name.encode() + p.detach().cpu().float().numpy().tobytes())
    with open(os.path.join(OUT, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump({"weights": digest.hexdigest(), "chunked_passes": chunked_passes}, f)


def main():
    if os.environ.get("CHUNK_LOGITS") == "1":
        count_chunked_passes()
    tok, model = quick_skewed_generator()
    args = BaNELConfig(
        output_dir=OUT, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=0,
        max_reward_evaluations=int(os.environ.get("BUDGET", "30")), evaluations_per_round=4, num_candidates=32,
        max_completion_length=8, distill_every=int(os.environ.get("DISTILL_EVERY", "1")), distill_samples=16,
        distill_steps=2, per_device_train_batch_size=8, learning_rate=3e-3, failure_epochs=2,
        failure_learning_rate=1e-2, failure_lora_r=4, failure_lora_alpha=8,
        save_strategy=os.environ.get("SAVE_STRATEGY", "steps"), save_steps=1,
        max_idle_rounds=int(os.environ.get("MAX_IDLE_ROUNDS", "3")),
        failure_model=os.environ.get("FAILURE_MODEL", "adapter"),
        # regions kept across distillations: failure models are dropped one by one, not all at once
        keep_failure_models=os.environ.get("KEEP_FAILURE_MODELS") == "1", max_failure_models=2,
        failure_margin=float(os.environ.get("FAILURE_MARGIN", "0")),
        distill_objective=os.environ.get("DISTILL_OBJECTIVE", "posterior"),
    )
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, args=args,
                           train_dataset=Dataset.from_dict({"prompt": [""]}),
                           processing_class=tok)
    resume = get_last_checkpoint(OUT) if os.path.isdir(OUT) else None
    trainer.train(resume_from_checkpoint=resume)
    write_rank_digest(trainer)
    # every rank takes part in the estimate (the generate/forward calls must line up under ZeRO-3); its oracle is
    # a separate function: the estimate never touches the training oracle nor the ledger
    estimate = trainer.estimate_success_rate(12, reward_funcs=lambda prompts, completions, **kw: [
        1.0 if c == "zebra" else 0.0 for c in completions])
    trainer.save_model(os.path.join(OUT, "final"))
    if trainer.accelerator.is_main_process:
        import json

        with open(os.path.join(OUT, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
        with open(os.path.join(OUT, "done.txt"), "w") as f:
            # failure models active in the last round (train() hands the generator back without them)
            models = trainer.history[-1]["failure/num_models"] if trainer.history else 0
            f.write(f"{trainer.accelerator.num_processes} {trainer.ledger.spent} {trainer.round} {models} "
                    f"{estimate.samples}\n")
    # Every output is written and closed. Under ZeRO-3 a rank sometimes aborts while C++ objects are torn down at exit
    # ("terminate called without an active exception", SIGABRT), even after leaving the process group: once all ranks
    # are here, exit without that teardown.
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
