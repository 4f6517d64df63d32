"""Callbacks of a BaNEL run: the console progress (added by the trainer) and the ones users add."""

import contextlib
import json
import logging
import os
import signal
import threading
import time

from transformers import TrainerCallback

from .distributed import sum_over_ranks

logger = logging.getLogger(__name__)


def _short(text: str, width: int = 40) -> str:
    text = repr(text)
    return text if len(text) <= width else text[: width - 4] + "...'"


def format_round_line(record: dict, budget: int, best=None, new_successes: int = 0) -> str:
    """The console line of one round (an entry of `trainer.history`): what a person watching the run needs.

    `new_successes`: the successes this round paid for (a repeat of a known success is answered by the ledger, free,
    and is not new)."""
    parts = [f"round {record['round']}", f"NRE {record['nre']:,}/{budget:,}",
             f"successes {record['successes']} (+{new_successes})",
             f"accepted {record['acceptance_rate']:.1%}"]
    if "failure/fit_log_ratio" in record:  # no fit when the round had no negative
        parts.append(f"fit margin {record['failure/fit_log_ratio']:.2f} nats")
    if best is not None:
        parts.append(f"best {_short(best.completion)} (reward {best.reward:.3g})")
    return " | ".join(parts)


class _BarLineBreak(logging.Handler):
    """Put the package's log records on their own line while the progress bar is drawn: before whichever handler
    writes a record, the bar's line is cleared on a terminal, or ended with a newline in a redirected log, so that the
    message does not continue the bar's line (the bar is drawn again below it at its next update). Where no handler of
    the user's would write the record, it writes it as Python's last resort would have (WARNING and above, the message
    alone): being a handler, it keeps the last resort from being used."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def _written_elsewhere(self, record) -> bool:
        logger = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self and record.levelno >= h.level for h in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False

    def emit(self, record):
        fp = self.bar.fp
        if getattr(fp, "isatty", lambda: False)():
            self.bar.clear()
        else:
            fp.write("\n")
        if record.levelno >= logging.WARNING and not self._written_elsewhere(record):
            fp.write(self.format(record) + "\n")
        fp.flush()


class BaNELProgressCallback(TrainerCallback):
    r"""
    The console of a BaNEL run (it replaces `transformers`' progress bar and printer; added by the trainer).

    A progress bar over the NRE budget, one line per round (round, NRE spent of the budget, successes found, the
    acceptance rate, the failure fit's margin and the best success so far) and a final line saying why the run
    stopped. The full metrics go to `report_to` and, at debug level (`log_level="debug"`, or the `trl_banel` logger
    at DEBUG), to the console too; nothing is printed per distillation step otherwise. With `disable_tqdm=True` the
    lines are printed without a bar.
    """

    def __init__(self, trainer, bar: bool = True):
        self.trainer = trainer
        self.use_bar = bar
        self.bar = None
        self._last_round = -1  # the last round printed
        self._verbose = False
        self._line_break = None
        self._transformers_bars = True

    def _write(self, line: str):
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._verbose = args.get_process_log_level() <= logging.DEBUG or logger.isEnabledFor(logging.DEBUG)
        self._last_round = self.trainer.round - 1  # a resumed run does not repeat the rounds it loaded
        if state.is_world_process_zero and self.use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=args.max_reward_evaluations, desc="reward evaluations", unit="NRE",
                            dynamic_ncols=True)
            self.bar.update(self.trainer.ledger.spent)
            self._line_break = _BarLineBreak(self.bar)
            logging.getLogger("trl_banel").addHandler(self._line_break)
            # transformers' own bars (a checkpoint's "Writing model shards") would be drawn into ours
            from transformers.utils import logging as hf_logging

            self._transformers_bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        t = self.trainer
        if self.bar is not None:
            self.bar.update(t.ledger.spent - self.bar.n)
            self.bar.set_postfix(round=t.round, successes=len(t.ledger.successes), refresh=False)
        for record in t.history:
            if record["round"] > self._last_round:
                # the best success as of that round (several rounds can end in one step when distill_every > 1)
                found = [r for r in t.ledger.successes if r.round <= record["round"]]
                best = max(found, key=lambda r: r.reward, default=None)
                new = sum(r.round == record["round"] for r in found)
                self._write(format_round_line(record, args.max_reward_evaluations, best, new))
                self._last_round = record["round"]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self._verbose and logs:
            self._write(str({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()}))

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.on_step_end(args, state, control)
        t = self.trainer
        reason = getattr(t, "stop_reason", None) or "max_steps reached"
        found = len(t.ledger.successes)
        self._write(f"stopped after {t.round} rounds: {reason}; {t.ledger.spent:,} reward evaluations spent, "
                    f"{found} {'success' if found == 1 else 'successes'} found")
        # an interrupted run has not ended the way the advice is about
        advice = None if t.interrupted else sparse_task_advice(t.args, t.ledger.spent, found)
        if advice:
            logger.warning(advice)
        for cb in t.callback_handler.callbacks:  # the run report is drawn just before (its callback comes first)
            if getattr(cb, "report_path", None):
                self._write(f"run report: {cb.report_path}")
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            logging.getLogger("trl_banel").removeHandler(self._line_break)
            if self._transformers_bars:
                from transformers.utils import logging as hf_logging

                hf_logging.enable_progress_bar()


def add_banel_callbacks(trainer):
    """The run report, BaNEL's console in place of `transformers`' progress bar and printer, and the stop at the end
    of the budget; returns the [`StopOnSignal`] callback, which `train()` installs and the rounds ask between them."""
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
    from transformers.trainer_callback import PrinterCallback

    from .report import RunReportCallback

    trainer.add_callback(RunReportCallback(trainer))  # rounds.jsonl and run_report.png in output_dir
    # the console counts reward evaluations and prints one line per round, not a metrics dict per step
    printer = trainer.callback_handler.pop_callback(PrinterCallback)
    if trainer.callback_handler.pop_callback(DEFAULT_PROGRESS_CALLBACK) is not None or printer is not None:
        trainer.add_callback(BaNELProgressCallback(trainer, bar=printer is None))
    trainer.add_callback(StopWhenDone(trainer))
    trainer.add_callback(SaveEveryMinutes(trainer))
    interrupts = StopOnSignal(trainer)
    trainer.add_callback(interrupts)
    return interrupts


class StopWhenDone(TrainerCallback):
    """Ends `train()` once the budget (or round limit) is reached and the last distillation has been applied."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if not self.trainer.distilling:  # the last step of a distillation has been applied
            self.trainer.measure_distillation()
        if self.trainer.finished and not self.trainer.distilling:
            control.should_training_stop = True
            # a checkpoint of the final state: a later train(resume_from_checkpoint=True) continues from the trained
            # model, never from an earlier one
            control.should_save = args.save_strategy != "no"


class StopOnSignal(TrainerCallback):
    r"""
    SIGINT (Ctrl-C) or SIGTERM during `train()`: the run stops at its next safe point, with a checkpoint.

    The signal only sets a flag (the handler runs between two Python bytecodes, possibly inside a reward call or a
    checkpoint write, where nothing may be cut short); the trainer reads it after each round (`requested`), and at the
    end of the step the training stops and, unless `save_strategy="no"`, saves a complete checkpoint the ordinary way.
    The first signal also restores the handlers found before `train()`, so a second Ctrl-C interrupts at once.
    Handlers are installed only from the main thread (Python allows no other), and restored when `train()` ends.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer):
        self.trainer = trainer
        self.received: str | None = None  # the signal's name, once one arrived (this process)
        self.stopped: str | None = None  # the signal the run stopped for (any process), once it stopped
        self._previous: dict = {}

    @contextlib.contextmanager
    def installed(self):
        """Catch the signals for the duration of the block (`train()`), then put the previous handlers back."""
        self.received = self.stopped = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()
            # a signal after the last step (while the run report was drawn): the run has ended with its final
            # checkpoint, but the script must still learn that it was asked to stop
            self.stopped = self.stopped or self.received

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self._restore()  # a second signal gets the previous behaviour: KeyboardInterrupt, or termination
        # os.write: a print or a log call could be the one this handler interrupted (a reentrant write raises)
        os.write(2, (f"\n{self.received} received: stopping after the current round to save a checkpoint "
                     f"({'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again to quit at once).\n").encode())

    def requested(self) -> bool:
        """Whether any process received a signal: every process asks at the same points, and all stop together."""
        if self.stopped is None and sum_over_ranks(self.trainer.accelerator, self.received is not None):
            self.stopped = self.received or "a signal (on another process)"
        return self.stopped is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested():
            self.trainer.stop_reason = f"interrupted ({self.stopped})"
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"


class SaveEveryMinutes(TrainerCallback):
    """A checkpoint every `save_every_minutes` of wall time (at the end of the step that passes it), so that a kill
    (SIGKILL, a lost machine) costs at most that much training. Off with `save_strategy="no"` or
    `save_every_minutes=None`."""

    def __init__(self, trainer):
        self.trainer = trainer
        minutes = getattr(trainer.args, "save_every_minutes", None)
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                    or not minutes > 0):
            raise ValueError(f"BaNELConfig.save_every_minutes={minutes!r} is invalid: it must be None or a number of "
                             "minutes > 0.")
        self.seconds = None if minutes is None else 60.0 * minutes
        self._last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is None or args.save_strategy == "no":
            return
        # the main process's clock decides: every process must take part in the same saves
        due = self.trainer.accelerator.is_main_process and time.monotonic() - self._last >= self.seconds
        if sum_over_ranks(self.trainer.accelerator, due):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self._last = time.monotonic()


def sparse_task_advice(args, spent: int, found: int) -> str | None:
    """What to change when a run ends without a success, or with successes it does not distil (the measurements
    behind the advice: docs/benchmarks.md), or None."""
    if spent and not found and args.evidence_pseudo_count == 0:
        return (f"No success in {spent:,} reward evaluations. Where even a uniform draw over well-formed outputs "
                f"would rarely succeed within the budget, a larger max_reward_evaluations is what helps. On "
                f"character-level outputs, evidence_pseudo_count=1 (proposals avoid the completion prefixes failures "
                f"already went through) can find successes sooner; with subword tokenizers it can push proposals off "
                f"well-formed text (docs/benchmarks.md).")
    if found and args.success_replay == 0 and args.distill_every > 0:
        return (f"{found} success(es) found, but success_replay=0: the generator is distilled on posterior samples "
                f"only and can drift away from what it found; success_replay=0.5 distils the successes themselves "
                f"(the default, but with the baselined objective).")
    return None


class SuccessCurveRecorder(TrainerCallback):
    r"""
    What the success curves share: the points (each a success estimate with where it was measured), the oracle calls
    the estimates made (`evaluation_calls`, never charged to a training budget), the best point and, with
    `keep_best`, a CPU copy of the weights it was measured on (`best_state`), and the JSON file they are written to.
    """

    def __init__(self, keep_best: bool = False, path: str | None = None):
        self.keep_best = keep_best
        self.path = path
        self.points: list[dict] = []
        self.evaluation_calls = 0
        self.best_point: dict | None = None
        self.best_state: dict | None = None

    def record(self, where: dict, estimate, state_dict) -> dict:
        """Add the point `{**where, **estimate.to_dict()}`; `state_dict()` gives the weights kept if it is the best."""
        self.evaluation_calls += estimate.oracle_calls
        point = {**where, **estimate.to_dict()}
        self.points.append(point)
        if self.best_point is None or point["rate"] > self.best_point["rate"]:
            self.best_point = point
            if self.keep_best:
                self.best_state = {k: v.detach().cpu().clone() for k, v in state_dict().items()}
        if self.path is not None:
            with open(self.path, "w") as f:
                json.dump({"points": self.points, "evaluation_calls": self.evaluation_calls}, f, indent=1)
        return point


class SuccessCurveCallback(SuccessCurveRecorder):
    r"""
    Records the sampler's success rate against the NRE spent, every `every_rounds` rounds, for plots.

    Each point is an estimate over `num_samples` samples, by default [`BaNELTrainer.estimate_success_rate`] (the
    posterior sampler); its oracle calls are counted in `evaluation_calls` and never charged to the training budget.
    The curve is written to `output_dir/success_curve.json` and logged as `eval/success_rate`.

    Args:
        estimate (`Callable[[trainer, int], SuccessEstimate]`, *optional*): another estimator (a task's exact one).
        keep_best (`bool`): keep a CPU copy of the generator at the best point (`best_state`).
    """

    def __init__(self, trainer, every_rounds: int = 5, num_samples: int = 2000, estimate=None,
                 keep_best: bool = False):
        path = os.path.join(trainer.args.output_dir, "success_curve.json")
        super().__init__(keep_best, path if trainer.accelerator.is_main_process else None)
        self.trainer = trainer
        self.every_rounds = every_rounds
        self.num_samples = num_samples
        self.estimate = estimate or (lambda t, n: t.estimate_success_rate(n))
        self._last_round = None

    def measure(self):
        t = self.trainer
        self._last_round = t.round
        return self.record({"round": t.round, "nre": t.ledger.spent}, self.estimate(t, self.num_samples),
                           t.failures.policy_state_dict)

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.points:
            self.measure()

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t.distilling and args.distill_every:  # mid-distillation: wait for the distilled generator
            return
        if t.round - self._last_round >= self.every_rounds:
            point = self.measure()
            t.log({"eval/success_rate": point["rate"], "eval/acceptance_rate": point["acceptance_rate"]})

    def on_train_end(self, args, state, control, **kwargs):
        if self.points and self.points[-1]["round"] != self.trainer.round:
            self.measure()
