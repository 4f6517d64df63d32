"""Where BaNEL's compute goes: filter throughput, memory, a round by phase, and wall time against TRL's GRPOTrainer.

    python benchmarks/efficiency.py             # both models, all four measurements
    python benchmarks/efficiency.py --quick     # a smoke test (small sizes, fewer repeats)

Three models: the addition task's attacker (133k parameters, character-level), a subword generator of the task
family (`tune_count_bpe` of benchmarks/preregistration.json's tuning set: byte-level BPE, words of 2-4 tokens) and a
randomly initialised Llama built from a config (~34M parameters, vocabulary 8,192), so that the figures mean
something on a CPU.

1. Filter throughput. The trainer's filter (`trainer.sampler.filter`: collation, scores under the generator and K
   failure adapters, the rejection test, the known-failure lookup) on candidates the trainer proposed. Against the
   limit, one bare forward pass per model over the same tokens:
   `filter_ratio = (K + 1) x bare_seconds / filter_seconds` (1.0 = at the limit). The bare pass is the plain model
   (no adapter layers injected) called on the same padded batch with the same chunk size, positions and
   `logits_to_keep`, under `torch.inference_mode`, and nothing else (no log-softmax). Timings are the fastest of
   `repeats` interleaved repetitions (timeit's rule on a shared machine; the ratio of medians is kept beside it).
   peft's mixed-adapter batch (the fallback path) is timed beside it.
2. Memory. Each configuration runs in a fresh subprocess (glibc's mmap threshold fixed, so freed blocks leave the
   resident set): peak resident memory (VmHWM, reset after the imports and loading the candidates) of what a round
   holds: the generator with two AdamW steps on the candidates (its own training, as in distillation: the optimizer
   state, then a steady-state step), then alone / with K failure adapters (the newest fitted for one epoch, as in a
   round) / with K full copies (`failure_model="copy"`), scoring the candidates under every model. Ratios are
   against the generator alone.
3. Round breakdown. Wall seconds per round by phase, from `BaNELTrainer.phase_seconds` over the run of part 4:
   propose and filter (both for the round's candidates and for the distillation's posterior samples), oracle, failure
   fit, distil (the optimisation steps); "other" is the rest of the wall time (collation, Trainer bookkeeping).
4. Against TRL. Wall time for BaNEL at its defaults (only the addition task's budget, lengths and batch sizes set, as
   `benchmarks/defaults.py` runs it) and for TRL's `GRPOTrainer` (the addition benchmark's settings) to spend `nre`
   reward evaluations on the same model, oracle and generation length; both through the
   same ledger class, both single-process, one thread.

Writes benchmarks/results/efficiency.{json,md,png}.
"""

import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, set_seed  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402
from trl_banel_examples.baselines import BudgetedReward, StopOnBudgetCallback  # noqa: E402
from trl_banel.failure import FailureModels  # noqa: E402
from trl_banel.ledger import LEDGER_FILENAME  # noqa: E402
from trl_banel.posterior import Candidates, completion_nll, position_ids_from_mask  # noqa: E402
from trl_banel_examples.tasks.addition import BANEL_SETTINGS as ADDITION_BANEL_SETTINGS, load_addition_task  # noqa: E402
from benchmarks import task_family  # noqa: E402
from benchmarks.common import GRPO_COMMON, banel_settings as run_banel_settings, parse_args  # noqa: E402
from benchmarks.defaults import PREREGISTRATION, task_settings  # noqa: E402

PHASES = ["propose", "filter", "oracle", "failure_fit", "distill"]


@dataclass
class Args:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "Numbers of active failure models."})
    models: list[str] = field(default_factory=lambda: ["addition", "family_bpe", "random_llama"],
                              metadata={"help": "Which models to measure: addition, family_bpe, random_llama."})
    repeats: int = field(default=7, metadata={"help": "Minimum interleaved repetitions of each filter timing."})
    min_seconds: float = field(default=20.0, metadata={
        "help": "Keep repeating a filter timing (up to 200 times) until this many seconds have passed."})
    addition_candidates: int = field(default=512, metadata={"help": "Candidates scored per filter call (addition)."})
    llama_candidates: int = field(default=64, metadata={"help": "Candidates scored per filter call (random Llama)."})
    llama_prompt_length: int = field(default=8, metadata={"help": "Prompt tokens of the random Llama's candidates."})
    llama_completion_length: int = field(default=24, metadata={"help": "Completion tokens (random Llama)."})
    nre: int = field(default=1000, metadata={"help": "Reward evaluations BaNEL and GRPO each spend (addition and "
                                                     "family_bpe)."})
    llama_nre: int = field(default=64, metadata={"help": "Reward evaluations each spends on the random Llama."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    out: str = field(default=str(ROOT / "benchmarks" / "results"), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: small sizes, 2 repeats, small NRE."})
    probe: str | None = field(default=None, metadata={"help": "Internal: one memory measurement MODEL:MODE:K."})


QUICK = dict(repeats=2, min_seconds=0.0, addition_candidates=64, llama_candidates=8, llama_completion_length=8,
             nre=100, llama_nre=16,
             ks=[1, 2])
LLAMA = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=256)
LLAMA_QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=64)



# ------------------------------------------------------------------------------------------------------ the models
def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Words t0 .. t{V-5}, whitespace-separated; encoding prepends <bos>."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i + 4 for i in range(vocab_size - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def rare_word_oracle(prompts, completions, **kwargs):
    """A sparse synthetic reward for the random Llama: success when the completion contains word t7."""
    return [1.0 if "t7" in c.split() else 0.0 for c in completions]


def build(name: str, args: Args):
    """`(generator, tokenizer, oracle, dataset, prompt_length, completion_length, n_candidates)` for a model name."""
    if name == "addition":
        attacker, tok, oracle = load_addition_task()
        return attacker, tok, oracle, Dataset.from_dict({"prompt": [""]}), None, 12, args.addition_candidates
    if name == "random_llama":
        config = LLAMA_QUICK if args.quick else LLAMA
        tok = word_tokenizer(config["vocab_size"])
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        g = torch.Generator().manual_seed(0)
        prompts = [" ".join(f"t{int(i)}" for i in torch.randint(0, config["vocab_size"] - 4,
                                                                  (args.llama_prompt_length - 1,), generator=g))
                   for _ in range(32)]
        return (model, tok, rare_word_oracle, Dataset.from_dict({"prompt": prompts}), args.llama_prompt_length,
                args.llama_completion_length, args.llama_candidates)
    if name == "family_bpe":
        task = family_bpe_task(args.quick)
        model, tok, oracle = task.load()
        prompts = task_family.prompt_texts(task.spec)
        return (model, tok, oracle, Dataset.from_dict({"prompt": prompts}), None, task.max_completion_length,
                args.addition_candidates)
    raise ValueError(f"unknown model {name!r}; choose addition, family_bpe or random_llama")


def family_bpe_task(quick: bool):
    """A subword generator of the task family: the tuning task `tune_count_bpe` (byte-level BPE, words of 2-4
    tokens; tuning set, so measuring on it reveals nothing of the evaluation tasks); at `--quick`, a tiny one."""
    if quick:
        spec = task_family.FamilySpec("efficiency_tiny_bpe", tokenizer="bpe", structure="count", symbols=3, length=4,
                                      pretrain_steps=40, prior=0.02)
    else:
        entry = next(e for e in json.loads(PREREGISTRATION.read_text())["tuning"] if e["name"] == "tune_count_bpe")
        spec = task_family.specs_from([entry])[0]
    return task_family.build(spec)


# ------------------------------------------------------------------------------------------------------ 1. filter
def bare_forward(model, cands: Candidates, batch_size: int):
    """The limit: one plain forward over the candidates' tokens (completion logits only), nothing else."""
    keep = cands.input_ids.shape[1] - cands.prompt_width + 1
    with torch.inference_mode():
        for s in range(0, len(cands), batch_size):
            att = cands.attention_mask[s : s + batch_size]
            model(input_ids=cands.input_ids[s : s + batch_size], attention_mask=att,
                  position_ids=position_ids_from_mask(att), logits_to_keep=keep)


def perturb_adapters(policy, name: str, seed: int):
    """A nonzero LoRA delta, as after a fit (timing does not depend on the values, correctness checks do)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in policy.named_parameters():
        if f".{name}." in n and "lora_B" in n:
            p.data.copy_(0.01 * torch.randn(p.shape, generator=g))


def time_once(fn, timings: list):
    start = time.perf_counter()
    fn()
    timings.append(time.perf_counter() - start)


def measure_filter(name: str, args: Args, n: int, repeats: int, workdir: str, tau: float = 0.97):
    """The trainer's own filter (collation, scoring under every model, rejection test, known-failure lookup) on
    candidates its own `sampler.propose` drew, against the bare forward over the same tokens."""
    model, tok, oracle, dataset, _, length, _ = build(name, args)
    bare_model = copy.deepcopy(model).eval()  # no adapter layers ever injected into this one
    config = BaNELConfig(output_dir=fresh(workdir), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                         max_completion_length=length, rejection_threshold=tau, seed=0, disable_tqdm=True)
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, args=config, processing_class=tok, train_dataset=dataset)
    proposals = trainer.sampler.propose(n)
    cands = trainer.sampler.collate(proposals)
    batch_size, fm = config.scoring_batch_size, trainer.failures
    rows = {}
    for k in args.ks:
        while len(fm) < k:
            perturb_adapters(fm.policy, fm.add(), seed=len(fm))

        def fast():
            return trainer.sampler.filter(proposals)

        def mixed():
            fm.scoring = "peft"  # peft's mixed-adapter batch
            try:
                return trainer.sampler.filter(proposals)
            finally:
                fm.scoring = "auto"

        assert fm.scoring_path() == "merged", "the benchmark should time the merged-weight path"
        fast(), mixed(), bare_forward(bare_model, cands, batch_size)  # warm-up
        t = {"bare": [], "filter": [], "peft_mixed": []}
        start = time.perf_counter()
        # at least `repeats` rounds, and more while they are cheap (small models: a shared machine's load comes in
        # bursts, and the fastest of many short timings is the one it did not interrupt)
        while len(t["bare"]) < repeats or (time.perf_counter() - start < args.min_seconds and len(t["bare"]) < 200):
            time_once(lambda: bare_forward(bare_model, cands, batch_size), t["bare"])
            time_once(fast, t["filter"])
            time_once(mixed, t["peft_mixed"])
        # the fastest of the interleaved repetitions (timeit's rule: the others measure the machine's other load)
        med = {key: min(v) for key, v in t.items()}
        rows[k] = {
            "bare_seconds": med["bare"], "filter_seconds": med["filter"], "peft_mixed_seconds": med["peft_mixed"],
            "filter_candidates_per_second": len(cands) / med["filter"],
            "bare_candidates_per_second": len(cands) / med["bare"],
            "filter_ratio": (k + 1) * med["bare"] / med["filter"],
            "peft_mixed_ratio": (k + 1) * med["bare"] / med["peft_mixed"],
            "filter_ratio_of_medians": (k + 1) * statistics.median(t["bare"]) / statistics.median(t["filter"]),
            "accepted": len(fast().accepted), "repetitions": len(t["bare"]),
        }
        print(f"  filter K={k}: bare {med['bare'] * 1e3:.1f} ms, filter {med['filter'] * 1e3:.1f} ms "
              f"(ratio {rows[k]['filter_ratio']:.2f}), peft mixed batch {med['peft_mixed'] * 1e3:.1f} ms "
              f"(ratio {rows[k]['peft_mixed_ratio']:.2f}), {rows[k]['accepted']}/{len(cands)} accepted", flush=True)
    return rows, cands, sum(p.numel() for p in bare_model.parameters())


# ------------------------------------------------------------------------------------------------------ 2. memory
def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def memory_probe(spec: str, args: Args) -> dict:
    """In a fresh process: peak RSS of what a round holds, with `mode` in policy / adapter / copy and K models."""
    name, mode, k, cands_path = spec.split(":", 3)
    k = int(k)
    c = torch.load(cands_path)
    cands = Candidates(c["input_ids"], c["attention_mask"], c["completion_mask"], c["prompt_width"], [], [], [], [])
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: count only what follows
    base = _rss_kib("VmRSS")
    model = build(name, args)[0]
    # the generator's own training (every trainer holds it): two AdamW steps as in distillation (the first creates
    # the optimizer state, the second is the steady state: activations and gradients on top of it)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    for start in (0, 16):
        batch = torch.arange(start, start + 16) % len(cands)  # (wraps around when there are fewer candidates)
        nll = completion_nll(model, cands.input_ids[batch], cands.attention_mask[batch], cands.completion_mask[batch])
        nll.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    if mode == "policy":
        fm = FailureModels(model)
    else:
        fm = FailureModels(model, mode=mode)
        for j in range(k):
            fm.add()
        # the newest model is fitted, as in a round (its optimizer state lives during the fit)
        fm.fit(cands, max_epochs=1, learning_rate=1e-3, batch_size=16)
    fm.score(cands, 512)
    return {"peak_kib": _rss_kib("VmHWM") - base}


def measure_memory(name: str, ks: list[int], args: Args, cands: Candidates, workdir: str) -> dict:
    path = os.path.join(fresh(workdir), "candidates.pt")
    torch.save({"input_ids": cands.input_ids, "attention_mask": cands.attention_mask,
                "completion_mask": cands.completion_mask, "prompt_width": cands.prompt_width}, path)
    # glibc would keep freed blocks in its heap (RSS then counts memory no longer in use, and a later allocation
    # reuses it unseen): a fixed mmap threshold returns every large block to the system when freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}

    def probe(mode, k):
        cmd = [sys.executable, __file__, "--probe", f"{name}:{mode}:{k}:{path}", "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_kib"]

    policy = probe("policy", 0)
    rows = {"policy_mib": policy / 1024}
    for k in ks:
        adapter, full = probe("adapter", k), probe("copy", k)
        rows[k] = {"adapter_mib": adapter / 1024, "copy_mib": full / 1024,
                   "memory_ratio_adapter": adapter / policy, "memory_ratio_copy": full / policy}
        print(f"  memory K={k}: policy {policy / 1024:.1f} MiB, adapters {adapter / 1024:.1f} MiB "
              f"(x{adapter / policy:.2f}), copies {full / 1024:.1f} MiB (x{full / policy:.2f})", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------ 3 + 4. runs
def banel_settings(name: str, args: Args, nre: int, workdir: str, length: int) -> dict:
    """BaNEL at its defaults: the addition task's budget, lengths and batch sizes only (`benchmarks/defaults.py`'s
    rule: no mechanism field)."""
    settings = {**run_banel_settings(task_settings(ADDITION_BANEL_SETTINGS)), "max_reward_evaluations": nre,
                "output_dir": workdir, "logging_steps": 10_000, "disable_tqdm": True, "max_completion_length": length}
    # smaller batches on the random Llama: each candidate costs ~250x the addition model's (the round's size stays the
    # default round's, as in every benchmark run at the defaults)
    if name == "random_llama":
        settings.update(num_candidates=64, per_device_train_batch_size=16)
    return settings


def fresh(workdir: str) -> str:
    """An empty work folder: a ledger left by an earlier run would be resumed (and nothing re-spent)."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    return workdir


def run_banel(name: str, args: Args, nre: int, workdir: str) -> dict:
    fresh(workdir)
    model, tok, oracle, dataset, _, length, _ = build(name, args)
    settings = banel_settings(name, args, nre, workdir, length)
    set_seed(0)
    trainer = BaNELTrainer(model=model, reward_funcs=oracle, args=BaNELConfig(**settings), processing_class=tok,
                           train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rounds = max(trainer.round, 1)
    phases = {p: trainer.phase_seconds.get(p, 0.0) / rounds for p in PHASES}
    other = seconds / rounds - sum(phases.values())
    # what the fit's time bought: its optimiser steps and the margin they reached on the round's negatives
    fits = [h for h in trainer.history if "failure/fit_steps" in h]
    fit = {"fit_steps": statistics.fmean(h["failure/fit_steps"] for h in fits) if fits else 0.0,
           "fit_log_ratio": statistics.fmean(h["failure/fit_log_ratio"] for h in fits) if fits else 0.0}
    print(f"  BaNEL: {trainer.ledger.spent} NRE in {seconds:.1f} s, {trainer.round} rounds; per round "
          + ", ".join(f"{p} {v:.2f} s" for p, v in phases.items()) + f", other {other:.2f} s; failure fit "
          f"{fit['fit_steps']:.0f} steps for a mean log-ratio of {fit['fit_log_ratio']:.3f} nats", flush=True)
    keep = ("evaluations_per_round", "num_candidates", "max_completion_length", "failure_epochs", "failure_batch_size",
            "distill_samples", "distill_steps", "per_device_train_batch_size")
    return {"seconds": seconds, "nre": trainer.ledger.spent, "rounds": trainer.round,
            "round_breakdown": {**phases, "other": other, "total": seconds / rounds}, "failure_fit": fit,
            "settings": {k: settings[k] for k in keep if k in settings},
            "config": {k: v for k, v in settings.items() if k != "output_dir"}}


def run_grpo(name: str, args: Args, nre: int, workdir: str) -> dict:
    model, tok, oracle, dataset, _, length, _ = build(name, args)
    settings = {**GRPO_COMMON, "learning_rate": 3e-4, "max_completion_length": length, "seed": 0,
                "max_steps": 10_000}
    if name == "random_llama":
        settings.update(per_device_train_batch_size=16, num_generations=8, learning_rate=1e-4)
    budgeted = BudgetedReward(oracle, nre, os.path.join(fresh(workdir), LEDGER_FILENAME))
    set_seed(0)
    trainer = GRPOTrainer(model=model, reward_funcs=budgeted,
                          args=GRPOConfig(output_dir=workdir, **settings), processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": [dataset[i % len(dataset)]["prompt"]
                                                                      for i in range(4096)]}),
                          callbacks=[StopOnBudgetCallback(budgeted)])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    print(f"  GRPO: {budgeted.ledger.spent} NRE in {seconds:.1f} s, {trainer.state.global_step} steps", flush=True)
    return {"seconds": seconds, "nre": budgeted.ledger.spent, "steps": trainer.state.global_step,
            "settings": {k: settings[k] for k in ("per_device_train_batch_size", "num_generations",
                                                  "max_completion_length", "num_iterations", "learning_rate")}}


# ------------------------------------------------------------------------------------------------------ outputs
def write_outputs(result: dict, out: str):
    os.makedirs(out, exist_ok=True)
    Path(out, "efficiency.json").write_text(json.dumps(result, indent=1))
    lines = ["# Efficiency (`python benchmarks/efficiency.py`)", "",
             f"{result['machine']['cpus']} CPU cores, {result['machine']['threads']} torch thread, "
             f"torch {result['machine']['torch']}; {result['minutes']:.1f} min.", "",
             "## Filter throughput: ratio = (K + 1) x bare forward / filter (1.0 = one bare forward per model)", "",
             "| model | K | bare forward (cand/s) | filter (cand/s) | filter_ratio | peft mixed-batch ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, m in result["models"].items():
        for k, r in m["filter"].items():
            lines.append(f"| {name} | {k} | {r['bare_candidates_per_second']:.0f} | "
                         f"{r['filter_candidates_per_second']:.0f} | {r['filter_ratio']:.2f} | "
                         f"{r['peft_mixed_ratio']:.2f} |")
    lines += ["", "## Peak memory against the generator alone (scoring the candidates)", "",
              "| model | K | generator alone (MiB) | K adapters (MiB) | memory_ratio_adapter | K copies (MiB) | "
              "memory_ratio_copy |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in result["models"].items():
        mem = m["memory"]
        for k in [k for k in mem if k != "policy_mib"]:
            r = mem[k]
            lines.append(f"| {name} | {k} | {mem['policy_mib']:.1f} | {r['adapter_mib']:.1f} | "
                         f"{r['memory_ratio_adapter']:.2f} | {r['copy_mib']:.1f} | {r['memory_ratio_copy']:.2f} |")
    lines += ["", "## One round, wall seconds by phase (mean over the BaNEL run below)", "",
              "The failure fit's optimiser steps per round and the mean log-ratio `log p_fail - log q` they reached "
              "on the round's negatives stand beside its seconds (the ratio test needs log(1/0.97) = 0.030 nats to "
              "reject the average negative); `previous` rows are the results file this run replaced.", "",
              "| model | run | " + " | ".join(PHASES) + " | other | total | fit steps | fit log-ratio |",
              "|" + " --- |" * (len(PHASES) + 6)]

    def fit_cells(fit):
        return f"{fit['fit_steps']:.0f} | {fit['fit_log_ratio']:.3f}" if fit else "n/a | n/a"

    for name, m in result["models"].items():
        b = m["banel"]["round_breakdown"]
        lines.append(f"| {name} | this | " + " | ".join(f"{b[p]:.2f}" for p in PHASES + ["other", "total"])
                     + f" | {fit_cells(m['banel'].get('failure_fit'))} |")
        old = result.get("previous", {}).get(name)
        if old:
            lines.append(f"| {name} | previous | "
                         + " | ".join(f"{old['round_breakdown'][p]:.2f}" for p in PHASES + ["other", "total"])
                         + f" | {fit_cells(old.get('failure_fit'))} |")
    lines += ["", "## Wall time to spend the same reward evaluations", "",
              "| model | NRE | BaNEL (s) | GRPO (s) | banel_vs_grpo_wall_ratio |", "| --- | --- | --- | --- | --- |"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {m['banel']['nre']} / {m['grpo']['nre']} | {m['banel']['seconds']:.1f} | "
                     f"{m['grpo']['seconds']:.1f} | {m['banel_vs_grpo_wall_ratio']:.2f} |")
    Path(out, "efficiency.md").write_text("\n".join(lines) + "\n")
    plot(result, os.path.join(out, "efficiency.png"))
    print("\n".join(lines))


def plot(result: dict, path: str):
    from trl_banel_examples.plotting import plt  # the Agg backend: files only

    names = list(result["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        f = result["models"][name]["filter"]
        ks = [int(k) for k in f]
        axes[0].plot(ks, [f[k]["filter_ratio"] for k in f], "o-", label=f"{name}: merged LoRA (ours)")
        axes[0].plot(ks, [f[k]["peft_mixed_ratio"] for k in f], "x--", label=f"{name}: peft mixed batch")
    axes[0].axhline(0.8, color="gray", lw=0.8, ls=":", label="target 0.8")
    axes[0].set(xlabel="active failure models K", ylabel="(K+1) x bare forward / filter", ylim=(0, 1.2),
                title="Filter throughput against its limit")
    axes[0].legend(fontsize=7)
    bottom = [0.0] * len(names)
    for phase in PHASES + ["other"]:
        breakdowns = [result["models"][n]["banel"]["round_breakdown"] for n in names]
        values = [b[phase] / b["total"] for b in breakdowns]
        axes[1].bar(names, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set(ylabel="share of a round's wall time", title="Where a round's time goes")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args)))
        return {}
    start = time.time()
    result = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                          "python": platform.python_version()},
              "settings": {k: v for k, v in asdict(args).items() if k not in ("out", "probe")}, "models": {}}
    workroot = os.path.join(args.out, "work", "efficiency")
    for name in args.models:
        print(f"[{name}]", flush=True)
        n = args.addition_candidates if name == "addition" else args.llama_candidates
        filter_rows, cands, parameters = measure_filter(name, args, n, args.repeats,
                                                        os.path.join(workroot, f"{name}_filter"))
        m = {"parameters": parameters, "candidates": len(cands),
             "tokens_per_candidate": cands.input_ids.shape[1], "filter": filter_rows}
        m["memory"] = measure_memory(name, args.ks, args, cands, os.path.join(workroot, f"{name}_memory"))
        nre = args.llama_nre if name == "random_llama" else args.nre
        m["banel"] = run_banel(name, args, nre, os.path.join(workroot, f"{name}_banel"))
        m["grpo"] = run_grpo(name, args, nre, os.path.join(workroot, f"{name}_grpo"))
        m["banel_vs_grpo_wall_ratio"] = m["banel"]["seconds"] / m["grpo"]["seconds"]
        result["models"][name] = m
    models_ = result["models"]
    result.update({
        "filter_ratio": {n: {k: r["filter_ratio"] for k, r in m["filter"].items()} for n, m in models_.items()},
        "memory_ratio_adapter": {n: {k: m["memory"][k]["memory_ratio_adapter"] for k in args.ks}
                                 for n, m in models_.items()},
        "memory_ratio_copy": {n: {k: m["memory"][k]["memory_ratio_copy"] for k in args.ks}
                              for n, m in models_.items()},
        "round_breakdown": {n: m["banel"]["round_breakdown"] for n, m in models_.items()},
        "banel_vs_grpo_wall_ratio": {n: m["banel_vs_grpo_wall_ratio"] for n, m in models_.items()},
        "minutes": (time.time() - start) / 60,
    })
    previous = Path(args.out, "efficiency.json")
    if previous.exists():  # the round breakdown this run replaces, kept beside the new one
        old = json.loads(previous.read_text())
        result["previous"] = {n: {"round_breakdown": m["banel"]["round_breakdown"],
                                  "failure_fit": m["banel"].get("failure_fit")}
                              for n, m in old.get("models", {}).items() if "banel" in m}
    write_outputs(json.loads(json.dumps(result)), args.out)  # json round trip: K keys become strings, as on disk
    return result


def parse(argv=None) -> Args:
    return parse_args(Args, QUICK, argv)


if __name__ == "__main__":
    main(parse())
