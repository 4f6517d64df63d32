"""How many torch threads a CPU run uses when the user has not said.

torch starts with one intra-op thread per physical core. For the small models BaNEL is often run with on a CPU
(the addition example's 133k-parameter attacker, test models), every matrix is tiny and the threads spend more time
synchronising than computing, and on a machine shared with other jobs they also wait for each other: on a shared
2-core machine a 200-evaluation run of that attacker took 123 s with torch's 2 threads and 15 s with one
(`tests/test_threads.py` holds the rule, docs/recipes.md "Threads on a CPU" the measurement).
"""

import logging
import os

import torch

logger = logging.getLogger(__name__)

# Below this many parameters a CPU run defaults to one thread (measured on a shared 2-core machine: one thread was
# faster for every model up to 110M parameters; on idle many-core machines large models gain from threads, so the
# rule stays conservative and larger models keep torch's default, with a warning naming the setting).
SMALL_MODEL_PARAMETERS = 10_000_000
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_warned = False


def torch_default_threads() -> int:
    """The intra-op thread count torch starts with: the environment's, else one per physical core."""
    for name in _THREAD_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    import psutil  # an accelerate dependency; accelerate counts cores the same way

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def user_chose_threads() -> bool:
    """Whether the thread count was chosen: an environment variable, or `torch.set_num_threads` to a non-default."""
    if any(os.environ.get(name) for name in _THREAD_ENV):
        return True
    return torch.get_num_threads() != torch_default_threads()


def choose_cpu_threads(num_parameters: int, requested: int | None, user_chose: bool) -> int | None:
    """The thread count to set, or None to leave torch's.

    `requested` (the config's `torch_num_threads`) wins; otherwise a model under `SMALL_MODEL_PARAMETERS` gets one
    thread unless the user already chose a count.
    """
    if requested is not None:
        return requested
    if user_chose or num_parameters >= SMALL_MODEL_PARAMETERS:
        return None
    return 1


def configure_cpu_threads(model, requested: int | None) -> None:
    """Apply `choose_cpu_threads` for a run on the CPU (process-wide, as torch's setting is)."""
    global _warned
    num_parameters = sum(p.numel() for p in model.parameters())
    user_chose = user_chose_threads()
    threads = choose_cpu_threads(num_parameters, requested, user_chose)
    if threads is not None:
        if threads != torch.get_num_threads():
            logger.info("CPU run of a %s-parameter model: using %d torch thread(s) (set torch_num_threads to "
                        "choose).", f"{num_parameters:,}", threads)
        torch.set_num_threads(threads)
    elif not user_chose and not _warned and torch.get_num_threads() > 1:
        _warned = True
        logger.warning(
            "CPU run with torch's default of %d threads. On a machine shared with other jobs one thread can be "
            "several times faster (measured: 3.4x for a 110M-parameter forward on a shared 2-core machine); set "
            "torch_num_threads=1 (or OMP_NUM_THREADS=1) to try it.", torch.get_num_threads())
