"""A run's output directory: complete checkpoints, finished runs, and what a resume finds there.

Three files make a BaNEL run resumable and safe to run again:
- `evaluations.jsonl` and `evaluations.calls.jsonl`: the ledger and its write-ahead journal (`trl_banel.ledger`);
- `checkpoint-N/banel_state.json` (with its tensors in `banel_state.safetensors`): written last, atomically, after
  every other file of the checkpoint is on disk, so a checkpoint without it is one a crash cut short, and is never
  resumed from. Neither file can run code when loaded (no pickle): a checkpoint folder from someone else is data, not
  a program. The `banel_state.pt` of earlier versions is a pickle; it is loaded only on request
  (`TRL_BANEL_ALLOW_PICKLED_STATE=1`, see `load_state`);
- `banel_run.json`: written when `train()` returns, naming the step the run finished at. A later `train()` in the same
  `output_dir` that would start from an earlier state (the model passed in, or an older checkpoint) is refused: it
  would end by saving a less trained model over the finished one.
"""

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

BANEL_STATE_NAME = "banel_state.json"  # the state's plain values; written last, it marks a checkpoint complete
BANEL_TENSORS_NAME = "banel_state.safetensors"  # the state's tensors, referenced from the JSON by key
LEGACY_STATE_NAME = "banel_state.pt"  # earlier versions: a pickle (torch.save)
ALLOW_PICKLE_ENV = "TRL_BANEL_ALLOW_PICKLED_STATE"
_TENSOR, _TUPLE = "__tensor__", "__tuple__"  # markers in the JSON of what JSON has no type for
RUN_FILENAME = "banel_run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class PickledStateError(ValueError):
    """A checkpoint holds only the pickled `banel_state.pt` of an earlier version, and unpickling was not allowed."""


class FinishedRunError(RuntimeError):
    """`train()` was asked to start again, from an earlier state, in an output_dir whose run has finished."""


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_step(path: str) -> int | None:
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in (BANEL_STATE_NAME, LEGACY_STATE_NAME))


def checkpoints(output_dir: str) -> list[str]:
    """Every `checkpoint-N` folder of `output_dir`, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [os.path.join(output_dir, n) for n in os.listdir(output_dir)
             if _CHECKPOINT.match(n) and os.path.isdir(os.path.join(output_dir, n))]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(output_dir: str) -> str | None:
    complete = [c for c in checkpoints(output_dir) if is_complete_checkpoint(c)]
    return complete[-1] if complete else None


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint to resume from: `True` is the last complete one; a path that a crash left incomplete falls back,
    with a warning, to the last complete one before it (scripts pass `get_last_checkpoint(output_dir)`, which does not
    know about complete checkpoints)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            partial = checkpoints(output_dir)
            raise ValueError(f"No complete checkpoint in output_dir={output_dir!r} to resume from"
                             + (f" ({len(partial)} incomplete: a crash cut them short)." if partial else "."))
        return found
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint={path!r} is not a folder; pass a checkpoint-N folder or True.")
    if is_complete_checkpoint(path):
        return path
    step = checkpoint_step(path)
    earlier = [c for c in checkpoints(os.path.dirname(os.path.normpath(path)))
               if is_complete_checkpoint(c) and step is not None and checkpoint_step(c) < step]
    if not earlier:
        raise ValueError(f"resume_from_checkpoint={path!r} is incomplete (no {BANEL_STATE_NAME}: a crash cut it "
                         "short, or it was not written by BaNELTrainer) and no complete checkpoint precedes it.")
    logger.warning("%s is incomplete (no %s: a crash cut its writing short); resuming from %s instead.", path,
                   BANEL_STATE_NAME, earlier[-1])
    return earlier[-1]


def copy_model_card(output_dir: str, folder: str):
    """Copy the model card of `output_dir` into `folder` (a model saved elsewhere), if there is one."""
    card = os.path.join(output_dir, "README.md")
    if os.path.abspath(folder) != os.path.abspath(output_dir) and os.path.exists(card):
        Path(folder, "README.md").write_text(Path(card).read_text())


def _to_json(obj, tensors: dict, storages: set):
    """`obj` with every tensor moved to `tensors` (replaced by a reference to its key) and tuples marked."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in storages:
            t = t.contiguous().clone()  # safetensors refuses tensors that share memory
        storages.add(t.untyped_storage().data_ptr())
        key = str(len(tensors))
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"BaNEL state: a dict with non-string keys cannot be saved: {list(obj)[:3]}")
        return {k: _to_json(v, tensors, storages) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_json(v, tensors, storages) for v in obj]
    if isinstance(obj, tuple):
        return {_TUPLE: [_to_json(v, tensors, storages) for v in obj]}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"BaNEL state: a {type(obj).__name__} cannot be saved without pickle; convert it to plain values.")


def _from_json(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_from_json(v, tensors) for v in obj[_TUPLE])
        return {k: _from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    return obj


def load_state(checkpoint: str | None, allow_pickle: bool | None = None) -> dict | None:
    r"""
    The BaNEL state saved in `checkpoint` (`None` without one), read without running any code of the file: plain
    values from `banel_state.json`, tensors from `banel_state.safetensors`.

    Args:
        checkpoint (`str`, *optional*): a complete checkpoint folder.
        allow_pickle (`bool`, *optional*): load the pickled `banel_state.pt` of a checkpoint written by an earlier
            version. Unpickling a file can run any code it carries: allow it only for checkpoints you wrote yourself.
            Defaults to the environment variable `TRL_BANEL_ALLOW_PICKLED_STATE=1`. Without it such a checkpoint
            raises [`PickledStateError`]; once resumed, the run's next checkpoints are written without pickle.
    """
    if checkpoint is None:
        return None
    path = os.path.join(checkpoint, BANEL_STATE_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        tensors_path = os.path.join(checkpoint, BANEL_TENSORS_NAME)
        if os.path.getsize(tensors_path) != saved["tensors_bytes"]:
            raise ValueError(f"{tensors_path} is not the file {path} was written with (size "
                             f"{os.path.getsize(tensors_path)}, expected {saved['tensors_bytes']}).")
        return _from_json(saved["state"], load_file(tensors_path))
    legacy = os.path.join(checkpoint, LEGACY_STATE_NAME)
    if allow_pickle is None:
        allow_pickle = os.environ.get(ALLOW_PICKLE_ENV, "") == "1"
    if not allow_pickle:
        raise PickledStateError(
            f"{legacy} is the pickled state of an earlier trl_banel version, and unpickling a file can run any code "
            f"it carries, so it was not loaded. If you wrote this checkpoint yourself (or trust who did), resume with "
            f"{ALLOW_PICKLE_ENV}=1 in the environment (or load_state(..., allow_pickle=True)): the run's next "
            "checkpoints are written without pickle.")
    logger.warning("Loading the pickled %s (%s=1): its code, if any, runs now.", legacy, ALLOW_PICKLE_ENV)
    return torch.load(legacy, weights_only=False)


def save_state_last(state: dict, folder: str):
    """Write BaNEL's state into a checkpoint folder as its completion mark: every other file of the folder is flushed
    to disk first, then the tensors (`banel_state.safetensors`), then the plain values (`banel_state.json`), each to a
    temporary name, flushed and renamed (atomic) into place: the JSON, last, marks the checkpoint complete."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            _fsync_file(path)
    tensors: dict[str, torch.Tensor] = {}
    plain = _to_json(state, tensors, set())
    tensors_path = os.path.join(folder, BANEL_TENSORS_NAME)
    save_file(tensors, tensors_path + ".tmp")
    _fsync_file(tensors_path + ".tmp")
    os.replace(tensors_path + ".tmp", tensors_path)
    tmp = os.path.join(folder, BANEL_STATE_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "tensors_bytes": os.path.getsize(tensors_path), "state": plain}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, BANEL_STATE_NAME))
    _fsync_dir(folder)


def read_finished(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _final_checkpoint(output_dir: str, global_step: int) -> str | None:
    final = last_complete_checkpoint(output_dir)
    return os.path.basename(final) if final and final.endswith(f"-{global_step}") else None


def finished_info(output_dir: str, global_step: int, ledger, rounds: int, interrupted: str | None = None) -> dict:
    """What `banel_run.json` says of a run that ended at `global_step`: its final checkpoint (if one was saved at that
    step), the budget spent and the successes; `interrupted`: the signal that stopped it early, if one did."""
    return {"global_step": global_step, "checkpoint": _final_checkpoint(output_dir, global_step),
            "spent": ledger.spent, "budget": ledger.budget, "lost": len(ledger.lost), "rounds": rounds,
            "successes": len(ledger.successes), "interrupted": interrupted}


def interrupted_line(output_dir: str, global_step: int, ledger, rounds: int, signal_name: str) -> str:
    """The one line a run stopped by a signal ends with: what it kept, and how to go on."""
    final = _final_checkpoint(output_dir, global_step)
    kept = (f"checkpoint {os.path.join(output_dir, final)} holds its state; continue with "
            f"trainer.train(resume_from_checkpoint=True)" if final else
            "no checkpoint was saved (save_strategy='no'): a new train() in this output_dir resumes the ledger with "
            "the model passed in")
    return (f"Interrupted by {signal_name} after {rounds} rounds ({ledger.spent} of {ledger.budget} reward "
            f"evaluations spent, none lost to the interrupt): {kept}.")


def mark_finished(output_dir: str, info: dict):
    """Record (atomically) that the run in `output_dir` finished, and at which step."""
    os.makedirs(output_dir, exist_ok=True)
    info = {**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = os.path.join(output_dir, RUN_FILENAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output_dir, RUN_FILENAME))
    _fsync_dir(output_dir)


def refuse_rerun(output_dir: str, checkpoint: str | None):
    """Raise `FinishedRunError` if training from `checkpoint` (None: from the model passed in) would start before the
    point where the run in `output_dir` finished."""
    finished = read_finished(output_dir)
    if finished is None:
        return
    step = finished["global_step"]
    if checkpoint is not None and _checkpoint_global_step(checkpoint) >= step:
        return
    if finished.get("interrupted") and not finished.get("checkpoint"):
        return  # stopped early with nothing saved: the ledger, resumed with the model passed in, is all there is
    start = ("the model passed to the trainer" if checkpoint is None
             else f"{checkpoint} (step {_checkpoint_global_step(checkpoint)}, before the end)")
    final = finished.get("checkpoint")
    how_to_continue = (f"resume from its final checkpoint: trainer.train(resume_from_checkpoint=True) ({final})"
                       if final and is_complete_checkpoint(os.path.join(output_dir, final)) else
                       "no checkpoint holds its final state (it ran with save_strategy='no'): start a new run in "
                       "another output_dir from the model it saved")
    what = f"an interrupted ({finished['interrupted']})" if finished.get("interrupted") else "a finished"
    raise FinishedRunError(
        f"output_dir={output_dir!r} holds {what} BaNEL run: {finished['spent']} of {finished['budget']} reward "
        f"evaluations spent over {finished['rounds']} rounds, {step} training steps (finished "
        f"{finished.get('finished_at', '?')}; see {RUN_FILENAME}). Training again from {start} would end by saving "
        "a less trained model over it, so nothing was done. To continue this run (e.g. with a larger "
        f"max_reward_evaluations or num_rounds), {how_to_continue}. To start a new run, choose another output_dir "
        "(or delete this one).")


def _checkpoint_global_step(checkpoint: str) -> int:
    path = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    return checkpoint_step(checkpoint) or 0


def describe_resume(output_dir: str, ledger, rounds: int, checkpoint: str | None) -> str | None:
    """What a start in `output_dir` found, for the log (None when it found nothing: a new run)."""
    if not ledger.spent and checkpoint is None:
        return None
    lost = f" ({len(ledger.lost)} of them lost in a crash: charged, reward unknown)" if ledger.lost else ""
    if checkpoint is not None:
        generator = f"the generator and the round state come from {checkpoint}"
    else:
        latest = last_complete_checkpoint(output_dir)
        generator = ("the generator starts from the model passed in (no checkpoint was given"
                     + (f"; {latest} holds the earlier training: train(resume_from_checkpoint=True) restores it)"
                        if latest else ")"))
    return (f"Resuming the BaNEL run in {output_dir}: {ledger.spent} reward evaluations spent of "
            f"{ledger.budget}{lost}, {len(ledger.successes)} successes, {rounds} rounds done, {ledger.remaining} "
            f"evaluations left; {generator}. Evaluations in the ledger are never paid for again.")
