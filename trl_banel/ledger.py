"""The reward ledger: every reward evaluation goes through it.

It enforces the NRE budget (never exceeded, whatever the batch sizes), answers an exact repeat of an evaluated
`(prompt, completion)` without calling the oracle, and appends each evaluation to a JSON-lines file that is flushed
and fsynced before the evaluation counts, so a crash loses nothing that was paid for.
"""

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "evaluations.jsonl"


class RewardFunctionError(RuntimeError):
    """A reward function failed or returned something that cannot be recorded; nothing bad was recorded."""


@dataclass
class Evaluation:
    prompt: str
    completion: str
    reward: float
    round: int
    success: bool


class RewardLedger:
    r"""
    The single gate to the reward oracle.

    Args:
        path (`str` or `None`):
            JSON-lines file the evaluations are appended to (one object per evaluation with `prompt`, `completion`,
            `reward`, `success`, `round`). `None` keeps the ledger in memory only. An existing file is loaded, so a
            restarted run re-spends nothing; a torn last line (a crash mid-write) is dropped with a warning.
        budget (`int`):
            Maximum number of evaluations ever recorded in this ledger (the NRE budget).
        success_threshold (`float`, *optional*, defaults to `0.0`):
            A reward strictly above it is a success.
    """

    def __init__(self, path: str | None, budget: int, success_threshold: float = 0.0):
        self.path = path
        self.budget = budget
        self.success_threshold = success_threshold
        self.records: list[Evaluation] = []
        self._index: dict[tuple[str, str], Evaluation] = {}
        if path is not None:
            self._load()

    # -- reading ---------------------------------------------------------------------------------------------------
    def _load(self):
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        good_bytes = 0
        for i, line in enumerate(lines):
            if not line.strip():
                good_bytes += len(line) + (1 if i < len(lines) - 1 else 0)
                continue
            try:
                obj = json.loads(line)
                record = Evaluation(
                    obj["prompt"], obj["completion"], float(obj["reward"]), int(obj["round"]), bool(obj["success"])
                )
                complete = i < len(lines) - 1  # a record counts only with its newline
            except (ValueError, KeyError, TypeError):
                complete = False
            if not complete:
                if i < len(lines) - 1 and any(l.strip() for l in lines[i + 1 :]):
                    raise ValueError(f"{self.path}: line {i + 1} is corrupt and is not the last line; refusing to guess.")
                logger.warning("%s: dropping a torn last line (a crash mid-write); it will be re-evaluated if needed.", self.path)
                break
            self._add(record)
            good_bytes += len(line) + 1
        if good_bytes < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
                f.flush()
                os.fsync(f.fileno())

    def _add(self, record: Evaluation):
        key = (record.prompt, record.completion)
        if key in self._index:  # never double-count, even if the file was written twice
            return
        self._index[key] = record
        self.records.append(record)

    @property
    def spent(self) -> int:
        """Reward evaluations recorded (the NRE spent)."""
        return len(self.records)

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.spent)

    @property
    def exhausted(self) -> bool:
        return self.remaining == 0

    @property
    def successes(self) -> list[Evaluation]:
        return [r for r in self.records if r.success]

    def lookup(self, prompt: str, completion: str) -> Evaluation | None:
        return self._index.get((prompt, completion))

    def is_known_failure(self, prompt: str, completion: str) -> bool:
        record = self._index.get((prompt, completion))
        return record is not None and not record.success

    # -- writing ---------------------------------------------------------------------------------------------------
    def _append(self, records: Sequence[Evaluation]):
        if self.path is not None and records:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            payload = "".join(
                json.dumps(
                    {"prompt": r.prompt, "completion": r.completion, "reward": r.reward, "success": r.success,
                     "round": r.round},
                    ensure_ascii=False,
                )
                + "\n"
                for r in records
            )
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        for r in records:
            self._add(r)

    def evaluate(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        oracle: Callable[[list[int]], list[float | None]],
        round: int,
    ) -> list[float | None]:
        r"""
        Rewards for `(prompts[i], completions[i])`, calling `oracle` only for pairs never evaluated before, and only
        as many as the budget allows.

        Args:
            oracle (`Callable`):
                Called with the positions (into `prompts`) of the new distinct pairs to evaluate; returns one reward
                per position, `None` for "not scored" (not recorded, not charged).

        Returns:
            `list[float | None]`: the reward of each pair; `None` where the pair was not scored or the budget ran
            out before it.
        """
        rewards: list[float | None] = [None] * len(prompts)
        to_call: list[int] = []
        first_of: dict[tuple[str, str], int] = {}
        for i, key in enumerate(zip(prompts, completions)):
            known = self._index.get(key)
            if known is not None:
                rewards[i] = known.reward
            elif key not in first_of and len(to_call) < self.remaining:
                first_of[key] = i
                to_call.append(i)
        if to_call:
            values = oracle(to_call)
            if len(values) != len(to_call):
                raise RewardFunctionError(f"oracle returned {len(values)} rewards for {len(to_call)} completions")
            new = []
            for i, value in zip(to_call, values):
                if value is None:
                    continue
                value = float(value)
                if not math.isfinite(value):
                    raise RewardFunctionError(f"non-finite reward {value} for completion {completions[i]!r}")
                new.append(Evaluation(prompts[i], completions[i], value, round, value > self.success_threshold))
            self._append(new)
        for i, key in enumerate(zip(prompts, completions)):
            if rewards[i] is None and key in self._index:
                rewards[i] = self._index[key].reward
        return rewards
