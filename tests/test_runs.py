"""A checkpoint's BaNEL state: saved without pickle, loaded without running code, the pickles of earlier versions only
on request."""

import math
import os

import numpy as np
import pytest
import torch
from test_trainer import UNCONDITIONAL, RecordingOracle, config

from trl_banel import BaNELTrainer
from trl_banel import runs
from trl_banel.runs import (ALLOW_PICKLE_ENV, BANEL_STATE_NAME, BANEL_TENSORS_NAME, LEGACY_STATE_NAME,
                            PickledStateError, load_state, save_state_last)


def assert_same(a, b, where="state"):
    """Equal values of equal types, tensors equal in dtype, shape and content."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_values_and_tensors_round_trip(tmp_path):
    weights = torch.randn(4, 3)
    state = {
        "round": 3, "finished": False, "nothing": None, "ratio": float("nan"), "inf": float("-inf"),
        "rng": {"state": {"state": 2**100 + 7, "inc": 2**64 + 1}, "has_uint32": 0},  # numpy's PCG64 state: big ints
        "pair": (1, "a"), "numpy": np.float32(0.5),
        "buffer": [{"input_ids": torch.arange(6).reshape(2, 3), "skip": True, "weight": torch.tensor([0.5, -1.0])}],
        # a view and its base share memory (safetensors refuses that as is), an empty and a bool tensor
        "failure_models": [{"a.weight": weights, "a.view": weights[1:]}, {"empty": torch.zeros(0, 2),
                                                                         "mask": torch.tensor([True, False])}],
        "conversation": [{"role": "user", "content": "2+2="}],
    }
    (tmp_path / "ckpt").mkdir()
    save_state_last(state, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == [BANEL_STATE_NAME, BANEL_TENSORS_NAME]
    loaded = load_state(str(tmp_path / "ckpt"))
    assert_same(loaded, {**state, "numpy": 0.5})

    with pytest.raises(TypeError, match="cannot be saved without pickle"):
        save_state_last({"x": object()}, str(tmp_path / "ckpt"))


def test_a_tensors_file_from_another_save_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_state_last({"t": torch.zeros(2)}, str(folder))
    with open(folder / BANEL_TENSORS_NAME, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="is not the file"):
        load_state(str(folder))


class Payload:
    """Unpickling this creates a marker file: code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_state_is_never_unpickled_by_default(tmp_path, char_tokenizer, skewed_model, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    out, marker = tmp_path / "out", tmp_path / "code_ran"
    folder = out / "checkpoint-2"
    folder.mkdir(parents=True)
    torch.save({"round": 1, "payload": Payload(marker)}, folder / LEGACY_STATE_NAME)

    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(), args=config(tmp_path),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    refused = rf"checkpoint-2/{LEGACY_STATE_NAME}.*run any code.*{ALLOW_PICKLE_ENV}=1"
    with pytest.raises(PickledStateError, match=refused):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(PickledStateError):
        load_state(str(folder))
    assert not marker.exists(), "the checkpoint's code ran"
    assert trainer.ledger.spent == 0 and not list(out.glob("checkpoint-*/model.safetensors")), "it trained anyway"

    # the opt-in loads it as before (and so runs what it carries: the reason it is an opt-in)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    assert load_state(str(folder))["round"] == 1 and marker.exists()


def test_a_checkpoint_resumes_from_the_state_it_saved_and_from_an_allowed_legacy_one(
        tmp_path, char_tokenizer, skewed_model_state, monkeypatch):
    from conftest import make_tiny_model

    saved = {}
    original = runs.save_state_last

    def keep(state, folder):
        saved[os.path.basename(folder)] = state
        original(state, folder)

    monkeypatch.setattr("trl_banel.trainer.save_state_last", keep)

    def trainer_for(budget):
        model = make_tiny_model(char_tokenizer)
        model.load_state_dict(skewed_model_state)
        args = config(tmp_path, save_strategy="steps", save_steps=2, max_reward_evaluations=budget,
                      evaluations_per_round=4, distill_every=2, keep_failure_models=True, failure_model="adapter")
        return BaNELTrainer(model=model, reward_funcs=RecordingOracle(), args=args, train_dataset=UNCONDITIONAL,
                            processing_class=char_tokenizer)

    first = trainer_for(16)
    first.train()
    name, state = sorted(saved.items(), key=lambda kv: runs.checkpoint_step(kv[0]))[-1]
    folder = tmp_path / "out" / name
    assert_same(load_state(str(folder)), state)
    assert state["negatives"] and state["history"] and "rng" in state

    # the same checkpoint as an earlier version wrote it: only the pickle
    torch.save(state, folder / LEGACY_STATE_NAME)
    for f in (BANEL_STATE_NAME, BANEL_TENSORS_NAME):
        (folder / f).unlink()
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(PickledStateError):
        trainer_for(24).train(resume_from_checkpoint=str(folder))
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    more = trainer_for(24)
    more.train(resume_from_checkpoint=str(folder))
    assert more.ledger.spent == 24 and more.round > first.round
    assert [h["round"] for h in more.history] == list(range(more.round))  # the loaded history, continued
    # and what it saves next is pickle-free
    last = runs.last_complete_checkpoint(str(tmp_path / "out"))
    assert os.path.isfile(os.path.join(last, BANEL_STATE_NAME))
    assert not os.path.isfile(os.path.join(last, LEGACY_STATE_NAME))


def test_a_resumed_run_keeps_the_step_target_that_idle_rounds_grew(tmp_path, char_tokenizer, skewed_model_state,
                                                                   monkeypatch):
    """The target idle rounds grew (distill_idle_kl_growth) is in the checkpoint, and a resumed run takes it back: the
    learning rate it saved was set for that target, and the next distillation rescales it from there."""
    from conftest import make_tiny_model

    saved = []
    original = runs.save_state_last
    monkeypatch.setattr("trl_banel.trainer.save_state_last", lambda state, folder: (saved.append(state),
                                                                                    original(state, folder)))

    def trainer_for():
        model = make_tiny_model(char_tokenizer)
        model.load_state_dict(skewed_model_state)
        args = config(tmp_path, save_strategy="steps", save_steps=2, max_reward_evaluations=48, learning_rate=1e-4,
                      distill_objective="exact", rejection_threshold=1e-30, distill_target_kl=0.025,
                      max_idle_rounds=2, distill_idle_kl_growth=4.0)
        return BaNELTrainer(model=model, reward_funcs=RecordingOracle(), args=args, train_dataset=UNCONDITIONAL,
                            processing_class=char_tokenizer)

    first = trainer_for()
    first.train()
    assert "idle rounds" in first.stop_reason, "the four animals, all failing: the run stops idle"
    grown = saved[-1]["distill_kl_target"]
    assert grown > 0.025 and grown == first.distiller.step_size.target, "the last distillation followed idle rounds"
    again = trainer_for()
    again.train(resume_from_checkpoint=True)  # its final checkpoint: nothing left to do
    assert again.distiller.step_size.target == grown
