"""What a person watching a run sees, and the run stopping once it has found enough."""

import logging
import shutil

from test_trainer import UNCONDITIONAL, RecordingOracle, config

from trl_banel import BaNELTrainer
from trl_banel.callbacks import BaNELProgressCallback, format_round_line
from trl_banel.ledger import Evaluation


def lines_of(text):
    # DeepSpeed, when installed, prints one line on its first import in a process: not ours to silence
    return [line for line in text.splitlines() if line.strip() and "real_accelerator.py" not in line]


def test_one_line_per_round_and_nothing_per_distillation_step(tmp_path, char_tokenizer, skewed_model, capsys):
    # 8 distillation steps per round, logged at every step: none of them may reach the console by default
    oracle = RecordingOracle(success=lambda c: c == "zebra")
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle,
                           args=config(tmp_path, disable_tqdm=False, distill_steps=8, logging_steps=1,
                                       max_reward_evaluations=24, per_device_train_batch_size=8),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    assert sum(isinstance(cb, BaNELProgressCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    out = lines_of(capsys.readouterr().out)
    rounds = [line for line in out if line.startswith("round ")]
    assert len(rounds) == trainer.round == len(trainer.history) >= 3
    assert trainer.state.global_step == 8 * trainer.round  # so the console saw 8 logs per round
    for line, record in zip(rounds, trainer.history):
        assert line.startswith(f"round {record['round']} | NRE {record['nre']}/24 | successes {record['successes']} ")
    assert "accepted " in rounds[0] and "fit margin " in rounds[0]
    assert rounds[-1].startswith(f"round {trainer.round - 1} | NRE 24/24 | ")
    assert not [line for line in out if line.startswith("{")], out  # no metrics dict
    assert out[-2].startswith(f"stopped after {trainer.round} rounds: the budget of 24 reward evaluations is spent")
    assert out[-1].startswith("run report: ")
    assert len(out) == len(rounds) + 2  # the rounds and the two final lines, nothing else


def test_full_metrics_at_debug_level(tmp_path, char_tokenizer, skewed_model, capsys):
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(),
                           args=config(tmp_path, log_level="debug", logging_steps=1),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    out = lines_of(capsys.readouterr().out)
    dicts = [line for line in out if line.startswith("{")]
    assert len(dicts) >= trainer.state.global_step  # one per logged step, plus the end-of-training summary
    assert any("'nre/spent'" in line and "'filter/acceptance_rate'" in line for line in dicts)
    logging.getLogger("transformers").setLevel(logging.WARNING)  # log_level="debug" set transformers' verbosity


def test_round_line_names_the_best_success_and_skips_a_missing_fit():
    record = {"round": 4, "nre": 250, "successes": 2, "round_successes": 5, "acceptance_rate": 0.5}
    best = Evaluation(prompt="", completion="0012+5=" * 10, reward=1.0, round=3, success=True)
    line = format_round_line(record, 7500, best, new_successes=1)
    assert line.startswith("round 4 | NRE 250/7,500 | successes 2 (+1) | accepted 50.0% | best '0012+5=0012+")
    assert "fit margin" not in line and line.endswith("...' (reward 1)")
    assert "fit margin 1.25 nats" in format_round_line({**record, "failure/fit_log_ratio": 1.25}, 7500)


def test_stop_after_successes(tmp_path, char_tokenizer, skewed_model, capsys):
    # "dog" is 20% of the pretrained samples: the first round finds it, and the run stops there instead of
    # spending the other 192 evaluations of the budget
    oracle = RecordingOracle(success=lambda c: c == "dog")
    args = config(tmp_path, max_reward_evaluations=200, stop_after_successes=1)
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=args, train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    trainer.train()
    spent = trainer.ledger.spent
    assert trainer.round == 1 and 0 < spent <= 8 == args.evaluations_per_round
    assert [r.completion for r in trainer.ledger.successes] == ["dog"]
    assert trainer.stop_reason == "1 success found (stop_after_successes=1)"
    assert "stop_after_successes=1" in capsys.readouterr().out

    # a run resumed on this ledger (as after a crash: no banel_run.json) counts the successes it loads: it spends
    # nothing
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "out" / "evaluations.jsonl", resumed / "evaluations.jsonl")
    again = BaNELTrainer(model=skewed_model, reward_funcs=oracle,
                         args=config(tmp_path, output_dir=str(resumed), max_reward_evaluations=200,
                                     stop_after_successes=1),
                         train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    again.train()
    assert again.ledger.spent == spent == len(oracle.all_completions)
    assert again.stop_reason == "1 success found (stop_after_successes=1)"


def test_the_package_advice_gets_a_line_of_its_own_under_the_bar(tmp_path, char_tokenizer, skewed_model, capsys):
    # no success in the budget: the end-of-run advice is logged while the progress bar is still drawn
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=RecordingOracle(),
                           args=config(tmp_path, disable_tqdm=False), train_dataset=UNCONDITIONAL,
                           processing_class=char_tokenizer)
    root = logging.getLogger()
    configured = root.handlers[:]
    root.handlers.clear()  # as in a script that configured no logging (pytest's capture handler set aside)
    try:
        trainer.train()
    finally:
        root.handlers[:] = configured
    err = capsys.readouterr().err
    assert "reward evaluations:" in err, "no progress bar drawn"
    assert err.count("No success in 24 reward evaluations.") == 1  # written once, by nothing else than the package
    assert "\nNo success in 24 reward evaluations." in err, "glued to the progress bar's line"
    logger = logging.getLogger("trl_banel")
    assert not logger.handlers  # the bar's line break is gone with the bar
