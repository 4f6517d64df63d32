"""Calling the user's reward functions (TRL's convention) safely.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, sync or async. A value that cannot
be trusted (an exception, a time-out, NaN, inf, a non-number, a list of the wrong length) is never turned into a
failure: a false negative would poison the failure model. Exceptions and time-outs are retried with backoff, then
the run stops with an error naming the function; bad values stop it at once with an error naming the function and
the index. `None` means "not scored".
"""

import asyncio
import concurrent.futures
import inspect
import json
import logging
import math
import numbers
import time
from collections.abc import Sequence

from .ledger import RewardFunctionError

logger = logging.getLogger(__name__)


def message_text(x) -> str:
    """The text of a prompt or completion in TRL's formats: a string as it is; a conversation (a list of messages, or
    one message) as its messages' contents concatenated, multimodal content parts by their `"text"` parts, any other
    content as JSON. One rule for the ledger's keys, the baselines' features and the recipes' reward functions."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        x = [x]
    if not isinstance(x, list):
        return str(x)
    parts = []
    for message in x:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list) and all(isinstance(p, dict) for p in content):
            content = "".join(p.get("text", "") for p in content)
        parts.append(content if isinstance(content, str) else json.dumps(content))
    return "".join(parts)


def reward_func_name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


class RewardOracle:
    r"""
    The weighted sum of one or more TRL-style reward functions, validated.

    Args:
        reward_funcs (`Callable` or `list[Callable]`):
            Reward functions `f(prompts, completions, **columns) -> list[float | None]`, sync or async.
        weights (`list[float]`, *optional*):
            One weight per function; all 1 by default.
        retries (`int`), backoff (`float`), timeout (`float` or `None`):
            See [`BaNELConfig`] `reward_retries`, `reward_retry_backoff`, `reward_timeout`.
    """

    @classmethod
    def from_config(cls, reward_funcs, args) -> "RewardOracle":
        """The oracle a [`BaNELConfig`] describes (its weights, retries and timeout)."""
        return cls(reward_funcs, args.reward_weights, args.reward_retries, args.reward_retry_backoff,
                   args.reward_timeout)

    def __init__(self, reward_funcs, weights=None, retries: int = 2, backoff: float = 1.0,
                 timeout: float | None = None):
        if not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError("reward_funcs is empty: pass at least one reward function.")
        for f in reward_funcs:
            if not callable(f):
                raise TypeError(
                    f"reward_funcs must be callables f(prompts, completions, **columns) -> list[float | None]; "
                    f"got {type(f).__name__}."
                )
        if weights is None:
            weights = [1.0] * len(reward_funcs)
        if len(weights) != len(reward_funcs):
            raise ValueError(
                f"BaNELConfig.reward_weights has {len(weights)} weights for {len(reward_funcs)} reward functions; "
                "give one weight per function."
            )
        self.reward_funcs = list(reward_funcs)
        self.names = [reward_func_name(f) for f in reward_funcs]
        self.weights = [float(w) for w in weights]
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.calls = 0  # number of oracle invocations (for tests and metrics)

    def _call_once(self, func, prompts, completions, columns):
        def run():
            out = func(prompts=prompts, completions=completions, **columns)
            if inspect.isawaitable(out):
                out = asyncio.run(_await(out))
            return out

        if self.timeout is None:
            return run()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            return pool.submit(run).result(timeout=self.timeout)
        except concurrent.futures.TimeoutError as e:
            raise TimeoutError(f"took longer than reward_timeout={self.timeout}s") from e
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _call_with_retries(self, func, name, prompts, completions, columns):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return self._call_once(func, prompts, completions, columns)
            except Exception as e:  # the user's code: anything can come out of it
                if attempt == self.retries:
                    raise RewardFunctionError(
                        f"reward function {name!r} failed {attempt + 1} time(s); last error: {type(e).__name__}: {e}. "
                        "Nothing from this call was recorded; evaluations made before it are in the ledger."
                    ) from e
                logger.warning("reward function %r raised %s: %s; retrying in %.1fs", name, type(e).__name__, e, delay)
                time.sleep(delay)
                delay *= 2

    def __call__(self, prompts: Sequence, completions: Sequence[str], columns: dict[str, list] | None = None,
                 require_a_score: bool = False):
        r"""Rewards for the completions: a list of `float` or `None` (not scored).

        With `require_a_score`, a call in which no completion is scored raises, naming the function(s) that scored
        nothing: a reward function that always answers `None` would otherwise end a run that learnt nothing as if it
        had merely converged.
        """
        columns = columns or {}
        unscoring = []
        n = len(completions)
        self.calls += 1
        total: list[float | None] = [0.0] * n
        for func, name, weight in zip(self.reward_funcs, self.names, self.weights):
            values = _as_list(self._call_with_retries(func, name, list(prompts), list(completions), columns), name, n)
            if n and all(v is None for v in values):
                unscoring.append(name)
            for i, v in enumerate(values):
                if v is None:
                    total[i] = None
                    continue
                v = _as_reward(v, name, i)
                if total[i] is not None:
                    total[i] += weight * v
        if require_a_score and n and all(t is None for t in total):
            names = ", ".join(repr(x) for x in (unscoring or self.names))
            raise RewardFunctionError(
                f"reward function {names} returned None ('not scored') for all {n} completions sent to it in this "
                "round: no evaluation was charged and nothing was recorded. Return a number for every completion it "
                "can judge (e.g. 0.0 for a failure); None is for the few it cannot.")
        return total


def _as_list(values, name: str, n: int) -> list:
    """A reward function's answer as a list of `n` values (raises, naming the function, otherwise)."""
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {name!r} returned {type(values).__name__}; expected a list of {n} rewards."
            ) from None
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} rewards for {n} completions; expected one per "
            "completion (None for 'not scored')."
        )
    return values


def _as_reward(v, name: str, i: int) -> float:
    """A reward as a finite `float` (a 0-d tensor or numpy scalar included; raises, naming the function, otherwise)."""
    if not isinstance(v, numbers.Real):
        if hasattr(v, "item"):  # a 0-d tensor or numpy scalar
            v = v.item()
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned {v!r} ({type(v).__name__}) at index {i}; expected a "
                "finite number or None."
            )
    v = float(v)
    if not math.isfinite(v):
        raise RewardFunctionError(
            f"reward function {name!r} returned {v} at index {i}; rewards must be finite (None means "
            "'not scored')."
        )
    return v


async def _await(x):
    return await x
