"""The write-ahead journal of reward calls: what was sent to the oracle, durably, before it was sent.

The ledger records an evaluation once its reward is known. A crash while the oracle is working (or after it answered
and before the ledger was written) would otherwise leave no trace of a call that was, or may have been, paid for, and
a resumed run would buy it again. So before each call the journal appends (and fsyncs) an *intent* naming every
`(prompt, completion)` about to be sent, and after the call an *end* line saying how it ended:

    {"call": 7, "round": 3, "items": [{"prompt": ..., "completion": ..., "meta": {...}}, ...]}
    {"call": 7, "end": "answered"}        the rewards are in the ledger (items scored None were not charged)
    {"call": 7, "end": "failed"}          the reward function raised or misbehaved: nothing recorded, nothing charged
    {"call": 7, "end": "lost", "items": [...]}   written at the next start for a call that never ended: the items
                                          missing from the ledger are charged to the budget, once, for good

An intent with no end line is a call that was in flight at a crash. `settle()` closes it with a `lost` line listing
the items whose reward never reached the ledger, so the charge is durable and does not depend on what the ledger
holds later (a lost item that is re-evaluated on purpose is charged again, as it is paid again).
"""

import json
import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class LostEvaluation:
    """A `(prompt, completion)` sent to the oracle whose reward was never recorded: charged, not known."""

    prompt: str
    completion: str
    round: int
    call: int
    meta: dict = field(default_factory=dict)


def fsync_append(path: str, payload: str):
    """Append `payload` to `path` and return only once it is on disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def read_json_lines(path: str, repair: bool = True) -> list[dict]:
    """The complete lines of a JSON-lines file; a torn last line (a crash mid-write) is left out and, with `repair`
    (the run that owns the file, before it appends), cut off the file. Readers of another run's files (its report)
    pass `repair=False`: they never write.

    A line counts only with its newline. A bad line that is not the last one is corruption, not a torn write, and is
    refused rather than guessed at.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    objects, good_bytes = [], 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            good_bytes += len(line) + (0 if last else 1)
            continue
        try:
            obj = None if last else json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            if not last and any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(f"{path}: line {i + 1} is corrupt and is not the last line; refusing to guess.")
            if repair:
                logger.warning("%s: dropping a torn last line (a crash mid-write).", path)
            break
        objects.append(obj)
        good_bytes += len(line) + 1
    if repair and good_bytes < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
            f.flush()
            os.fsync(f.fileno())
    return objects


def replay(objects: list[dict]) -> tuple[dict[int, dict], list[LostEvaluation], int]:
    """What a journal's lines say, without touching its file: the calls still open (call id -> intent), the items
    earlier starts settled as lost, and the next call id."""
    open_calls, lost, next_call = {}, [], 0
    for obj in objects:
        call = int(obj["call"])
        next_call = max(next_call, call + 1)
        if "items" in obj and "end" not in obj:
            open_calls[call] = obj
        else:
            intent = open_calls.pop(call, None)
            if obj.get("end") == "lost":
                lost += lost_items(obj["items"], intent["round"] if intent else -1, call)
    return open_calls, lost, next_call


def unanswered(intent: dict, recorded) -> list[dict]:
    """The items of an open call's intent that the ledger holds no reward for (`recorded(prompt, completion)`): what
    settling the call charges as lost."""
    return [i for i in intent["items"] if not recorded(i["prompt"], i["completion"])]


def lost_items(items: list[dict], round: int, call: int) -> list[LostEvaluation]:
    return [LostEvaluation(i["prompt"], i["completion"], round, call, i.get("meta") or {}) for i in items]


class CallJournal:
    r"""
    Write-ahead log of the calls to a reward oracle.

    Args:
        path (`str`):
            JSON-lines file of intents and ends (see the module's docstring). An existing file is read; calls left
            open by a crash are reported by [`settle`].
    """

    def __init__(self, path: str):
        self.path = path
        # call id -> its intent for calls with no end line; the items settled as lost in earlier starts
        self._open, self.lost, self._next = replay(read_json_lines(path))

    def settle(self, recorded) -> list[LostEvaluation]:
        """Close every call a crash left open; return the items newly found lost (charged, never recorded).

        Args:
            recorded (`Callable[[str, str], bool]`): whether the ledger holds a reward for `(prompt, completion)`.
        """
        newly_lost = []
        for call, intent in sorted(self._open.items()):
            items = unanswered(intent, recorded)
            end = {"call": call, "end": "lost", "items": items} if items else {"call": call, "end": "answered"}
            fsync_append(self.path, json.dumps(end, ensure_ascii=False) + "\n")
            newly_lost += lost_items(items, intent["round"], call)
        self._open.clear()
        self.lost += newly_lost
        return newly_lost

    def begin(self, prompts: list[str], completions: list[str], round: int, meta: list[dict] | None = None) -> int:
        """Durably record the intent to send these pairs to the oracle; returns the call's id."""
        call, self._next = self._next, self._next + 1
        items = [{"prompt": p, "completion": c, **({"meta": meta[i]} if meta else {})}
                 for i, (p, c) in enumerate(zip(prompts, completions))]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fsync_append(self.path, json.dumps({"call": call, "round": round, "items": items}, ensure_ascii=False) + "\n")
        return call

    def end(self, call: int, how: str):
        """Record how a call ended: `"answered"` (rewards recorded) or `"failed"` (nothing recorded nor charged)."""
        fsync_append(self.path, json.dumps({"call": call, "end": how}) + "\n")
