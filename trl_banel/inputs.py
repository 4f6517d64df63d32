"""What a user passes to `BaNELTrainer`, loaded and checked before any work: errors that name the argument to fix."""

import logging

from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from trl.data_utils import is_conversational

from .adapters import no_checkpointing_deprecation
from .config import BaNELConfig

logger = logging.getLogger(__name__)


def identity(rows):
    """The data collator: the rounds draw their own prompts, so the Trainer's batches are not used."""
    return rows


def resolve_args(model, args: BaNELConfig | None) -> BaNELConfig:
    """`args`, or the default `BaNELConfig(f"{model_name}-BaNEL")`."""
    if args is None:
        name = model if isinstance(model, str) else model.config.name_or_path
        args = BaNELConfig(f"{name.split('/')[-1]}-BaNEL")
    if not isinstance(args, BaNELConfig):
        raise TypeError(f"args must be a BaNELConfig, got {type(args).__name__}.")
    return args


def load_model(model, peft_config=None):
    """The generator: loaded from a Hub id or path, wrapped in a LoRA adapter with `peft_config`."""
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model)
    if not isinstance(model, (PreTrainedModel, PeftModel)):
        raise TypeError("model must be a Hub id or path, a PreTrainedModel or a PeftModel; got "
                        f"{type(model).__name__}.")
    if peft_config is not None:
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel: pass peft_config=None or the base model.")
        with no_checkpointing_deprecation():
            model = get_peft_model(model, peft_config)
    return model


def prepare_tokenizer(processing_class, model):
    """The tokenizer (loaded from the model's path when omitted), with a pad token and an EOS token."""
    if processing_class is None:
        processing_class = load_tokenizer(model)
    if processing_class.pad_token is None:
        if processing_class.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
        logger.warning("The tokenizer has no pad token; using its EOS token %r for padding.",
                       processing_class.eos_token)
        processing_class.pad_token = processing_class.eos_token
    if processing_class.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: completions could never end. Set tokenizer.eos_token.")
    return processing_class


def load_tokenizer(model):
    """The tokenizer saved with `model`, or an error that says to pass `processing_class`."""
    path = getattr(model.config, "name_or_path", "") or ""
    if not path:
        raise ValueError(f"processing_class is required: the {type(model).__name__} was passed as an object with no "
                         "path to load a tokenizer from. Pass processing_class=tokenizer to BaNELTrainer.")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, ImportError (sentencepiece, tiktoken, ...): all mean the same here
        reason = " ".join(str(e).split())  # library messages span lines
        raise ValueError(f"No tokenizer could be loaded from {path!r}, the model's path ({type(e).__name__}: "
                         f"{reason}). Pass processing_class=tokenizer to BaNELTrainer.") from e


def check_dataset(dataset, tokenizer=None):
    """A `datasets.Dataset` with a `prompt` column and at least one row; conversational prompts need a tokenizer
    with a chat template (checked on the first row: TRL's datasets are either conversational or not)."""
    if dataset is None:
        raise ValueError("train_dataset is required: a datasets.Dataset with a 'prompt' column.")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"train_dataset has no 'prompt' column (columns: {dataset.column_names}); BaNEL needs prompts, "
            "for unconditional generation a single row with an empty prompt.")
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty; give at least one prompt.")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) is None \
            and is_conversational({"prompt": dataset[0]["prompt"]}):
        raise ValueError(
            f"train_dataset's prompts are conversational (lists of {{'role', 'content'}} messages) but the tokenizer "
            f"{type(tokenizer).__name__} has no chat template to render them. Set `tokenizer.chat_template` (a base "
            "model's tokenizer often has none: copy the template of its instruction-tuned sibling, or write a plain "
            "one such as \"{% for m in messages %}{{ m['content'] }}\\n\\n{% endfor %}\"), or give the prompts "
            "as plain text.")
