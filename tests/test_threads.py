"""A CPU run picks a sensible torch thread count when the user has not chosen one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_banel.threads import SMALL_MODEL_PARAMETERS, choose_cpu_threads, torch_default_threads, user_chose_threads

ROOT = Path(__file__).resolve().parents[1]


def test_the_rule():
    small, large = SMALL_MODEL_PARAMETERS - 1, SMALL_MODEL_PARAMETERS
    assert choose_cpu_threads(small, None, user_chose=False) == 1
    assert choose_cpu_threads(small, None, user_chose=True) is None  # the user's choice stands
    assert choose_cpu_threads(large, None, user_chose=False) is None  # large models keep torch's default
    assert choose_cpu_threads(large, 3, user_chose=True) == 3  # the config's torch_num_threads wins
    assert choose_cpu_threads(small, 2, user_chose=False) == 2


def test_what_counts_as_the_users_choice(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(torch_default_threads())
        assert not user_chose_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert user_chose_threads() and torch_default_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(torch_default_threads() + 1)
        assert user_chose_threads()
    finally:
        torch.set_num_threads(before)


SCRIPT = """
import torch
from datasets import Dataset
from trl_banel import BaNELConfig, BaNELTrainer
from trl_banel_examples.tasks.letters import load_letters_task
generator, tokenizer, oracle = load_letters_task()
seen = [torch.get_num_threads()]
for requested in (None, 2):
    args = BaNELConfig(output_dir={out!r}, use_cpu=True, bf16=False, report_to="none", max_reward_evaluations=8,
                       evaluations_per_round=8, max_completion_length=8, torch_num_threads=requested)
    BaNELTrainer(model=generator, reward_funcs=oracle, args=args,
                 train_dataset=Dataset.from_dict({{"prompt": [""]}}), processing_class=tokenizer)
    seen.append(torch.get_num_threads())
print(*seen)
"""


@pytest.mark.slow  # a run in a subprocess
@pytest.mark.skipif(torch_default_threads() < 2, reason="one core: torch's default is already one thread")
def test_a_small_model_on_the_cpu_runs_on_one_thread(tmp_path):
    # threads are process-wide (and this test process already set one): measure in a fresh process
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(out=str(tmp_path / "out"))], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, automatic, requested = (int(x) for x in proc.stdout.split()[-3:])
    assert (default, automatic, requested) == (torch_default_threads(), 1, 2)
