"""Every peft and DeepSpeed internal the failure models rely on, in one place.

The failure models (`trl_banel.failure`) store each model as a LoRA adapter injected into the generator, route batches
to adapters, copy and save adapter weights, and score with merged weights built on the fly. Those operations reach
below peft's public API (LoRA layer attributes, `enable/disable_adapter_layers`, `unload`, state-dict key names) and
into DeepSpeed's parameter attributes (`ds_id`). They live here, and only here, so that a peft or transformers release
that moves them breaks one module; the versions they are tested with are pinned in `pyproject.toml` and checked by
`tests/test_versions.py`.
"""

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer, LoraModel

SCORING_CHOICES = ("auto", "merged", "peft")


def new_lora_config(r: int, alpha: int, target_modules, policy=None) -> LoraConfig:
    """The failure adapters' config on a plain generator (no dropout: a failure model is a deterministic density).
    GPT-2-style generators store their projections as transposed `Conv1D` weights: `fan_in_fan_out` says so (peft
    would otherwise warn and set it itself)."""
    from transformers.pytorch_utils import Conv1D

    transposed = policy is not None and any(isinstance(m, Conv1D) for m in policy.modules())
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0,
                      fan_in_fan_out=transposed)


def generator_lora_config(policy: PeftModel) -> tuple[str, LoraConfig]:
    """A LoRA generator's active adapter and a trainable copy of its config (failure adapters start as copies of it).

    Raises a `ValueError` for a PEFT model of another kind (prompt tuning, IA3, ...): its adapters cannot be copied."""
    if not isinstance(policy.base_model, LoraModel):
        raise ValueError(
            f"failure_model='adapter' needs a plain or LoRA generator; got a {type(policy.base_model).__name__} PEFT "
            "model. Use failure_model='copy'."
        )
    name = policy.active_adapter
    config = copy.deepcopy(policy.peft_config[name])
    config.inference_mode = False
    return name, config


@contextlib.contextmanager
def no_checkpointing_deprecation():
    """Silence the FutureWarning transformers 5.23 gives when `is_gradient_checkpointing` is read: peft's `PeftModel`
    and TRL's `unwrap_model_for_generation` read it on every run, and nothing in this package or its users' code can
    change that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def inject(policy, config: LoraConfig, name: str) -> PeftModel:
    """Wrap a plain generator in a `PeftModel` holding adapter `name`, disabled.

    peft injects LoRA layers in place: the generator object and its parameters stay the same objects (the Trainer's
    optimizer keeps working), and peft can route mixed-adapter batches."""
    with no_checkpointing_deprecation():
        peft_model = PeftModel(policy, config, name)
    set_adapter_layers(peft_model, enabled=False)
    return peft_model


def set_adapter_layers(peft_model: PeftModel, enabled: bool) -> None:
    """Switch every adapter layer on or off (off: the model computes the bare generator)."""
    if enabled:
        peft_model.base_model.enable_adapter_layers()
    else:
        peft_model.base_model.disable_adapter_layers()


def unload(peft_model: PeftModel) -> None:
    """Swap the injected LoRA layers back for the original modules (the generator as it was given)."""
    peft_model.base_model.unload()


def lora_layers(model) -> list:
    """The LoRA layers inside `model`."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def copy_adapter_weights(model, source: str, target: str) -> None:
    """Make adapter `target` an exact copy of adapter `source` in every LoRA layer that holds both."""
    for layer in lora_layers(model):
        if target in layer.lora_A:
            layer.lora_A[target].weight.data.copy_(layer.lora_A[source].weight.data)
            layer.lora_B[target].weight.data.copy_(layer.lora_B[source].weight.data)


# -- state dicts ---------------------------------------------------------------------------------------------------
def without_adapters(state: dict) -> dict:
    """A generator's state dict with the injected adapters removed and the base layers under their original names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def adapter_state(state: dict, name: str) -> dict:
    """The weights of adapter `name` in a model's state dict."""
    return {k: v for k, v in state.items() if f".{name}." in k}


def renamed_adapter_state(state: dict, name: str) -> tuple[str, dict]:
    """An adapter's saved weights (from `adapter_state`) under adapter name `name`; also returns the saved name."""
    if not state:
        return name, {}
    saved = next(iter(state)).split(".lora_")[1].split(".")[1]  # "...lora_A.<name>.weight"
    return saved, {k.replace(f".{saved}.", f".{name}."): v for k, v in state.items()}


# -- scoring with merged weights -----------------------------------------------------------------------------------
def is_zero3_sharded(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions this parameter (its local tensor is then an empty shard)."""
    return hasattr(param, "ds_id")


def mergeable(layers: list) -> bool:
    """Whether every LoRA layer is a plain linear LoRA whose merged weight `W + s * B @ A` can be built on the fly.

    Not for: DoRA and other LoRA variants, transposed (`fan_in_fan_out`) or biased LoRA, ZeRO-3 sharded weights, and
    half-precision weights (a small `B @ A` added to a bf16 `W` would be rounded away)."""
    for m in layers:
        base = m.get_base_layer()
        if (not isinstance(m, LoraLinear) or m.fan_in_fan_out or any(m.lora_variant.values())
                or any(getattr(m, "lora_bias", {}).values()) or is_zero3_sharded(base.weight)
                or not isinstance(base, torch.nn.Linear) or base.weight.dtype != torch.float32):
            return False
    return True


@contextlib.contextmanager
def merged(layers: list, name: str | None):
    """
    Inside, the model computes adapter `name`: each LoRA layer holding it runs one linear with `W + scale * B @ A`,
    built per call and freed after (no weight is modified, no copy is kept). `None` is the plain generator: adapter
    layers stay as they are (disabled).
    """
    patched = []
    for m in layers if name is not None else []:
        if name not in m.lora_A:
            continue
        base = m.get_base_layer()
        lora_a, lora_b, scale = m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name]

        def forward(x, *args, _base=base, _a=lora_a, _b=lora_b, _s=scale, **kwargs):
            return F.linear(x, torch.addmm(_base.weight, _b.to(x.dtype), _a.to(x.dtype), alpha=_s), _base.bias)

        m.forward = forward  # an instance attribute shadows the class's forward until deleted
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# -- DeepSpeed -----------------------------------------------------------------------------------------------------
def gathered_copy(policy, device):
    """A full, unsharded copy of a ZeRO-3 generator (a deepcopy would copy the empty shards)."""
    import deepspeed

    if isinstance(policy, PeftModel):
        raise ValueError("failure_model='copy' with a LoRA generator under ZeRO-3 is not supported; use "
                         "failure_model='adapter' (the default), which needs no copy at all.")
    with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    model = type(policy)(policy.config)
    model.load_state_dict(state)
    return model.to(device)
