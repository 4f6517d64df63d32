"""Tiny models and tokenizers built locally: the tests never touch the Hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting over a shared machine
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789+= "


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer; encoding prepends <bos>, so the empty prompt is [bos]."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_model(tokenizer, hidden=32, layers=2, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pretrain_on_strings(model, tokenizer, strings, weights, steps=300, lr=3e-3, batch=64, seed=0):
    """Teach the model to emit `strings` (then EOS) from an empty prompt with the given probabilities."""
    g = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(s)["input_ids"] + [tokenizer.eos_token_id] for s in strings]
    width = max(map(len, encoded))
    ids = torch.full((len(strings), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    probs = torch.tensor(weights, dtype=torch.float)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.multinomial(probs, batch, replacement=True, generator=g)
        labels = ids[idx].masked_fill(mask[idx] == 0, -100)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def string_log_prob(model, tokenizer, s) -> float:
    """Exact log-probability that the model, from the empty prompt, emits `s` then EOS."""
    ids = torch.tensor([tokenizer(s)["input_ids"] + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return logits.gather(1, ids[0, 1:].unsqueeze(1)).sum().item()


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


SKEWED = ["cat", "dog", "bird", "zebra"]
SKEWED_WEIGHTS = [0.70, 0.20, 0.09, 0.01]


def quick_skewed_generator():
    """`(tokenizer, model)` of the subprocess scripts (tests/scripts): the skewed strings, pretrained briefly (60
    steps) so that a launched process starts in seconds."""
    tok = make_char_tokenizer()
    model = make_tiny_model(tok)
    pretrain_on_strings(model, tok, SKEWED, SKEWED_WEIGHTS, steps=60, lr=1e-2)
    return tok, model


@pytest.fixture(scope="session")
def skewed_model_state(char_tokenizer):
    """State dict of a tiny model pretrained to emit cat/dog/bird/zebra with probabilities 70/20/9/1 %."""
    model = make_tiny_model(char_tokenizer)
    pretrain_on_strings(model, char_tokenizer, SKEWED, SKEWED_WEIGHTS)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def skewed_model(char_tokenizer, skewed_model_state):
    model = make_tiny_model(char_tokenizer)
    model.load_state_dict(skewed_model_state)
    return model


def unlisted_in_readme_file_table(folder) -> list[str]:
    """Files in a run's `folder` that the README's "What a run writes" table does not name."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## What a run writes") :]
    table = table[: table.index("\n\n", table.index("| file |"))]
    # a folder is named with its slash (`best_generator/`)
    return [f.name for f in Path(folder).iterdir()
            if f"`{f.name}`" not in table and not (f.is_dir() and f"`{f.name}/`" in table)]
