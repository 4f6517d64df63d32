"""Ctrl-C (SIGINT) and SIGTERM keep the training: the run stops at its next safe point with a complete checkpoint, says
in one line how to go on, and the resumed run starts from the generator it stopped with, paying for nothing twice."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import UNCONDITIONAL, RecordingOracle, config

from trl_banel import BaNELTrainer
from trl_banel.callbacks import StopOnSignal
from trl_banel.runs import RUN_FILENAME, is_complete_checkpoint, last_complete_checkpoint, load_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "interrupt_run.py"


class _Trainer:  # what StopOnSignal needs of a trainer on one process
    class accelerator:
        num_processes = 1


def test_the_first_signal_asks_the_second_interrupts_and_handlers_come_back():
    # Python's own Ctrl-C handler, as an interactive session has it (a job started in the background by a
    # non-interactive shell, as a CI runner may start the suite, inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        stop = StopOnSignal(_Trainer())
        with stop.installed():
            assert all(signal.getsignal(s) != b for s, b in zip((signal.SIGINT, signal.SIGTERM), before)), \
                "not installed"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs at the next bytecode
            assert stop.received == "SIGINT" and stop.requested() and stop.stopped == "SIGINT"
            with pytest.raises(KeyboardInterrupt):  # the handler found before: a second Ctrl-C stops at once
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
        with stop.installed():  # and it starts over at the next train()
            assert stop.received is None and not stop.requested()
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_signal_in_a_reward_call_stops_after_the_round_with_a_checkpoint(tmp_path, char_tokenizer, skewed_model,
                                                                          skewed_model_state, capsys):
    calls = []

    def oracle(prompts, completions, **kwargs):
        calls.append(list(completions))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a cluster's preemption, in the middle of the call
        return [0.0] * len(completions)

    # transformers' default save_strategy ("steps", every 500): no checkpoint would exist before the end
    args = config(tmp_path, save_strategy="steps", save_steps=500, max_reward_evaluations=40, evaluations_per_round=4,
                  distill_every=2)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    handler = signal.getsignal(signal.SIGTERM)
    trainer.train()
    assert signal.getsignal(signal.SIGTERM) == handler
    assert trainer.interrupted == "SIGTERM" and trainer.stop_reason == "interrupted (SIGTERM)"
    assert trainer.round == 2 and len(calls) == 2, "the round of the signal ended, no other began"
    out = tmp_path / "out"
    checkpoint = last_complete_checkpoint(str(out))
    assert checkpoint.endswith(f"checkpoint-{trainer.state.global_step}")
    state = load_state(checkpoint)
    assert state["round"] == 2 and state["rounds_in_phase"] == 2 and not state["finished"]
    assert trainer.ledger.spent == sum(map(len, calls))
    assert {c["completion"] for c in state["negatives"]} == {r.completion for r in trainer.ledger.records}
    finished = json.loads((out / RUN_FILENAME).read_text())
    assert finished["interrupted"] == "SIGTERM" and finished["checkpoint"] == os.path.basename(checkpoint)
    console = capsys.readouterr()
    assert "stopped after 2 rounds: interrupted (SIGTERM)" in console.out
    assert "No success in" not in console.out + console.err, "an interrupted run got the end-of-run advice"

    # resumed: from the generator the signal stopped (the phase's deferred distillation runs first), the rounds go on
    from conftest import make_tiny_model
    from transformers import TrainerCallback

    model = make_tiny_model(char_tokenizer)
    model.load_state_dict(skewed_model_state)
    generator = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    at_start = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            at_start.update({k: v.clone() for k, v in model.state_dict().items()})

    def oracle_again(prompts, completions, **kwargs):
        calls.append(list(completions))
        return [0.0] * len(completions)

    again = BaNELTrainer(model=model, reward_funcs=oracle_again, args=args, train_dataset=UNCONDITIONAL,
                         processing_class=char_tokenizer, callbacks=[AtStart()])
    again.train(resume_from_checkpoint=True)
    assert generator.keys() == at_start.keys() and all(torch.equal(generator[k], at_start[k]) for k in generator)
    assert any(not torch.equal(generator[k], model.state_dict()[k]) for k in generator), "no training after resume"
    assert again.interrupted is None and again.ledger.spent == 40
    completions = [c for call in calls for c in call]
    assert len(completions) == len(set(completions)) == 40, "a completion was paid for twice"
    assert [h["round"] for h in again.history] == list(range(again.round))


def run(out, tag, env, signal_after=None):
    """Start the script; with `signal_after`, send SIGINT once it writes its ready file. Returns (exit code,
    output)."""
    ready = out.parent / f"{tag}.ready"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "READY_FILE": str(ready),
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), tag], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if signal_after:
        deadline = time.time() + 300
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.read_text() == signal_after, "the run never reached the point to interrupt"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow  # three starts of a subprocess: about 30 s
def test_ctrl_c_mid_round_and_mid_reward_call_then_resume(tmp_path):
    out, count = tmp_path / "run", tmp_path / "paid.jsonl"
    env = {"COUNT_FILE": str(count), "DISTILL_EVERY": "2", "PAUSE_SECONDS": "2"}
    # 1. in the third round's proposals (the first round of the second phase): the round ends, the phase waits
    code, output = run(out, "a", {**env, "PAUSE_AT": "propose:3"}, signal_after="propose")
    a = json.loads((out / "a.json").read_text())
    # 2. in the first reward call of the resumed run (round 3: its phase is then complete, its distillation waits)
    code_b, output_b = run(out, "b", {**env, "PAUSE_AT": "oracle:1"}, signal_after="oracle")
    b = json.loads((out / "b.json").read_text())
    # 3. to the end of the budget
    code_c, output_c = run(out, "c", env)
    c = json.loads((out / "c.json").read_text())

    for code, output, stopped, tag in ((code, output, a, "a"), (code_b, output_b, b, "b")):
        assert code in (0, 130), output[-3000:]
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
        lines = [line for line in output.splitlines() if "resume_from_checkpoint=True" in line]
        assert len(lines) == 1 and "Interrupted by SIGINT" in lines[0], output[-3000:]
        assert stopped["interrupted"] == "SIGINT"
        checkpoint = out / f"checkpoint-{stopped['global_step']}"
        assert str(checkpoint) in lines[0] and is_complete_checkpoint(str(checkpoint))
        state = load_state(str(checkpoint))
        assert state["round"] == stopped["round"] and state["negatives"]
        assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    assert a["round"] == 3 and b["round"] == 4
    assert code_c == 0 and c["interrupted"] is None and c["spent"] == 24, output_c[-3000:]
    # each resume starts from the generator the interrupted start ended with
    assert same_weights(out / "a.end.safetensors", out / "b.begin.safetensors")
    assert same_weights(out / "b.end.safetensors", out / "c.begin.safetensors")
    # nothing paid twice, nothing lost: every item handed to the oracle is in the ledger, once
    paid = [tuple(json.loads(line)) for line in count.read_text().splitlines()]
    ledger = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert len(paid) == len(set(paid)) == len(ledger) == 24 and c["lost"] == 0
    assert set(paid) == {(r["prompt"], r["completion"]) for r in ledger}
    rounds = [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds == list(range(c["round"]))


def test_a_checkpoint_every_few_minutes(tmp_path, char_tokenizer, skewed_model_state):
    from conftest import make_tiny_model

    def checkpoints_of(minutes, name):
        model = make_tiny_model(char_tokenizer)
        model.load_state_dict(skewed_model_state)
        args = config(tmp_path, output_dir=str(tmp_path / name), save_strategy="steps", save_steps=500,
                      save_every_minutes=minutes, save_total_limit=None)
        trainer = BaNELTrainer(model=model, reward_funcs=RecordingOracle(), args=args, train_dataset=UNCONDITIONAL,
                               processing_class=char_tokenizer)
        trainer.train()
        return sorted(int(p.name.split("-")[1]) for p in (tmp_path / name).glob("checkpoint-*")), trainer

    every_step, trainer = checkpoints_of(1e-6, "often")  # due at every step
    assert every_step == list(range(1, trainer.state.global_step + 1))
    final_only, trainer = checkpoints_of(None, "never")
    assert final_only == [trainer.state.global_step]
    with pytest.raises(ValueError, match="BaNELConfig.save_every_minutes=0"):
        checkpoints_of(0, "bad")
