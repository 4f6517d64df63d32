"""The oracle gate: every reward evaluation goes through the main process's ledger, and every process agrees on it.

The main process asks the reward oracle (through the ledger: the budget, the cache, the durable log); the rewards
and the new ledger records are broadcast, so every process holds the same ledger and spends the same budget.
"""

import logging

from accelerate.utils import broadcast_object_list
from trl.data_utils import is_conversational

from .ledger import RewardFunctionError
from .sampler import Candidate

logger = logging.getLogger(__name__)


class OracleGate:
    r"""
    Sends candidates to the reward oracle, once each, and keeps the ledger of every process in step.

    Args:
        ledger ([`RewardLedger`]): the run's ledger (its file on the main process only).
        oracle ([`RewardOracle`]): the reward functions, called in TRL's convention.
        dataset ([`~datasets.Dataset`]): the prompts; their other columns go to the reward functions.
        accelerator: the trainer's `Accelerator`.
        trainer_state (`Callable`): returns the trainer's `TrainerState`, passed to the reward functions.
    """

    def __init__(self, ledger, oracle, dataset, accelerator, trainer_state):
        self.ledger, self.oracle, self.dataset = ledger, oracle, dataset
        self.accelerator, self.trainer_state = accelerator, trainer_state

    def sync_from_main(self):
        """Give every process the main process's ledger (read from its file at start)."""
        if self.accelerator.num_processes > 1:
            shared = broadcast_object_list([self.ledger.share() if self.accelerator.is_main_process else None])[0]
            if not self.accelerator.is_main_process:
                self.ledger.adopt(shared)  # lost evaluations too: every rank must agree on the budget left

    def sendable(self, cands: list[Candidate]) -> list:
        """The candidates the oracle may be asked about: not those a crash lost (charged, outcome unknown, never sent
        again), which would otherwise take the round's places and come back unscored."""
        if not self.ledger.lost:
            return cands
        return [c for c in cands if not self.ledger.is_unrecorded_lost(c.prompt_text, c.completion)]

    def evaluate(self, cands: list[Candidate], round: int, retry_lost: bool = False) -> list[float | None]:
        """Rewards through the ledger (main process), shared with every rank."""
        payload = [self._evaluate_on_main(cands, round, retry_lost) if self.accelerator.is_main_process else None]
        payload = broadcast_object_list(payload, from_process=0) if self.accelerator.num_processes > 1 else payload
        status, *rest = payload[0]
        if status == "error":
            if self.accelerator.is_main_process and isinstance(rest[1], Exception):
                raise rest[1]
            raise RewardFunctionError(f"the reward oracle failed on the main process: {rest[0]}")
        rewards, new_records = rest
        if not self.accelerator.is_main_process:
            for r in new_records:
                self.ledger.keep(r)
        return rewards

    def _evaluate_on_main(self, cands: list[Candidate], round: int, retry_lost: bool) -> tuple:
        """`("ok", rewards, new ledger records)`, or `("error", message, exception)` for the other ranks to raise."""
        try:
            before = len(self.ledger.records)
            rewards = self.ledger.evaluate(
                [c.prompt_text for c in cands], [c.completion for c in cands],
                lambda idx: self.call([cands[i] for i in idx], require_a_score=True), round,
                # enough to send a call lost in a crash again (reevaluate_interrupted)
                meta=[{"row": c.row, "completion_ids": c.completion_ids} for c in cands],
                retry_lost=retry_lost,
            )
            return ("ok", rewards, self.ledger.records[before:])
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}", e)

    def call(self, cands: list[Candidate], require_a_score: bool = False, oracle=None) -> list[float | None]:
        """The reward functions' answer for `cands` (no ledger: nothing is charged or recorded)."""
        prompts = [c.prompt for c in cands]
        if cands and is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": c.completion}] for c in cands]
        else:
            completions = [c.completion for c in cands]
        columns = {}
        for key in self.dataset.column_names:
            if key != "prompt":
                columns[key] = [self.dataset[c.row][key] for c in cands]
        columns["completion_ids"] = [c.completion_ids for c in cands]
        columns["trainer_state"] = self.trainer_state()
        oracle = self.oracle if oracle is None else oracle
        return oracle(prompts, completions, columns, require_a_score=require_a_score)

    def score_once(self, samples: list[Candidate], oracle=None, chunk: int = 4096) -> tuple[list[float | None], int]:
        """Each sample's reward, each distinct `(prompt, completion)` asked once (outside the ledger): the rewards and
        the number of calls."""
        todo = {}
        for c in samples:
            todo.setdefault((c.prompt_text, c.completion), c)
        keys = list(todo)
        cache: dict[tuple[str, str], float | None] = {}
        for start in range(0, len(keys), chunk):
            rewards = self.call([todo[k] for k in keys[start : start + chunk]], oracle=oracle)
            cache.update(zip(keys[start : start + chunk], rewards))
        return [cache[(c.prompt_text, c.completion)] for c in samples], len(keys)

    def reevaluate_lost(self, round: int):
        """Send again the evaluations a crash lost (charged again), as `reevaluate_interrupted` asks."""
        lost = [r for r in self.ledger.unrecorded_lost() if "row" in r.meta and r.meta["row"] < len(self.dataset)]
        if not lost:
            return
        if self.accelerator.is_main_process:
            logger.warning("Re-evaluating %d reward evaluation(s) lost in a crash (reevaluate_interrupted=True): "
                           "each is charged again.", len(lost))
        cands = [Candidate(self.dataset[r.meta["row"]]["prompt"], r.prompt, r.completion,
                           r.meta.get("completion_ids", []), r.meta["row"]) for r in lost]
        self.evaluate(cands, round, retry_lost=True)
