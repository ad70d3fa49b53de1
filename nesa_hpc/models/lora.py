"""LoRA adapters through peft: attach them to chosen layers, merge them, and load a peft adapter folder into
the layers a rank holds (``model.adapters`` of ``jobs/infer.py`` and ``jobs/audit.py``; written by
``jobs/train.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, ModelError
from .adapter import Adapter

if TYPE_CHECKING:
    from ..train.options import TrainSpec

__all__ = ["lora_targets", "lora_config", "add_lora", "peft_name", "base_name", "merge_lora", "apply_adapters",
           "check_adapter_use"]

def _linear_leaves(adapter: Adapter) -> dict[str, bool]:
    """Names of the linear modules of a layer (-> whether they are GPT-2 style ``Conv1D``), routers of a
    mixture of experts left out."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    layer = adapter.layers[0]
    found: dict[str, bool] = {}
    for name, module in layer.named_modules():
        if any(part == "base_layer" or part.startswith("lora_") for part in name.split(".")):
            continue  # inside a LoRA wrapper this rank has already injected: the wrapper stands for the module
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        parent = layer.get_submodule(name.rpartition(".")[0])
        if isinstance(base, (nn.Linear, Conv1D)) and not hasattr(parent, "experts"):
            found[name.rpartition(".")[2]] = isinstance(base, Conv1D)
    return found


def lora_targets(adapter: Adapter, spec: TrainSpec) -> tuple[str, ...]:
    """``train.lora.target_modules``, by default every linear module of a layer (attention and MLP
    projections; a mixture of experts' router excluded)."""
    if spec.lora_targets:
        return spec.lora_targets
    names = tuple(_linear_leaves(adapter))
    if not names:
        raise ConfigError(f"train.lora.target_modules must be set for {type(adapter.model).__name__}")
    return names


def lora_config(adapter: Adapter, spec: TrainSpec, layers: list[int] | None = None, base: str | None = None):
    from peft import LoraConfig

    targets = list(lora_targets(adapter, spec))
    conv1d = _linear_leaves(adapter)
    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=targets, fan_in_fan_out=any(conv1d.get(t, False) for t in targets),
                      layers_to_transform=layers, layers_pattern=adapter.layer_module(0).split(".")[-2] if layers
                      else None, base_model_name_or_path=base, task_type="CAUSAL_LM")


def add_lora(adapter: Adapter, layers, spec: TrainSpec) -> None:
    """LoRA adapters (peft) on every target module of ``layers``. Each layer's adapters are initialised from
    a generator seeded by (train.seed, layer), so a layer starts the same whichever rank holds it."""
    from peft import inject_adapter_in_model

    config = lora_config(adapter, spec)
    state = torch.random.get_rng_state()
    try:
        for i in layers:
            torch.manual_seed(1_000_003 * spec.seed + i)
            inject_adapter_in_model(config, adapter.layers[i])
    finally:
        torch.random.set_rng_state(state)
    found = [n for i in layers for n, _ in adapter.layers[i].named_parameters() if "lora_" in n]
    if layers and not found:
        raise ConfigError(f"train.lora.target_modules={list(lora_targets(adapter, spec))} matches no module of "
                          f"layer {layers[0]}")


def peft_name(name: str) -> str:
    return "base_model.model." + name.replace(".default", "")


def base_name(name: str) -> str:
    """The checkpoint name of a parameter inside a peft-wrapped module (``q_proj.base_layer.weight``)."""
    return name.replace(".base_layer.", ".")


def merge_lora(adapter: Adapter) -> None:
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in adapter.model.modules():
            if isinstance(module, LoraLayer) and not module.merged:
                module.merge()


def apply_adapters(adapter: Adapter, folder: str | Path, layers) -> tuple[set[str], set[str]]:
    """Load a peft LoRA adapter folder into ``layers`` of a partially loaded model and merge it into their
    weights (``model.adapters`` of ``jobs/infer.py``). Returns (the tensor names used, every name in the file)."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"model.adapters: {folder} has no adapter_config.json (a peft LoRA adapter folder)")
    config = LoraConfig.from_pretrained(str(folder))
    if config.peft_type.value != "LORA":
        raise ModelError(f"model.adapters: {folder} holds a {config.peft_type.value} adapter; only LoRA is supported")
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"model.adapters: {weights_file} is missing")
    weights = load_file(str(weights_file))
    config.layers_to_transform, config.layers_pattern, config.lora_dropout = None, None, 0.0
    used: set[str] = set()
    for i in layers:
        prefix = f"base_model.model.{adapter.layer_module(i)}."
        mine = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not mine:
            continue
        used |= {prefix + k for k in mine}
        module = adapter.layers[i]
        inject_adapter_in_model(config, module)
        state = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                 for k, v in mine.items()}
        expected = {n for n, _ in module.named_parameters() if "lora_" in n}
        if set(state) != expected:
            raise ModelError(f"model.adapters: {weights_file} does not match layer {i} of the model "
                             f"(expected {sorted(expected)[:2]} ..., found {sorted(state)[:2]} ...)")
        module.load_state_dict(state, strict=False)
        for p in module.parameters():
            p.requires_grad_(False)
    merge_lora(adapter)
    return used, set(weights)


def check_adapter_use(folder: str | Path, used: set[str], names: set[str]) -> None:
    """Refuse an adapter whose tensors not every one found a layer (e.g. adapters on the LM head)."""
    left = sorted(names - used)
    if left:
        raise ModelError(f"model.adapters: {folder} holds {len(left)} tensors for modules nesa_hpc does not adapt "
                         f"(only decoder layers): {left[:3]}{' ...' if len(left) > 3 else ''}")
