"""The reward ledger: every reward evaluation goes through it.

It enforces the NRE budget (never exceeded, whatever the batch sizes), answers an exact repeat of an evaluated
`(prompt, completion)` without calling the oracle, and appends each evaluation to a JSON-lines file that is flushed
and fsynced before the evaluation counts, so a crash loses nothing that was paid for. Each call is announced in a
write-ahead journal before it is made (`trl_banel.journal`), so a call cut short by a crash is charged, not bought
again: the budget holds over any sequence of crashes and resumes.
"""

import errno
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .journal import CallJournal, LostEvaluation, fsync_append, read_json_lines

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "evaluations.jsonl"


def journal_path(ledger_path: str) -> str:
    """The write-ahead journal of a ledger's reward calls: `evaluations.jsonl` -> `evaluations.calls.jsonl`."""
    root, ext = os.path.splitext(ledger_path)
    return f"{root}.calls{ext or '.jsonl'}"


def lock_path(ledger_path: str) -> str:
    """The lock a live run holds on its ledger: `evaluations.jsonl` -> `evaluations.lock`."""
    return f"{os.path.splitext(ledger_path)[0]}.lock"


class LedgerInUseError(RuntimeError):
    """Another live process holds the ledger: two runs on one ledger would both pay for the same evaluations."""


_HELD: dict[tuple[int, str], object] = {}  # (pid, lock file) -> its open file, kept open for the process's life


def hold_ledger(ledger_path: str):
    """Take the ledger's lock for this process, or raise [`LedgerInUseError`] naming the live process that holds it.

    The system releases the lock when the process ends, however it ends (a crash leaves no stale lock). POSIX record
    locks belong to a process, so a second ledger on the same file in the same process (a trainer built again in a
    notebook) is not refused, while a rank that outlived its killed launcher is. The lock file stays open for the
    process's life: closing any descriptor of it would drop the process's lock.
    """
    path = os.path.realpath(lock_path(ledger_path))
    if sys.platform == "win32" or (os.getpid(), path) in _HELD:  # no fcntl on Windows: not guarded there
        return
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # a file system without locks: run, unguarded, and say so
            f.close()
            logger.warning("Could not lock %s (%s): a second live run on this ledger would not be refused.", path, e)
            return
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise LedgerInUseError(
            f"{ledger_path} is in use by another live process (pid {holder}): two runs on one ledger would both pay "
            "for the same reward evaluations. Wait for that run to end or stop it (the ranks of a multi-process run "
            "can outlive a killed launcher: look for them with `ps`), or give this run another output_dir."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[(os.getpid(), path)] = f  # a forked child holds no lock of its parent's: keyed by pid


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
            The process holds a lock on it ([`lock_path`]) while it lives: a ledger another live process holds
            raises [`LedgerInUseError`].
            Beside it, [`journal_path`] holds the write-ahead journal of the calls (see `trl_banel.journal`): a call
            that was in flight at a crash is found there at the next start, charged, and never re-sent silently.
        budget (`int`):
            Maximum number of evaluations ever charged to this ledger (the NRE budget): recorded evaluations plus
            evaluations lost in a crash.
        success_threshold (`float`, *optional*, defaults to `0.0`):
            A reward strictly above it is a success.
    """

    def __init__(self, path: str | None, budget: int, success_threshold: float = 0.0):
        self.path = path
        self.budget = budget
        self.success_threshold = success_threshold
        self.records: list[Evaluation] = []
        self._index: dict[tuple[str, str], Evaluation] = {}
        self.journal = None
        self.lost: list[LostEvaluation] = []  # sent to the oracle, reward never recorded: charged, not known
        self.newly_lost: list[LostEvaluation] = []  # of which found open by this start
        if path is not None:
            hold_ledger(path)
            self._load()
            self.journal = CallJournal(journal_path(path))
            self.newly_lost = self.journal.settle(lambda p, c: (p, c) in self._index)
            self.lost = list(self.journal.lost)
            if self.newly_lost:
                logger.warning(
                    "%d reward evaluation(s) were in flight when the previous run stopped: they are charged to the "
                    "budget (they were, or may have been, paid for), their rewards are unknown, and they are never "
                    "sent again unless asked (BaNELConfig.reevaluate_interrupted). Listed in %s.",
                    len(self.newly_lost), self.journal.path)
        self._lost_keys = {(r.prompt, r.completion) for r in self.lost}

    # -- reading ---------------------------------------------------------------------------------------------------
    def _load(self):
        for i, obj in enumerate(read_json_lines(self.path)):
            try:
                record = Evaluation(
                    obj["prompt"], obj["completion"], float(obj["reward"]), int(obj["round"]), bool(obj["success"])
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}: record {i + 1} is not an evaluation ({e!r}); refusing to "
                                 "guess.") from e
            self.keep(record)

    def keep(self, record: Evaluation):
        """Hold `record` (an evaluation already paid and written: read from the file, or made by the main process and
        shared with this rank); a `(prompt, completion)` already held is not counted again."""
        key = (record.prompt, record.completion)
        if key in self._index:  # never double-count, even if the file was written twice
            return
        self._index[key] = record
        self.records.append(record)

    @property
    def spent(self) -> int:
        """Reward evaluations charged (the NRE spent): those recorded, plus those lost in a crash."""
        return len(self.records) + len(self.lost)

    def unrecorded_lost(self) -> list[LostEvaluation]:
        """Lost evaluations (charged, reward unknown) that have not been evaluated again since."""
        return [r for r in self.lost if self.is_unrecorded_lost(r.prompt, r.completion)]

    def is_unrecorded_lost(self, prompt: str, completion: str) -> bool:
        key = (prompt, completion)
        return key in self._lost_keys and key not in self._index

    def share(self) -> tuple:
        """What another process needs to hold the same ledger (see `adopt`)."""
        return self.records, self.lost

    def adopt(self, shared: tuple):
        """Take the records and lost evaluations of the main process's ledger (an in-memory copy on other ranks)."""
        records, lost = shared
        for r in records:
            self.keep(r)
        self.lost = list(lost)
        self._lost_keys = {(r.prompt, r.completion) for r in self.lost}

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
            fsync_append(self.path, payload)
        for r in records:
            self.keep(r)

    def evaluate(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        oracle: Callable[[list[int]], list[float | None]],
        round: int,
        meta: Sequence[dict] | None = None,
        retry_lost: bool = False,
    ) -> list[float | None]:
        r"""
        Rewards for `(prompts[i], completions[i])`, calling `oracle` only for pairs never evaluated before, and only
        as many as the budget allows.

        Before the call, the pairs about to be sent are written to the journal (fsynced); after it, the rewards to the
        ledger, then the call's end to the journal. A crash anywhere in between leaves a call that the next start
        charges as lost.

        Args:
            oracle (`Callable`):
                Called with the positions (into `prompts`) of the new distinct pairs to evaluate; returns one reward
                per position, `None` for "not scored" (not recorded, not charged). If it raises, nothing is recorded
                or charged.
            meta (`list[dict]`, *optional*):
                JSON-serialisable details per pair, kept in the journal so that a lost call can be sent again.
            retry_lost (`bool`, *optional*, defaults to `False`):
                Send pairs lost in an earlier crash again (charged again). Otherwise they get `None` and no call.

        Returns:
            `list[float | None]`: the reward of each pair; `None` where the pair was not scored, was lost in a crash,
            or the budget ran out before it.
        """
        rewards: list[float | None] = [None] * len(prompts)
        to_call: list[int] = []
        first_of: dict[tuple[str, str], int] = {}
        for i, key in enumerate(zip(prompts, completions)):
            known = self._index.get(key)
            if known is not None:
                rewards[i] = known.reward
            elif key in self._lost_keys and not retry_lost:
                continue  # charged already, outcome unknown: buying it again must be the user's choice
            elif key not in first_of and len(to_call) < self.remaining:
                first_of[key] = i
                to_call.append(i)
        if to_call:
            self._call(prompts, completions, oracle, round, meta, to_call)
        for i, key in enumerate(zip(prompts, completions)):
            if rewards[i] is None and key in self._index:
                rewards[i] = self._index[key].reward
        return rewards

    def _call(self, prompts, completions, oracle, round: int, meta, to_call: list[int]):
        """Ask `oracle` about the pairs at `to_call`, journalled around the call, and record its rewards."""
        call = None
        if self.journal is not None:
            call = self.journal.begin([prompts[i] for i in to_call], [completions[i] for i in to_call], round,
                                      [meta[i] for i in to_call] if meta is not None else None)
        try:
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
        except Exception:
            # the reward function raised or misbehaved: by the documented rule nothing is charged. (An interrupt,
            # KeyboardInterrupt or SystemExit, leaves the call open instead: it may have been paid, so the next
            # start charges it.)
            if call is not None:
                self.journal.end(call, "failed")
            raise
        self._append(new)
        if call is not None:
            self.journal.end(call, "answered")
