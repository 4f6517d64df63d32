"""A BaNEL run to be SIGKILLed from outside and resumed, over and over (tests/test_crash.py).

What it tells the test, through files that outlive the processes:
- `COUNT_FILE`: the reward function appends `begin <call> <items as JSON>` (fsynced) as soon as it is called, then
  works for `ORACLE_SECONDS`, then appends `end <call>`. Every (prompt, completion) passed to it is in a `begin`
  line, so the test counts what was paid for without trusting the trainer.
  It always answers (never None, never raises).
- `PHASE_FILE`: on the main process, the phase the run is in (propose, filter, oracle, failure_fit, distill,
  checkpoint, other), rewritten at every change, so the test can aim a kill at a phase.
- `OUT/done.json` at the end: what the trainer reports; `OUT/final`: the saved model.

Each start resumes the way a user's script does: `train(resume_from_checkpoint=get_last_checkpoint(OUT))`.

`crash_run.py OUT --zygote` imports everything once, then starts one run per line read on stdin in a forked child
(its own session, stderr to the file the line names) and writes the child's pid to stdout; when a child exits,
`<stderr file>.exit` receives its exit code. A start then costs a fork instead of a 15-second import; each run is still
its own process, killed with SIGKILL and resumed from the disk alone.
"""

import contextlib
import json
import os
import signal
import sys
import time
import traceback
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import quick_skewed_generator  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402
from trl_banel.runs import last_complete_checkpoint  # noqa: E402

OUT = sys.argv[1]
COUNT_FILE = os.environ["COUNT_FILE"]
PHASE_FILE = os.environ.get("PHASE_FILE")
ORACLE_SECONDS = float(os.environ.get("ORACLE_SECONDS", "0.3"))


def append(line: str):
    with open(COUNT_FILE, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def oracle(prompts, completions, **kwargs):
    call = uuid.uuid4().hex
    append(f"begin\t{call}\t{json.dumps([[p, c] for p, c in zip(prompts, completions)])}")
    time.sleep(ORACLE_SECONDS)  # a slow, paid oracle: the window a crash can hit
    append(f"end\t{call}")
    return [1.0 if c == "zebra" else 0.0 for c in completions]


class Phases:
    """Writes the innermost phase the trainer is in to PHASE_FILE (main process only)."""

    def __init__(self, trainer):
        self.stack = ["other"]
        self.enabled = PHASE_FILE is not None and trainer.accelerator.is_main_process
        # the trainer's public seams: its phase timer, its steps, the model saving a checkpoint begins with, and
        # the callback event that follows a complete checkpoint
        timed, step, save = trainer.timer.timed, trainer.training_step, trainer.save_model

        @contextlib.contextmanager
        def phase_timed(name):
            with self.phase(name), timed(name):
                yield

        def phase_step(*args, **kwargs):
            with self.phase("distill"):  # a round, when due, runs inside the step: its phases nest
                return step(*args, **kwargs)

        def phase_save(output_dir=None, _internal_call=False):
            if _internal_call and os.path.basename(str(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
                self.enter("checkpoint")  # left in on_save, once every file of the checkpoint is written
            return save(output_dir, _internal_call)

        phases = self

        class CheckpointSaved(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                phases.leave()

        trainer.timer.timed, trainer.training_step, trainer.save_model = phase_timed, phase_step, phase_save
        trainer.add_callback(CheckpointSaved())

    def write(self):
        if self.enabled:
            with open(PHASE_FILE, "w") as f:
                f.write(self.stack[-1])

    def enter(self, name):
        self.stack.append(name)
        self.write()

    def leave(self):
        self.stack.pop()
        self.write()

    @contextlib.contextmanager
    def phase(self, name):
        self.enter(name)
        try:
            yield
        finally:
            self.leave()


def main():
    tok, model = quick_skewed_generator()
    args = BaNELConfig(
        output_dir=OUT, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=0,
        max_reward_evaluations=int(os.environ.get("BUDGET", "24")), evaluations_per_round=4, num_candidates=32,
        max_completion_length=8, distill_every=1, distill_samples=16, distill_steps=2, per_device_train_batch_size=8,
        learning_rate=3e-3, failure_epochs=2, failure_learning_rate=1e-2, failure_lora_r=4, failure_lora_alpha=8,
        save_strategy="steps", save_steps=1, max_idle_rounds=10,
    )
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, args=args, processing_class=tok,
                           train_dataset=Dataset.from_dict({"prompt": [""]}))
    Phases(trainer)
    # as a script would, with transformers' last checkpoint (the trainer falls back from an incomplete one to the last
    # complete one before it); a kill in the first checkpoint leaves none complete: start again from the ledger
    resume = os.path.isdir(OUT) and last_complete_checkpoint(OUT) is not None
    trainer.train(resume_from_checkpoint=get_last_checkpoint(OUT) if resume else None)
    trainer.save_model(os.path.join(OUT, "final"))
    if trainer.accelerator.is_main_process:
        ledger = trainer.ledger
        with open(os.path.join(OUT, "done.json"), "w") as f:
            json.dump({"world": trainer.accelerator.num_processes, "spent": ledger.spent, "budget": ledger.budget,
                       "records": len(ledger.records), "lost": [[r.prompt, r.completion] for r in ledger.lost],
                       "rounds": trainer.round, "global_step": trainer.state.global_step}, f)
    # leave the process group before exit: left to interpreter shutdown, its threads can abort a rank (SIGABRT)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def zygote():
    exits = {}  # child pid -> its stderr file

    def reap(signum, frame):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            with open(exits.pop(pid) + ".exit", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))

    signal.signal(signal.SIGCHLD, reap)
    for line in sys.stdin:
        stderr_path = line.strip()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # the child is registered before it is reaped
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            os.setsid()
            err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(err, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            code = 0
            try:
                main()
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        exits[pid] = stderr_path
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(pid, flush=True)


if __name__ == "__main__":
    zygote() if sys.argv[2:] == ["--zygote"] else main()
