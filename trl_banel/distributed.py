"""What a round needs to run the same way on every process, and the wall-time accounting of its phases.

Every process proposes and filters its own share; counts that decide when a loop ends are summed over processes, so
that all of them run the same number of generate/forward calls (ZeRO-3 gathers weights inside them and would hang
otherwise).
"""

import contextlib
import time
from collections import defaultdict

import torch


def is_zero3(accelerator, deepspeed_enabled: bool) -> bool:
    """Whether the generator is sharded by DeepSpeed ZeRO stage 3."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return bool(deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)


def sum_over_ranks(accelerator, value: float) -> float:
    """`value` summed over processes (returned as given on a single process)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor(float(value), device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item()


def mean_over_ranks(accelerator, values: list[float]) -> float:
    """The mean of every process's `values` together (NaN when there are none anywhere)."""
    total = sum_over_ranks(accelerator, sum(values))
    count = sum_over_ranks(accelerator, len(values))
    return total / count if count else float("nan")


class PhaseTimer:
    r"""
    Wall seconds per phase of the method for the whole run.

    The phases are propose and filter (in rounds and when drawing the distillation samples), oracle, failure_fit and
    distill (the optimisation steps). `seconds` is the trainer's `phase_seconds`.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._logged: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Add the enclosed wall time to `phase`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    @contextlib.contextmanager
    def outside(self, phase: str):
        """Add the enclosed wall time to `phase`, less what the other phases timed inside it took (nothing when the
        enclosed code raises)."""
        start, before = time.perf_counter(), self.total()
        yield
        inside = self.total() - before
        self.seconds[phase] += time.perf_counter() - start - inside

    def total(self) -> float:
        """Seconds over all phases so far."""
        return sum(self.seconds.values())

    def since_last_log(self) -> dict[str, float]:
        """`time/<phase>`: the seconds of each phase since the previous call."""
        logs = {f"time/{phase}": total - self._logged.get(phase, 0.0) for phase, total in self.seconds.items()}
        self._logged = dict(self.seconds)
        return logs
