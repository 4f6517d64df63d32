"""Builds a GSM-style task for a CPU: synthetic word problems, a small Qwen2 that solves the easy ones, a hard set.

    python recipes/gsm_synthetic.py                  # build the model once (cached), pick the hard set, measure
    python recipes/gsm_synthetic.py --model_only     # build (or find) the model; print its folder
    python recipes/gsm_synthetic.py --reduced true --cache_dir /tmp/gsm --data_dir /tmp/gsm --results "" \\
        --screen_samples 0 --measure false           # the tests' tiny model, in seconds

Problems come from templates (names, objects; +, -, * steps applied to a running amount) with integer answers. The
easy distribution has 1-2 steps, numbers up to 20 and amounts up to 50; hard questions have 3-4 steps on numbers
from 10 to 60 (amounts up to 300). The model is a Qwen2ForCausalLM of a few million parameters with a byte-level BPE
tokenizer trained here by `tokenizers` (Qwen2's pre-tokenizer: words, single digits; 4,096 tokens) and a ChatML chat
template. It is pretrained on recipes/gsm8k_hard.py's own prompts (its system prompt and instruction, through the
chat template) with completions its answer checker accepts: one equation per step, then "The answer is
\\boxed{N}." Pretraining sees the easy distribution and a little hard-style text, each half of what makes a hard
question hard and never both: long problems with easy numbers, short problems with two-digit numbers.

`ensure_model()` builds the model on first use into `~/.cache/trl_banel/gsm_synthetic/<config hash>` ($TRL_BANEL_CACHE
or --cache_dir changes the root), with a message and a progress bar, within --max_minutes of CPU time, and reuses it
afterwards. The hard set is the first hard-distribution questions within the model's reach (its canonical solution at
least 10^--min_canonical_log10 likely) that it never solved in --screen_samples samples; the measurement then samples
each afresh as BaNEL does (the recipe's prompt and chat template, temperature 1, no top-k), scores with
recipes/gsm8k_hard.py's reward, and writes benchmarks/results/gsm_synthetic/prior.json and .md. Then:

    python recipes/gsm8k_hard.py --model_name_or_path $(python recipes/gsm_synthetic.py --model_only) \\
        --dataset_name recipes/data/gsm_synthetic_hard.jsonl \\
        --question_ids 0 --use_cpu true --bf16 false --max_completion_length 96 --max_reward_evaluations 200
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import torch  # noqa: E402

from trl_banel.stats import clopper_pearson  # noqa: E402
from trl_banel_examples.cli import parse_script_args, results_field, write_results  # noqa: E402
from trl_banel_examples.tasks.common import weights_hash  # noqa: E402

logger = logging.getLogger("trl_banel.gsm_synthetic")

DATA_DIR = ROOT / "recipes" / "data"
HARD_FILE, EASY_FILE = "gsm_synthetic_hard.jsonl", "gsm_synthetic_easy.jsonl"


def load_gsm8k_recipe():
    """recipes/gsm8k_hard.py as a module: its prompt, chat-template use and reward define what the model must emit."""
    module = sys.modules.get("gsm8k_hard_recipe")
    if module is None:
        spec = importlib.util.spec_from_file_location("gsm8k_hard_recipe", ROOT / "recipes" / "gsm8k_hard.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["gsm8k_hard_recipe"] = module
    return module


# ---------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------
NAMES = [(n, "she") for n in """
    Mia Emma Olivia Ava Sophia Isabella Amelia Harper Evelyn Abigail Emily Ella Grace Chloe Lily Zoe Nora Hannah
    Layla Aria Ruby Alice Clara Lucy Maya Leah Sara Julia Anna Rosa Ines Fatima Aisha Mei Yuki Priya Nadia Elena
    Greta Hazel Ivy Jade Kira Luna Nina Paula Rita Tara Vera Wendy Agnes Bella Carmen Daisy Eliza Freya Gemma Helen
    Irene Joy Karen Laura Molly Naomi Olga Pia Quinn Rachel Sofia Tessa Uma Violet Willa Xena Yara Zara Alma Beatriz
    Celia Dora Esther Flora Gloria Hilda Iris Jana Keiko Lena Marta Nell Opal Petra Rhea Selma Thea Ursula Vanessa
    Amara Bianca Cora Delia Edith Fiona Gina Hope Ingrid Julie Kate Lola Miriam Nicole Ophelia Penny Ramona Stella
    Tina Valerie Yasmin Zelda Adele Brenda Cecilia Diana Elsa Farah Gwen Heidi Imani Jasmine Kimberly Lucia Mabel
    """.split()] + [(n, "he") for n in """
    Liam Noah Oliver James Elijah William Henry Lucas Benjamin Theo Jack Leo Owen Samuel Daniel Mateo David Joseph
    Carlos Omar Ravi Kenji Ahmed Ivan Pedro Tom Ben Sam Max Alex Hugo Felix Oscar Victor Simon Paul Marco Diego
    Ethan Aaron Bruno Colin Dylan Emil Frank Gavin Igor Jonas Karl Luis Adam Boris Caleb Dennis Edgar Finn George
    Harold Isaac Jasper Kevin Lorenzo Martin Nathan Otto Patrick Quentin Rafael Stefan Tobias Umar Vincent Walter
    Xavier Yusuf Zachary Albert Bernard Cedric Dominic Elliot Fabian Gregory Hector Ian Julian Kurt Leonard Milo
    Nestor Orlando Peter Roland Sebastian Timothy Ulrich Vernon Wesley Yosef Arthur Bradley Cyrus Derek Eugene
    Fernando Gilbert Howard Jerome Kofi Lionel Mohammed Nikolai Oswald Pablo Rupert Santiago Trevor Wilbur Amir
    """.split()]
OBJECTS = """
    apples oranges pears plums lemons peaches cherries grapes carrots potatoes cookies cupcakes muffins candies pies
    eggs marbles stickers stamps coins cards buttons beads shells rocks feathers balloons crayons pencils pens
    markers erasers notebooks books comics magazines toys dolls blocks puzzles kites balls flowers roses tulips seeds
    plants ribbons socks hats shirts boxes cans bottles cups plates spoons candles tickets photos bananas mangoes
    melons lollipops donuts pretzels bagels sandwiches tomatoes onions peppers cucumbers pumpkins acorns pinecones
    leaves sticks nails screws bolts tiles bricks planks ropes buckets brushes paintbrushes postcards envelopes
    letters posters maps globes jigsaws robots trucks trains planes boats rings bracelets necklaces earrings scarves
    gloves mittens boots sandals umbrellas pillows blankets towels napkins forks knives bowls mugs jars lanterns
    batteries magnets whistles trophies medals badges pebbles crystals fossils seashells snails goldfish chicks
    ducklings kittens puppies bunnies hamsters parrots""".split()
COLORS = "red blue green yellow purple orange pink white black brown golden silver striped spotted tiny big".split()
# Surnames built from syllables by a fixed stream: thousands of rare words, read in pieces as real tokenizers read
# rare names; they widen the tokenizer's vocabulary to a few thousand tokens without adding arithmetic.
_SYLLABLES = """ka lo ren mi sa to vel an dor ri ne bas ul fen go hal ir jor ke lan mor na os pe quin ras sel
    tam ur vin wa xi yo zel bro cha dra fli gru kle pra sto tri ber cor din eth far gil hom ist jun""".split()
_surnames = random.Random("surnames")
SURNAMES = sorted({"".join(_surnames.choice(_SYLLABLES) for _ in range(_surnames.randint(2, 3))).capitalize()
                   for _ in range(2500)})
PLACES = """market school park library bakery farm zoo museum beach garden fair station harbor mall cafe
    playground stadium theater circus camp""".split()
CONTAINERS = ["bags", "boxes", "baskets", "jars", "packs", "crates", "bowls", "trays", "buckets", "cartons"]
# {p}: she/he, {o}: her/him, {x}: the objects, {f}: a friend's name, {n}: the step's number
ADD = ["{P} buys {n} more {x}.", "{P} finds {n} more {x}.", "{f} gives {o} {n} {x}.", "{P} gets {n} {x} from {f}.",
       "Then {p} picks up {n} more {x}.", "{P} receives {n} {x} as a gift.", "Later {p} wins {n} {x}."]
SUB = ["{P} gives {n} {x} to {f}.", "{P} sells {n} of the {x}.", "{P} loses {n} {x}.", "Then {p} uses {n} {x}.",
       "{P} gives away {n} {x}.", "{f} takes {n} of the {x}.", "Later {p} trades away {n} {x}."]
MUL = ["Then the number of {x} {p} has becomes {n} times as large.", "After a trade, {p} has {n} times as many {x}.",
       "{P} collects more until {p} has {n} times as many {x} as before."]
START = ["{N} has {n} {x}.", "{N} starts with {n} {x}.", "At first {N} owns {n} {x}."]
GROUP = ["{N} has {a} {c} with {b} {x} in each.", "{N} buys {a} {c} of {x}. Each holds {b} {x}."]
SETTING = ["{N} goes to the {place}.", "{N} is at the {place} today.", "It is a busy day at the {place}."]
QUESTION = ["How many {x} does {N} have now?", "How many {x} does {N} have in the end?"]


@dataclass(frozen=True)
class Difficulty:
    """A distribution of problems: how many arithmetic steps and how large their numbers are."""

    min_steps: int
    max_steps: int
    start: tuple  # (low, high) of the first amount
    operand: tuple  # of each added or subtracted amount
    factor: tuple  # of each multiplier (and of a group start's group size)
    groups: tuple  # of the number of groups in a group start
    mul_odds: float = 0.25  # a step's weight for *, against 1 for + and 1 for - (1 step in 9 multiplies)
    group_weight: float = 0.25  # chance that the problem starts with groups (a product; counts as a step)
    max_value: int = 200  # no intermediate amount above this


EASY = Difficulty(1, 2, start=(2, 20), operand=(1, 20), factor=(2, 5), groups=(2, 9), max_value=50)
# A little hard-style text in pretraining, each half of what makes the hard set hard, never both at once: LONG has
# its number of steps with the easy numbers, BIG its numbers in one or two steps.
LONG = Difficulty(3, 6, start=(2, 20), operand=(1, 20), factor=(2, 5), groups=(2, 9), max_value=50)
BIG = Difficulty(1, 2, start=(20, 99), operand=(20, 99), factor=(2, 9), groups=(11, 30), max_value=999)
# The first hard distribution: 4-6 steps on two-digit numbers. Out of the model's reach: its canonical solutions
# have probabilities of 10^-13 to 10^-63 (the model miscopies two-digit operands), so no search of a few thousand
# evaluations can find one. Kept in the build's fingerprint (the model was built with it), not used for the hard set.
OUT_OF_REACH = Difficulty(4, 6, start=(20, 99), operand=(20, 99), factor=(2, 9), groups=(11, 30), max_value=999)
# The hard set's distribution: more steps and larger numbers than the easy set, each question then screened for
# being rare (no success in the screen) but reachable (see Args.min_canonical_log10).
HARD = Difficulty(3, 4, start=(10, 60), operand=(10, 60), factor=(2, 5), groups=(5, 15), max_value=300)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    solution: str  # the completion a correct model writes: one equation per step, then the boxed answer
    steps: int

    def row(self, index: int) -> dict:
        """A row of the question sets: the columns recipes/gsm8k_hard.py reads (`input`, `target`) and ours."""
        return {"input": self.question, "target": self.answer, "id": index, "steps": self.steps,
                "solution": self.solution}


def make_problem(rng: random.Random, d: Difficulty) -> Problem:
    name, pronoun = rng.choice(NAMES)
    friend = rng.choice([n for n, _ in NAMES if n != name])
    objects = rng.choice(OBJECTS)
    fill = {"N": name, "p": pronoun, "P": pronoun.capitalize(), "o": "her" if pronoun == "she" else "him",
            "x": objects, "f": friend}
    steps = rng.randint(d.min_steps, d.max_steps)
    sentences, lines, done = [], [], 0
    if rng.random() < 0.3:  # setting and colour words: no arithmetic in them, only a wider vocabulary to read past
        sentences.append(rng.choice(SETTING).format(place=rng.choice(PLACES), **fill))
    first = dict(fill, N=f"{name} {rng.choice(SURNAMES)}") if rng.random() < 0.5 else dict(fill)
    if rng.random() < 0.3:
        first["x"] = f"{rng.choice(COLORS)} {objects}"
    if rng.random() < d.group_weight:
        a, b = rng.randint(*d.groups), rng.randint(*d.factor)
        value = a * b
        container = rng.choice([c for c in CONTAINERS if c != objects])
        sentences.append(rng.choice(GROUP).format(a=a, b=b, c=container, **first))
        lines.append(f"{a}*{b}={value}.")  # compact, as GSM8K's own calculator annotations: fewer tokens to train
        done = 1
    else:
        value = rng.randint(*d.start)
        sentences.append(rng.choice(START).format(n=value, **first))
    while done < steps:
        factor = rng.randint(*d.factor)
        kind = rng.choices(["add", "sub", "mul"], [1.0, 1.0, d.mul_odds])[0]
        if kind == "mul" and value * factor > d.max_value:
            kind = "add"
        if kind == "sub" and value <= d.operand[0]:
            kind = "add"  # keep every amount positive
        if kind == "add":
            n = rng.randint(*d.operand)
            if value + n > d.max_value:
                kind, n = "sub", rng.randint(d.operand[0], min(d.operand[1], value - 1))
        elif kind == "sub":
            n = rng.randint(d.operand[0], min(d.operand[1], value - 1))
        else:
            n = factor
        new = {"add": value + n, "sub": value - n, "mul": value * n}[kind]
        template = rng.choice({"add": ADD, "sub": SUB, "mul": MUL}[kind])
        sentences.append(template.format(n=n, **fill))
        lines.append(f"{value}{dict(add='+', sub='-', mul='*')[kind]}{n}={new}.")
        value, done = new, done + 1
    sentences.append(rng.choice(QUESTION).format(**fill))
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return Problem(" ".join(sentences), value, "\n".join(lines), steps)


def problem_set(seed: int, difficulty: Difficulty, n: int, salt: str) -> list[Problem]:
    """`n` distinct problems; `salt` keeps the sets' streams apart from each other and from pretraining's."""
    rng = random.Random(f"{salt}-{seed}")
    seen, out = set(), []
    while len(out) < n:
        p = make_problem(rng, difficulty)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def write_jsonl(path: Path, problems: list[Problem]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row(i)) + "\n" for i, p in enumerate(problems)))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------------
# Qwen2's pre-tokenizer: words (with their leading space), single digits, punctuation runs, newlines.
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen2 writes it (without Qwen's default system prompt: the recipe gives its own).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class BuildConfig:
    """Everything the built model depends on; its hash names the cache folder."""

    seed: int = 0
    vocab_size: int = 4096
    tokenizer_problems: int = 20_000  # problems (EASY, LONG and BIG, a third each) the tokenizer is trained on
    hidden_size: int = 160
    num_layers: int = 4
    num_heads: int = 5
    num_kv_heads: int = 1
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    steps: int = 1650
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    long_fraction: float = 0.1  # of pretraining batches from LONG (hard-set steps, easy numbers)
    big_fraction: float = 0.05  # of pretraining batches from BIG (hard-set numbers, easy steps)

    def key(self) -> str:
        """The cache folder's name: a hash of these fields, of sample problems of every distribution and of the
        prompt, so that a change to the templates, the difficulties or recipes/gsm8k_hard.py's prompt makes a new
        folder instead of reusing a model trained on other text."""
        rng = random.Random("fingerprint")
        sample = [make_problem(rng, d) for d in (EASY, LONG, BIG, OUT_OF_REACH) for _ in range(25)]
        recipe = load_gsm8k_recipe()  # the model is trained on its prompt: a new prompt, a new model
        prompt = [recipe.SYSTEM_PROMPT, recipe.USER_TEMPLATE, CHAT_TEMPLATE, PRETOKENIZE]
        text = json.dumps([asdict(self), [asdict(p) for p in sample], prompt], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# A model the tests build in seconds: the same code path, nothing learned.
REDUCED = BuildConfig(vocab_size=384, tokenizer_problems=300, hidden_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, intermediate_size=64, steps=4, batch_size=4, warmup_steps=1)


def build_tokenizer(problems: list[Problem], vocab_size: int):
    """A byte-level BPE tokenizer trained on the problems' chat text, with ChatML specials and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    recipe = load_gsm8k_recipe()
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # the chat text without its special tokens (the trainer would split those into pieces); role names included
    texts = [f"system\n{recipe.SYSTEM_PROMPT}\nuser\n{recipe.USER_TEMPLATE.format(question=p.question)}\n"
             f"assistant\n{p.solution}" for p in problems]
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False, model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(config: BuildConfig, tokenizer):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(config.seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None))
    # plain sampling unless a caller asks otherwise (transformers' defaults would add top_k=50)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=True, top_k=0)
    return model


def prompt_text(tokenizer, question: str) -> str:
    """The prompt exactly as BaNEL renders it for recipes/gsm8k_hard.py (its messages, the chat template)."""
    return tokenizer.apply_chat_template(load_gsm8k_recipe().make_prompt(question), tokenize=False,
                                         add_generation_prompt=True)


def encode_example(tokenizer, problem: Problem) -> tuple[list[int], int]:
    """Token ids of prompt + solution + EOS, tokenised as the trainer does (prompt and completion apart), and where
    the completion starts."""
    prompt = tokenizer(prompt_text(tokenizer, problem.question), add_special_tokens=False)["input_ids"]
    completion = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + completion, len(prompt)


def shared_prefix(tokenizer) -> list[int]:
    """The prompt's tokens before the question: the same in every example (the system prompt and instruction)."""
    marker = "Zq"
    text = prompt_text(tokenizer, marker)
    return tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]


def pretrain(model, tokenizer, config: BuildConfig, max_minutes: float, progress: bool = True) -> dict:
    """AdamW on completion tokens (the prompt is context), warmup then cosine decay, for `config.steps` steps or
    until `max_minutes` of this process's CPU time (not wall time: other jobs on the machine do not shorten it).
    The prompt's fixed prefix (system prompt and instruction, about half of each example's tokens) is run once per
    step and shared by the batch, which roughly halves the cost."""
    from tqdm.auto import tqdm

    rng = random.Random(f"pretrain-{config.seed}")
    prefix = shared_prefix(tokenizer)
    prefix_ids = torch.tensor([prefix])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step):
        # by step only, never by time: a build that finishes within its budget is the same on every run
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    start_wall, start_cpu, losses, step = time.time(), time.process_time(), [], 0
    bar = tqdm(total=config.steps, desc="pretraining the GSM model", unit="step", disable=not progress,
               mininterval=2.0)
    for step in range(config.steps):
        if time.process_time() - start_cpu > 60 * max_minutes:
            logger.warning("Pretraining stopped at its budget of %.1f CPU minutes after %d of %d steps: the model is "
                           "less trained than the recipe's measurements assume.", max_minutes, step, config.steps)
            break
        u = rng.random()  # one kind of problem per batch: little padding
        kind = LONG if u < config.long_fraction else BIG if u < config.long_fraction + config.big_fraction else EASY
        problems = [make_problem(rng, kind) for _ in range(config.batch_size)]
        encoded = [encode_example(tokenizer, p) for p in problems]
        if any(ids[: len(prefix)] != prefix for ids, _ in encoded):
            raise RuntimeError("A prompt does not start with the shared prefix's tokens.")
        rest = [ids[len(prefix):] for ids, _ in encoded]
        width = max(map(len, rest))
        input_ids = torch.full((len(rest), width), tokenizer.pad_token_id)
        labels = torch.full((len(rest), width), -100)
        mask = torch.zeros((len(rest), len(prefix) + width), dtype=torch.long)
        mask[:, : len(prefix)] = 1
        for i, ((ids, completion_start), r) in enumerate(zip(encoded, rest)):
            input_ids[i, : len(r)] = torch.tensor(r)
            labels[i, completion_start - len(prefix): len(r)] = torch.tensor(ids[completion_start:])
            mask[i, len(prefix): len(prefix) + len(r)] = 1
        cache = model(input_ids=prefix_ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(rest))  # differentiable: the prefix is trained through every row
        hidden = model.model(input_ids=input_ids, attention_mask=mask, past_key_values=cache).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100  # the LM head only where a completion token is predicted
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits, targets[keep])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    else:
        step = config.steps
    bar.close()
    model.eval()
    tail = losses[-50:] or [float("nan")]
    return {"steps_done": step, "final_loss": sum(tail) / len(tail),
            "wall_minutes": (time.time() - start_wall) / 60, "cpu_minutes": (time.process_time() - start_cpu) / 60}


def default_cache_root() -> Path:
    return Path(os.environ.get("TRL_BANEL_CACHE", Path.home() / ".cache" / "trl_banel")) / "gsm_synthetic"


def ensure_model(config: BuildConfig = BuildConfig(), cache_dir: str | os.PathLike | None = None,
                 max_minutes: float = 15.0, progress: bool = True, threads: int = 1) -> Path:
    """The folder of the model built from `config` (save_pretrained: model, tokenizer, build.json): built on first
    use, with a message and a progress bar, then reused. A build writes to a temporary folder and renames it into
    place when complete, so an interrupted build is never taken for a finished one. Builds are deterministic on a
    given machine and torch version (one thread, seeded, step-based schedule); build.json records the weights' hash
    (another CPU's kernels can round differently)."""
    root = Path(cache_dir) if cache_dir else default_cache_root()
    folder = root / config.key()
    if (folder / "build.json").exists():
        logger.info("Using the cached GSM model %s", folder)
        return folder
    logger.warning("Building the synthetic GSM model into %s (once; pretraining takes up to %.0f minutes on a CPU, "
                   "later runs reuse it).", folder, max_minutes)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # tiny matrices: extra threads on a shared machine mostly wait on each other
    try:
        tokenizer_problems = [make_problem(rng, d) for rng in [random.Random(f"tokenizer-{config.seed}")]
                              for d in (EASY, LONG, BIG) for _ in range(config.tokenizer_problems // 3)]
        tokenizer = build_tokenizer(tokenizer_problems, config.vocab_size)
        model = build_model(config, tokenizer)
        stats = pretrain(model, tokenizer, config, max_minutes, progress)
    finally:
        torch.set_num_threads(previous_threads)
    info = {"config": asdict(config), "key": config.key(), "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "max_minutes": max_minutes, "threads": threads, **stats,
            "weights_sha256": weights_hash(model), "torch": torch.__version__}
    tmp = root / f".{config.key()}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same build first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "build.json").exists():
            raise
    logger.warning("Built the GSM model in %.1f CPU minutes (%d steps, final loss %.3f): %s", stats["cpu_minutes"],
                   stats["steps_done"], stats["final_loss"], folder)
    return folder


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Measurement: sampled as BaNEL samples, scored by recipes/gsm8k_hard.py's reward
# ---------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def sample_completions(model, tokenizer, question: str, n: int, max_new_tokens: int, batch_size: int = 500,
                       seed: int = 0) -> list[str]:
    """`n` completions of the recipe's prompt for `question`, with the arguments BaNEL's sampler passes to
    `generate` at its defaults (temperature 1, top_k 0, top_p 1), decoded without special tokens."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]
    texts = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        input_ids = torch.tensor([ids] * rows)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id])
        texts += tokenizer.batch_decode(out[:, len(ids):], skip_special_tokens=True)
    return texts


def score(question: str, completions: list[str], target) -> list[float]:
    """recipes/gsm8k_hard.py's reward, called as BaNEL calls it (conversational prompt and completions)."""
    recipe = load_gsm8k_recipe()
    prompt = recipe.make_prompt(question)
    return recipe.gsm_hard_reward([prompt] * len(completions),
                                  [[{"role": "assistant", "content": c}] for c in completions],
                                  [target] * len(completions))


@torch.inference_mode()
def solution_log_prob(model, tokenizer, problem: Problem) -> float:
    """Exact log-probability that the model writes the canonical solution (then EOS): a lower bound on the log of
    its success probability (other correct completions only add to it)."""
    ids, start = encode_example(tokenizer, problem)
    logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1: -1].float().log_softmax(-1)
    return logits.gather(1, torch.tensor(ids[start:]).unsqueeze(1)).sum().item()


def measure_question(model, tokenizer, problem: Problem, n: int, max_new_tokens: int, seed: int) -> dict:
    completions = sample_completions(model, tokenizer, problem.question, n, max_new_tokens, seed=seed)
    successes = int(sum(score(problem.question, completions, problem.answer)))
    low, high = clopper_pearson(successes, n)
    return {"samples": n, "successes": successes, "rate": successes / n, "ci95_low": low, "ci95_high": high,
            "canonical_solution_log10_prob": solution_log_prob(model, tokenizer, problem) / math.log(10),
            "example_completion": completions[0]}


# ---------------------------------------------------------------------------------------------------------------
# The screen's samples per draw: it stops at the first draw with a success.
SCREEN_CHUNK = 250


@dataclass
class Args:
    seed: int = 0
    cache_dir: str = dataclasses.field(default="", metadata={
        "help": "Root of the model cache (default $TRL_BANEL_CACHE/gsm_synthetic or ~/.cache/trl_banel/gsm_synthetic)"
                "; the model goes to a subfolder named by its build configuration's hash."})
    data_dir: str = dataclasses.field(default=str(DATA_DIR), metadata={
        "help": f"Folder {HARD_FILE} and {EASY_FILE} are written to (columns input, target, id, steps, solution)."})
    results: str = results_field(ROOT / "benchmarks/results/gsm_synthetic/prior",
                                 "Measurements: PATH.json and PATH.md (a table naming the command) are written")
    reduced: bool = False  # a tiny model built in seconds (tests): same code, nothing learned
    max_minutes: float = 15.0  # CPU-time budget of pretraining (it stops early, with a warning, when reached)
    threads: int = 1
    model_only: bool = False  # build (or find) the model, print its folder and stop: MODEL=$(python ... --model_only)
    hard_candidates: int = 300  # hard-distribution questions considered for the hard set, in order
    # per candidate; the hard set takes candidates with no success (0: no screening). 500 let through questions
    # measured afterwards at 8e-4 to 1.9e-3 (2 of 5 above 1e-3); a question at 1.5e-3 passes 2,000 with p = 0.05
    screen_samples: int = 2000
    # A candidate whose canonical solution is less likely than 10^this is out of reach and not screened: the
    # canonical solution's probability is a lower bound on the question's success probability.
    min_canonical_log10: float = -8.0
    hard_questions: int = 6
    measure: bool = True  # measure the model on the easy and hard sets (fresh samples) and write the results file
    hard_samples: int = 3700  # per hard question: 0 successes put the two-sided 95% upper bound at 9.97e-4
    easy_questions: int = 100
    easy_samples: int = 20  # per easy question
    max_completion_length: int = 96  # a six-step solution is about 70 tokens


def select_hard(model, tokenizer, candidates: list[Problem], args: Args) -> tuple[list[int], list]:
    """Indices of the candidates that form the hard set, and each candidate's screen (`{"samples", "successes"}`;
    None: out of reach, not screened): the first `hard_questions` candidates whose canonical solution is at least
    10^`min_canonical_log10` likely and that had no success in `screen_samples` samples. The screen draws
    `SCREEN_CHUNK` samples at a time and stops at a chunk with a success (most candidates are solved within the
    first). The measurement that is reported is made afterwards on fresh samples, so the screen's selection does
    not bias it."""
    screened, chosen = [], []
    for i, p in enumerate(candidates):
        if len(chosen) == args.hard_questions:
            break
        if model is not None and args.screen_samples:  # no screen (0 samples): the first candidates, as they come
            with torch.no_grad():
                log10 = solution_log_prob(model, tokenizer, p) / math.log(10)
            if log10 < args.min_canonical_log10:
                print(f"candidate {i}: canonical solution 10^{log10:.1f}, out of reach", flush=True)
                screened.append(None)
                continue
        drawn = hits = 0
        while drawn < args.screen_samples and not hits:
            n = min(SCREEN_CHUNK, args.screen_samples - drawn)
            completions = sample_completions(model, tokenizer, p.question, n, args.max_completion_length,
                                             seed=args.seed + 20_000 + 1_000 * i + drawn // SCREEN_CHUNK)
            hits += int(sum(score(p.question, completions, p.answer)))
            drawn += n
        if args.screen_samples:
            print(f"screen candidate {i}: {hits}/{drawn}", flush=True)
        screened.append({"samples": drawn, "successes": hits})
        if hits == 0:
            chosen.append(i)
    if len(chosen) < args.hard_questions:
        raise RuntimeError(f"Only {len(chosen)} of {len(candidates)} hard candidates were within reach and had no "
                           f"success in {args.screen_samples} samples; raise --hard_candidates.")
    return chosen, screened


def measure_easy(model, tokenizer, easy: list[Problem], args: Args) -> dict:
    successes = samples = 0
    for i, p in enumerate(easy):
        completions = sample_completions(model, tokenizer, p.question, args.easy_samples,
                                         args.max_completion_length, seed=args.seed + i)
        successes += int(sum(score(p.question, completions, p.answer)))
        samples += len(completions)
    low, high = clopper_pearson(successes, samples)
    return {"questions": len(easy), "samples_per_question": args.easy_samples, "samples": samples,
            "successes": successes, "rate": successes / samples, "ci95_low": low, "ci95_high": high}


def main(args: Args) -> dict:
    config = dataclasses.replace(REDUCED, seed=args.seed) if args.reduced else BuildConfig(seed=args.seed)
    folder = ensure_model(config, args.cache_dir or None, args.max_minutes, threads=args.threads)
    if args.model_only:
        print(folder)
        return {"model_dir": str(folder)}
    torch.set_num_threads(args.threads)
    model, tokenizer = load(folder)
    start, start_cpu = time.time(), time.process_time()
    candidates = problem_set(args.seed, HARD, args.hard_candidates, "hard")
    chosen, screened = select_hard(model, tokenizer, candidates, args)
    hard = [candidates[i] for i in chosen]
    easy = problem_set(args.seed, EASY, args.easy_questions, "easy")
    data = Path(args.data_dir)
    write_jsonl(data / HARD_FILE, hard)
    write_jsonl(data / EASY_FILE, easy)
    print(f"model: {folder}\nhard set: {data / HARD_FILE}\neasy set: {data / EASY_FILE}", flush=True)
    result = {"model_dir": str(folder), "build": json.loads((folder / "build.json").read_text()),
              "hard_set": {"candidates": len(screened), "screen_samples": args.screen_samples,
                           "min_canonical_log10": args.min_canonical_log10, "screen_successes": screened,
                           "chosen_candidates": chosen}}
    if not args.measure:
        return result

    easy_result = measure_easy(model, tokenizer, easy, args)
    print(f"easy set: {easy_result['successes']}/{easy_result['samples']} = {easy_result['rate']:.3f}", flush=True)
    hard_results = []
    for i, (candidate, p) in enumerate(zip(chosen, hard)):
        r = {"id": i, "candidate": candidate, "question": p.question, "target": p.answer, "steps": p.steps,
             **measure_question(model, tokenizer, p, args.hard_samples, args.max_completion_length,
                                seed=args.seed + 10_000 + i)}
        hard_results.append(r)
        print(f"hard {i}: {r['successes']}/{r['samples']}, 95% upper bound {r['ci95_high']:.2e}, canonical solution "
              f"10^{r['canonical_solution_log10_prob']:.1f}", flush=True)
    result.update({
        "sampling": "the recipe's prompt through the chat template; temperature 1, top_k 0, top_p 1; "
                    f"max_new_tokens {args.max_completion_length}; recipes/gsm8k_hard.py's gsm_hard_reward",
        "ci_method": "Clopper-Pearson, 95% (two-sided)",
        "easy": easy_result, "hard": hard_results,
        "hard_max_ci95_high": max(r["ci95_high"] for r in hard_results),
        "measure_minutes": (time.time() - start) / 60, "measure_cpu_minutes": (time.process_time() - start_cpu) / 60,
        "command": command_line(),
        "settings": asdict(args),
    })
    if args.results:
        write_results(result, f"{args.results}.json", indent=1)
        Path(f"{args.results}.md").write_text(markdown_table(result))
    return result


def command_line() -> str:
    """The command as typed, from the repository's root (a results file names what produced it)."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(sys.argv[0]).name
    return " ".join(["python", str(name), *sys.argv[1:]])


def markdown_table(result: dict) -> str:
    """The measurement as a page: the easy rate, then each hard question's prior with its interval."""
    build, easy = result["build"], result["easy"]
    lines = [
        "# Synthetic GSM task: the pretrained model's success rates (measured on a CPU)", "",
        f"Regenerate: `{result['command']}`", "",
        f"Model: Qwen2ForCausalLM, {build['parameters']:,} parameters, {build['vocab_size']:,}-token byte-level BPE, "
        f"pretrained {build['steps_done']} steps in {build['cpu_minutes']:.1f} CPU minutes (build {build['key']}, "
        f"torch {build['torch']}, {build['threads']} thread). Sampling: {result['sampling']}. Intervals: "
        f"{result['ci_method']}.", "",
        f"Easy set ({easy['questions']} questions of 1-2 steps, {easy['samples_per_question']} samples each): "
        f"**{easy['rate']:.1%}** [{easy['ci95_low']:.1%}, {easy['ci95_high']:.1%}], "
        f"{easy['successes']}/{easy['samples']} correct.", "",
        f"Hard set ({len(result['hard'])} questions of {HARD.min_steps}-{HARD.max_steps} steps on numbers from "
        f"{HARD.operand[0]} to {HARD.operand[1]}, chosen as the first of {result['hard_set']['candidates']} "
        f"candidates whose canonical solution is at least 10^{result['hard_set']['min_canonical_log10']:g} likely "
        f"and with no success in {result['hard_set']['screen_samples']} screening samples, then measured on fresh "
        "samples):", "",
        "| id | steps | target | successes / samples | rate | 95% interval | canonical solution's probability |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["hard"]:
        lines.append(f"| {r['id']} | {r['steps']} | {r['target']} | {r['successes']} / {r['samples']} | "
                     f"{r['rate']:.2e} | [{r['ci95_low']:.2e}, {r['ci95_high']:.2e}] | "
                     f"10^{r['canonical_solution_log10_prob']:.1f} |")
    lines += ["", f"Largest upper bound: {result['hard_max_ci95_high']:.2e}. Measurement time: "
              f"{result['measure_minutes']:.1f} minutes wall, {result['measure_cpu_minutes']:.1f} CPU minutes "
              f"({result['settings']['threads']} torch thread, a 2-core machine shared with other jobs).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_script_args(Args, __doc__))
