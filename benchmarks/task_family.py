"""A family of sparse tasks: it generates tasks, so that the default round is judged on tasks nobody tuned it on.

A task (`FamilySpec`) is a generator that writes `length` symbols (characters, or words of several byte-level BPE
tokens), pretrained in CPU minutes on a random bigram chain over the symbols (one chain per prompt), and an oracle that
pays 1.0 for a well-formed output with a rare structure; anything off-format fails. Structures:

- `count`: at least `k` copies of the prompt's rare symbol (the chain makes that symbol rare);
- `mirror`: agreement between positions: a palindrome (`x[i] == x[length - 1 - i]`) holding at least `k` copies of
  the prompt's rare symbol;
- `sum`: an arithmetic check, the symbols' indices add up to exactly `k` (any enumerable sum: the calibration picks);
- `rare_set`: membership in a set of `k` outputs drawn among the chain's least likely ones (no structure to find).

The rule's parameter `k` is calibrated after pretraining: the value whose exact pretrained success probability is
closest (in log) to the spec's `prior`. Every success set is enumerated, so success probabilities are exact: the sum
over the success texts of the generator's probability of their canonical tokenisation then `<eos>`, averaged over the
prompts (for a BPE generator a lower bound: a text also has non-canonical tokenisations, which the decoder maps to
the same text; tests/test_task_family.py checks the exact figure against Monte Carlo over canonical samples). Each
task also has its blind-search reference: a uniform draw over the well-formed outputs (told the format, learning
nothing).

Generators are cached under `~/.cache/trl_banel/family` (or `$TRL_BANEL_FAMILY_CACHE`), keyed by the spec: pretraining
is seeded and runs on one thread, so a task is the same task wherever it is rebuilt (its `weights_hash` says so).

    python benchmarks/task_family.py --names count_char_a       # build (or load) tasks, print their calibration
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trl_banel_examples.tasks.common import weights_hash  # noqa: E402

SPECIALS = ["<pad>", "<bos>", "<eos>"]
STRUCTURES = ("count", "mirror", "sum", "rare_set")
MAX_SUCCESSES = 60_000  # per prompt: success sets are enumerated and scored at every estimate
CACHE = Path(os.environ.get("TRL_BANEL_FAMILY_CACHE", Path.home() / ".cache" / "trl_banel" / "family"))
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class FamilySpec:
    """One task of the family. Every field is part of the task's identity (and of its cache key)."""

    name: str
    tokenizer: str = "char"  # "char" (one token per character) or "bpe" (byte-level BPE; words of several tokens)
    symbols: int = 8  # alphabet size: letters (char) or words (bpe)
    length: int = 8  # symbols per output
    structure: str = "count"  # one of STRUCTURES
    prior: float = 1e-5  # target pretrained success probability; the rule's k is calibrated to the closest
    prompts: int = 1  # 1: the empty prompt; more: prompts "<p0>", "<p1>", ... each with its own chain and rule
    hidden: int = 32  # generator width: 32 (~30k parameters) to 256 (~3M)
    layers: int = 2
    bpe_merges: int = 24  # BPE merges over the 256 bytes: few, so that words are several tokens
    concentration: float = 0.5  # Dirichlet concentration of the chain's rows (below 1: a peaked generator)
    rare_weight: float | None = None  # the rare symbol's transitions are scaled by this; None: chosen so that the
    # chain's own success probability under some rule is the prior (count and mirror; 0.2 for the others)
    pretrain_steps: int = 1500
    seed: int = 0
    rule: int | None = None  # count and mirror: the rule the chain's rare weight is solved for (None: the one whose
    # weight is closest to 0.2)

    def __post_init__(self):
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"FamilySpec.tokenizer={self.tokenizer!r}: must be 'char' or 'bpe'")
        if self.structure not in STRUCTURES:
            raise ValueError(f"FamilySpec.structure={self.structure!r}: must be one of {STRUCTURES}")
        if not 2 <= self.symbols <= (26 if self.tokenizer == "char" else len(SYLLABLES)):
            raise ValueError(f"FamilySpec.symbols={self.symbols}: must be from 2 to 26 (char) or "
                             f"{len(SYLLABLES)} (bpe)")
        if self.length < 2 or self.prompts < 1:
            raise ValueError(f"FamilySpec.length={self.length} must be >= 2 and prompts={self.prompts} >= 1")

    def key(self) -> str:
        """The cache key: a hash of every field but the name."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k != "name" and not (k == "rule" and v is None)}  # keys made before `rule` existed hold
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def space(self) -> int:
        """Well-formed outputs per prompt."""
        return self.symbols ** self.length


# ---------------------------------------------------------------------------------------------- symbols and text
def alphabet(spec: FamilySpec) -> list[str]:
    """The symbols as text: letters, or pseudo-words of 2-3 syllables (seeded by the spec)."""
    if spec.tokenizer == "char":
        return [chr(ord("a") + i) for i in range(spec.symbols)]
    rng = np.random.default_rng(1000 + spec.seed)
    words: list[str] = []
    while len(words) < spec.symbols:
        word = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
        if word not in words:
            words.append(word)
    return words


def prompt_texts(spec: FamilySpec) -> list[str]:
    return [""] if spec.prompts == 1 else [f"<p{j}>" for j in range(spec.prompts)]


def to_text(spec: FamilySpec, symbols_row: Sequence[int], words: Sequence[str]) -> str:
    return ("" if spec.tokenizer == "char" else " ").join(words[i] for i in symbols_row)


def parse(spec: FamilySpec, text: str, index: dict) -> tuple[int, ...] | None:
    """The symbol indices of a well-formed output, else None (anything off-format fails)."""
    if not isinstance(text, str):
        return None
    parts = list(text) if spec.tokenizer == "char" else text.split(" ")
    if len(parts) != spec.length or any(p not in index for p in parts):
        return None
    return tuple(index[p] for p in parts)


# ---------------------------------------------------------------------------------------------- the source chains
def chains(spec: FamilySpec, rare_weight: float | None = None) -> np.ndarray:
    """Per prompt, a bigram chain: rows `[start] + symbols`, columns symbols; prompt j's rare symbol is `j % symbols`,
    its column scaled by `rare_weight` (default: the spec's, or the calibrated one)."""
    rng = np.random.default_rng(spec.seed)
    out = rng.dirichlet(np.full(spec.symbols, spec.concentration), size=(spec.prompts, spec.symbols + 1))
    weight = rare_weight if rare_weight is not None else chain_rare_weight(spec)[0]
    for j in range(spec.prompts):
        out[j, :, rare_symbol(spec, j)] *= weight
    return out / out.sum(-1, keepdims=True)


@functools.lru_cache(maxsize=64)
def chain_rare_weight(spec: FamilySpec) -> tuple[float, int | None]:
    """The rare symbol's weight, and the rule it was chosen for: the spec's weight if set; for count and mirror rules,
    per enumerable rule the weight that puts the *chain's* success probability at the spec's prior (bisection in
    log), keeping the rule whose weight is closest to 0.2 (the model learns the chain, so its prior lands near the
    target instead of a rule step of 100x away); else 0.2."""
    if spec.rare_weight is not None:
        return spec.rare_weight, None
    if spec.structure not in ("count", "mirror"):
        return 0.2, None
    best = None
    for k in [spec.rule] if spec.rule is not None else rule_values(spec):
        rows = [success_rows(spec, j, k) for j in range(spec.prompts)]
        if any(r is None or len(r) == 0 for r in rows):
            continue

        def prior(log_w):
            cs = chains(spec, math.exp(log_w))
            return float(np.mean([np.exp(chain_log_prob(c, r)).sum() for c, r in zip(cs, rows)]))
        lo, hi = math.log(1e-3), 0.0
        if not prior(lo) <= spec.prior <= prior(hi):
            continue
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if prior(mid) < spec.prior else (lo, mid)
        weight = math.exp((lo + hi) / 2)
        if best is None or abs(math.log(weight / 0.2)) < abs(math.log(best[0] / 0.2)):
            best = (weight, k)
    return best if best is not None else (0.2, None)


def rare_symbol(spec: FamilySpec, prompt: int) -> int:
    return prompt % spec.symbols


def sample_chain(chain: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((n, length), dtype=np.int64)
    state = np.zeros(n, dtype=np.int64)
    cum = chain.cumsum(1)
    for t in range(length):
        out[:, t] = (rng.random(n)[:, None] > cum[state]).sum(1).clip(max=chain.shape[1] - 1)
        state = out[:, t] + 1
    return out


def chain_log_prob(chain: np.ndarray, rows: np.ndarray) -> np.ndarray:
    logp = np.log(chain[0, rows[:, 0]])
    for t in range(1, rows.shape[1]):
        logp += np.log(chain[rows[:, t - 1] + 1, rows[:, t]])
    return logp


# ---------------------------------------------------------------------------------------------- success sets
def success_rows(spec: FamilySpec, prompt: int, k: int) -> np.ndarray | None:
    """Every success of prompt `prompt` under rule parameter `k`, as symbol-index rows; None when there would be more
    than MAX_SUCCESSES (too many to enumerate at every estimate)."""
    K, L = spec.symbols, spec.length
    if spec.structure == "count":
        if count_successes(spec, k) > MAX_SUCCESSES:
            return None
        rare, others = rare_symbol(spec, prompt), [s for s in range(K) if s != rare_symbol(spec, prompt)]
        rows = []
        for j in range(k, L + 1):
            for pos in itertools.combinations(range(L), j):
                for fill in itertools.product(others, repeat=L - j):
                    row, it = [rare] * L, iter(fill)
                    for i in range(L):
                        if i not in pos:
                            row[i] = next(it)
                    rows.append(row)
        return np.array(rows, dtype=np.int64).reshape(-1, L)
    if spec.structure == "mirror":
        half = (L + 1) // 2  # a palindrome is its first half mirrored
        rows = np.array(list(itertools.product(range(K), repeat=half)), dtype=np.int64).reshape(-1, half)
        out = np.concatenate([rows, rows[:, : L // 2][:, ::-1]], axis=1)
        out = out[(out == rare_symbol(spec, prompt)).sum(1) >= k]
        return out if len(out) <= MAX_SUCCESSES else None
    if spec.structure == "sum":
        if count_successes(spec, k) > MAX_SUCCESSES:
            return None
        rows = []

        def extend(prefix, remaining):
            left = L - len(prefix)
            if left == 0:
                if remaining == 0:
                    rows.append(list(prefix))
                return
            for s in range(K):
                if 0 <= remaining - s <= (left - 1) * (K - 1):
                    extend(prefix + [s], remaining - s)
        extend([], k)
        return np.array(rows, dtype=np.int64).reshape(-1, L)
    members = rare_set_candidates(spec, prompt)
    return members[:k] if k <= MAX_SUCCESSES else None


def count_successes(spec: FamilySpec, k: int) -> int:
    """The size of a prompt's success set under rule parameter `k`, counted without listing it."""
    K, L = spec.symbols, spec.length
    if spec.structure == "count":
        return sum(math.comb(L, j) * (K - 1) ** (L - j) for j in range(k, L + 1))
    if spec.structure == "mirror":  # palindromes (same for every prompt's rare symbol) with >= k rare symbols
        half, rare_at = (L + 1) // 2, [2] * (L // 2) + [1] * (L % 2)  # a half position counts once or twice
        ways = {0: 1}
        for weight in rare_at:
            new = {}
            for c, w in ways.items():
                new[c + weight] = new.get(c + weight, 0) + w
                new[c] = new.get(c, 0) + w * (K - 1)
            ways = new
        assert sum(ways.values()) == K ** half
        return sum(w for c, w in ways.items() if c >= k)
    if spec.structure == "sum":
        ways = np.zeros(L * (K - 1) + 1, dtype=object)
        ways[0] = 1
        for _ in range(L):
            new = np.zeros_like(ways)
            for s in range(K):
                new[s:] += ways[: len(ways) - s]
            ways = new
        return int(ways[k]) if 0 <= k < len(ways) else 0
    return k


def rule_values(spec: FamilySpec) -> list[int]:
    """The rule parameters calibration may choose from, from the rarest rule to the most common."""
    K, L = spec.symbols, spec.length
    if spec.structure == "count":
        return list(range(L, 0, -1))
    if spec.structure == "mirror":
        return list(range(L, -1, -1))
    if spec.structure == "sum":  # every enumerable sum, the smallest success sets first
        return sorted((k for k in range(L * (K - 1) + 1) if count_successes(spec, k) <= MAX_SUCCESSES),
                      key=lambda k: (count_successes(spec, k), k))
    return []  # rare_set: grown member by member (calibrate)


def rare_set_candidates(spec: FamilySpec, prompt: int, pool: int = 200_000, keep: float = 0.1) -> np.ndarray:
    """Distinct uniform draws over the well-formed outputs kept among the chain's least likely `keep` share, in a
    seeded order: the rare set is a prefix of them."""
    rng = np.random.default_rng(5000 + 100 * spec.seed + prompt)
    rows = np.unique(rng.integers(0, spec.symbols, size=(min(pool, 4 * spec.space), spec.length)), axis=0)
    logp = chain_log_prob(chains(spec)[prompt], rows)
    rows = rows[logp <= np.quantile(logp, keep)]
    return rows[rng.permutation(len(rows))]


# ---------------------------------------------------------------------------------------------- tokenizer and model
def build_tokenizer(spec: FamilySpec, words: Sequence[str]):
    """A tokenizer made locally: one token per character, or a byte-level BPE trained on the chain's outputs with
    `bpe_merges` merges over the 256 bytes. Prompts `<pj>` are special tokens; encoding prepends `<bos>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + (prompt_texts(spec) if spec.prompts > 1 else [])
    if spec.tokenizer == "char":
        vocab = {tok: i for i, tok in enumerate(specials + list(words))}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        alphabet_ = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=len(specials) + len(alphabet_) + spec.bpe_merges,
                                      special_tokens=specials, initial_alphabet=alphabet_, show_progress=False)
        rng = np.random.default_rng(spec.seed)
        corpus = [to_text(spec, row, words) for chain in chains(spec)
                  for row in sample_chain(chain, 2000, spec.length, rng)]
        backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_special_tokens(specials)  # matched whole, before pre-tokenisation
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="right", clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def max_completion_tokens(spec: FamilySpec, tok, words: Sequence[str]) -> int:
    """Tokens of the longest well-formed output's canonical tokenisation, `<eos>` excluded: each word takes its most
    tokens (with its leading space after the first)."""
    if spec.tokenizer == "char":
        return spec.length
    first = max(len(tok(w, add_special_tokens=False).input_ids) for w in words)
    later = max(len(tok(" " + w, add_special_tokens=False).input_ids) for w in words)
    return first + (spec.length - 1) * later


def make_generator(spec: FamilySpec, tok, max_positions: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers, num_attention_heads=max(2, spec.hidden // 64),
        num_key_value_heads=max(2, spec.hidden // 64), max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(config)


def encode(tok, prompt: str, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows `prompt ids + canonical completion ids + <eos>`, right-padded; the mask covers completion and `<eos>`.
    Returns (ids, completion mask, prompt length)."""
    prompt_ids = tok(prompt).input_ids
    seqs = [prompt_ids + ids + [tok.eos_token_id] for ids in tok(list(texts), add_special_tokens=False).input_ids]
    ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, len(prompt_ids) : len(seq)] = 1
    return ids, mask, len(prompt_ids)


@torch.no_grad()
def completion_log_probs(model, tok, prompt: str, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
    """log P(canonical tokens of each text, then `<eos>` | prompt) under `model`."""
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask, _ = encode(tok, prompt, texts[start : start + batch_size])
        attention = (ids != tok.pad_token_id).long() | (torch.arange(ids.shape[1]) == 0).long()
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(-1)
        out.append((logp * mask[:, 1:]).sum(1))
    return torch.cat(out) if out else torch.zeros(0)


def pretrain(spec: FamilySpec, tok, words: Sequence[str], max_positions: int, rare_weight: float) -> tuple:
    """Maximum likelihood on the chains' outputs (prompts drawn uniformly); AdamW, cosine-decayed. Returns
    (model, mean loss of the last 50 steps)."""
    model = make_generator(spec, tok, max_positions)
    lr = 3e-3 if spec.hidden <= 64 else 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(spec.seed)
    cs, prompts = chains(spec, rare_weight), prompt_texts(spec)
    losses = []
    model.train()
    for step in range(spec.pretrain_steps):
        which = rng.integers(0, spec.prompts, size=256)
        batch_ids, batch_labels = [], []
        for j in range(spec.prompts):
            n = int((which == j).sum())
            if n == 0:
                continue
            texts = [to_text(spec, row, words) for row in sample_chain(cs[j], n, spec.length, rng)]
            ids, mask, _ = encode(tok, prompts[j], texts)
            batch_ids.append(ids)
            batch_labels.append(torch.where(mask.bool(), ids, torch.full_like(ids, -100)))
        width = max(i.shape[1] for i in batch_ids)
        ids = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1]), value=tok.pad_token_id)
                         for i in batch_ids])
        labels = torch.cat([torch.nn.functional.pad(lab, (0, width - lab.shape[1]), value=-100)
                            for lab in batch_labels])
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / spec.pretrain_steps))
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model, float(np.mean(losses[-50:]))


# ---------------------------------------------------------------------------------------------- the task
class FamilyOracle:
    """TRL-style reward function: 1.0 for a well-formed output of the prompt's success set, else 0.0."""

    def __init__(self, spec: FamilySpec, words: Sequence[str], k: int):
        self.spec, self.words, self.k = spec, list(words), k
        self.index = {w: i for i, w in enumerate(self.words)}
        self.prompt_index = {p: j for j, p in enumerate(prompt_texts(spec))}
        self.sets = [set(map(tuple, success_rows(spec, j, k).tolist())) if spec.structure == "rare_set" else None
                     for j in range(spec.prompts)]
        self.__name__ = f"family_{spec.name}"

    def is_success(self, prompt: str, completion: str) -> bool:
        row = parse(self.spec, completion, self.index)
        j = self.prompt_index.get(prompt)
        if row is None or j is None:
            return False
        spec, k = self.spec, self.k
        if spec.structure == "count":
            return row.count(rare_symbol(spec, j)) >= k
        if spec.structure == "mirror":
            return row == row[::-1] and row.count(rare_symbol(spec, j)) >= k
        if spec.structure == "sum":
            return sum(row) == k
        return row in self.sets[j]

    def __call__(self, prompts=None, completions: Sequence[str] = (), **kwargs) -> list[float]:
        prompts = prompts if prompts is not None else [""] * len(completions)
        return [1.0 if self.is_success(p, c) else 0.0 for p, c in zip(prompts, completions)]


def malformed_shares(spec: FamilySpec, words: Sequence[str], completions: Sequence[str], every: int) -> list[float]:
    """The share of `completions` (in the order they were evaluated) that are not well-formed outputs, per `every` of
    them: where a search that only sees failures spends its evaluations (a malformed output fails every rule)."""
    index = {w: i for i, w in enumerate(words)}
    return [sum(parse(spec, c, index) is None for c in completions[i:i + every]) / len(completions[i:i + every])
            for i in range(0, len(completions), every)]


@dataclass
class FamilyTask:
    """A built task: its generator (pretrained, fresh from the cache at each `load`), tokenizer, oracle, rule and
    calibration record."""

    spec: FamilySpec
    words: list[str]
    k: int
    calibration: dict
    path: Path

    def load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.path).eval()
        return model, AutoTokenizer.from_pretrained(self.path), FamilyOracle(self.spec, self.words, self.k)

    def success_texts(self) -> list[list[str]]:
        return [[to_text(self.spec, row, self.words) for row in success_rows(self.spec, j, self.k)]
                for j in range(self.spec.prompts)]

    def exact_success_probability(self, model, tok, texts: list[list[str]] | None = None) -> float:
        """Mean over the prompts of the model's probability of emitting a success (canonical tokenisations)."""
        texts = texts if texts is not None else self.success_texts()
        rates = [float(torch.logsumexp(completion_log_probs(model, tok, p, t), 0).exp())
                 for p, t in zip(prompt_texts(self.spec), texts)]
        return float(np.mean(rates))

    @property
    def prior(self) -> float:
        return self.calibration["exact_prior"]

    @property
    def max_completion_length(self) -> int:
        return self.calibration["max_completion_tokens"] + 1  # room for <eos>

    def blind(self) -> dict:
        """A uniform draw over the well-formed outputs (per prompt): successes / space."""
        successes = count_successes(self.spec, self.k)
        return {"rate": successes / self.spec.space, "low": successes / self.spec.space,
                "high": successes / self.spec.space, "exact": True, "space": self.spec.space,
                "successes": successes, "what": f"uniform over the {self.spec.space:,} well-formed outputs"}


def rule_prior(spec: FamilySpec, model, tok, words: Sequence[str], k: int) -> float:
    """The model's exact success probability under rule parameter `k` (mean over the prompts)."""
    return float(np.mean([torch.logsumexp(completion_log_probs(model, tok, p, [to_text(spec, x, words) for x in
                                                                           success_rows(spec, j, k)]), 0).exp()
                          for j, p in enumerate(prompt_texts(spec))]))


def calibrate(spec: FamilySpec, model, tok, words: Sequence[str]) -> tuple[int, float]:
    """The rule parameter whose exact pretrained success probability is closest to `spec.prior` in log, and that
    probability. Enumerable rules only; count and mirror rules are tried from the rarest up, stopping once past the
    target; every enumerable sum is tried."""
    prompts = prompt_texts(spec)
    target = math.log(spec.prior)
    best = None
    if spec.structure == "rare_set":
        # grow each prompt's set in the same order until the mean probability reaches the target
        logps = [completion_log_probs(model, tok, p, [to_text(spec, r, words) for r in
                                                      rare_set_candidates(spec, j)[:MAX_SUCCESSES]])
                 for j, p in enumerate(prompts)]
        n = min(len(lp) for lp in logps)
        cum = np.mean([np.cumsum(lp[:n].exp().numpy()) for lp in logps], axis=0)
        k = int(np.searchsorted(cum, spec.prior)) + 1
        k = min(k, n)
        return k, float(cum[k - 1])
    for k in rule_values(spec):
        rows = [success_rows(spec, j, k) for j in range(spec.prompts)]
        if any(r is None or len(r) == 0 for r in rows):
            if best is not None and any(r is None for r in rows):
                break
            continue
        rate = rule_prior(spec, model, tok, words, k)
        if rate <= 0:
            continue
        if best is None or abs(math.log(rate) - target) < abs(math.log(best[1]) - target):
            best = (k, rate)
        if rate > spec.prior and spec.structure != "sum":  # count and mirror rules only grow from here
            break
    if best is None:
        raise ValueError(f"task {spec.name}: no enumerable rule ({spec.structure}) has a non-zero prior")
    return best


def build(spec: FamilySpec, cache: Path | None = None, verbose: bool = False) -> FamilyTask:
    """The task of `spec`: loaded from the cache, else pretrained, calibrated and saved there."""
    path = Path(cache or CACHE) / f"{spec.name}-{spec.key()}"
    words = alphabet(spec)
    record = path / "family_task.json"
    if record.exists():
        calibration = json.loads(record.read_text())
        return FamilyTask(spec, words, calibration["k"], calibration, path)
    threads = torch.get_num_threads()
    # seeded and single-threaded, yet not the same weights on every machine: rebuilt elsewhere, eval_count_bpe's
    # prior came out 8.9e-6 against 9.3e-6 (float kernels differ by CPU); runs record the weights' hash
    torch.set_num_threads(1)
    try:
        start = time.time()
        tok = build_tokenizer(spec, words)
        longest = max_completion_tokens(spec, tok, words)
        weight, rule = chain_rare_weight(spec)
        model, loss = pretrain(spec, tok, words, longest + 4, weight)
        if rule is not None:
            # the model's tail is not the chain's: correct the weight once (its successes hold >= rule rare
            # symbols, so their probability moves about as weight ** rule) and pretrain again
            first = rule_prior(spec, model, tok, words, rule)
            if first > 0 and abs(math.log(first / spec.prior)) > math.log(3):
                weight = min(1.0, weight * (spec.prior / first) ** (1 / rule))
                model, loss = pretrain(spec, tok, words, longest + 4, weight)
        k, prior = calibrate(spec, model, tok, words)
    finally:
        torch.set_num_threads(threads)
    spaces = ("", " ") if spec.tokenizer == "bpe" else ("",)
    per_word = [len(tok(space + w, add_special_tokens=False).input_ids) for space in spaces for w in words]
    calibration = {
        "spec": dataclasses.asdict(spec), "rare_weight": weight, "chain_rule": rule, "k": k, "exact_prior": prior,
        "successes": count_successes(spec, k),
        "space": spec.space, "blind_rate": count_successes(spec, k) / spec.space,
        "max_completion_tokens": longest, "vocab_size": len(tok), "tokens_per_word": float(np.mean(per_word)),
        "parameters": sum(p.numel() for p in model.parameters()), "final_loss": loss,
        "weights": weights_hash(model), "minutes": (time.time() - start) / 60, "words": words,
    }
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: two builds of a spec do not mix
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "family_task.json").write_text(json.dumps(calibration, indent=1))
    try:
        os.replace(tmp, path)  # a whole task or none
    except OSError:  # another process finished the same (seeded, identical) build first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"[family] {spec.name}: k={k} prior {prior:.3g} blind {calibration['blind_rate']:.3g} "
              f"({calibration['minutes']:.1f} min)", flush=True)
    return FamilyTask(spec, words, k, calibration, path)


def as_benchmark_task(task: FamilyTask):
    """The task as `benchmarks.common.Task`: exact estimates of the generator (BaNEL's: the generator it trains)."""
    from benchmarks.common import Task
    from trl_banel.posterior import eval_mode
    from trl_banel.stats import ExactSuccess

    texts = task.success_texts()

    def estimate(model, tok, oracle, n=None, seed=None):
        return ExactSuccess(task.exact_success_probability(model, tok, texts))

    def estimate_banel(trainer, n=None):
        with eval_mode(trainer.accelerator.unwrap_model(trainer.model)) as generator:
            return ExactSuccess(task.exact_success_probability(generator, trainer.processing_class, texts))

    return Task(task.spec.name, task.load, estimate, estimate_banel, task.max_completion_length,
                {"max_completion_length": task.max_completion_length}, exact=True, eval_samples=0, curve_samples=0,
                blind=lambda oracle: task.blind(), prompts=tuple(prompt_texts(task.spec)))


def specs_from(entries: Sequence[dict]) -> list[FamilySpec]:
    return [FamilySpec(**{k: v for k, v in e.items() if k != "seeds"}) for e in entries]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="*", help="Tasks of benchmarks/preregistration.json to build (default all)")
    a = parser.parse_args()
    prereg = json.loads((ROOT / "benchmarks" / "preregistration.json").read_text())
    entries = [e for group in ("tuning", "evaluation") for e in prereg[group]]
    for spec in specs_from(entries):
        if a.names and spec.name not in a.names:
            continue
        t = build(spec, verbose=True)
        c = t.calibration
        print(f"{spec.name}: {c['parameters']:,} params, vocab {c['vocab_size']}, {c['max_completion_tokens']} "
              f"tokens max, k={t.k}, prior {c['exact_prior']:.3g}, successes {c['successes']:,} of {c['space']:,} "
              f"(blind {c['blind_rate']:.3g})", flush=True)
