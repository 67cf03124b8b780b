"""LoRA on the student's stem through peft (the `lora` extra): injected for training, saved unmerged as an adapter,
merged before `save_pretrained`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..remote_code.modeling_sak import SAKForMultiTask


def apply_lora(model: SAKForMultiTask, lora: dict[str, Any]) -> SAKForMultiTask:
    """LoRA on the stem's attention and MLP projections through peft (the `lora` extra); the rest of the stem is
    frozen. Training and its checkpoints keep the LoRA layers; `merge_lora` folds them in before `save_pretrained`."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("recipe key 'lora' needs peft: pip install 'sak-hf[lora]'") from error
    unknown = sorted(set(lora) - {"r", "alpha", "dropout", "target_modules"})
    if unknown:
        raise ValueError(f"lora: unknown keys {unknown}; valid keys are r, alpha, dropout and target_modules")
    config = LoraConfig(
        target_modules=lora.get("target_modules", ["qkv", "proj", "fc1", "fc2"]),
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.0),
    )
    model.stem = inject_adapter_in_model(config, model.stem)
    return model


def save_lora_adapter(model: SAKForMultiTask, directory: str | Path) -> Path | None:
    """The stem's LoRA adapter, unmerged, in peft's format (`adapter_config.json` + `adapter_model.safetensors`, keys
    relative to the stem); None, writing nothing, when the model has no LoRA. Call it before `merge_lora`.

    It applies to the stem the run started from: `inject_adapter_in_model(LoraConfig.from_pretrained(directory),
    model.stem)` and `set_peft_model_state_dict(model.stem, load_file(directory / "adapter_model.safetensors"))`.
    """
    configs = getattr(model.stem, "peft_config", None)
    if not configs:
        return None
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    configs["default"].save_pretrained(str(directory))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model.stem).items()}
    save_file(state, str(directory / "adapter_model.safetensors"))
    return directory


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every peft LoRA layer into its base layer, in place, and return the model: the plain modules and state-dict
    keys of a model without LoRA (`stem...qkv.weight`, not `...qkv.base_layer.weight`), which is what `save_pretrained`
    must write for `from_pretrained` to load it. A no-op for a model without LoRA (or without peft installed)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for module in model.modules():
        if "peft_config" in module.__dict__:  # set by `inject_adapter_in_model`; nothing is injected any more
            del module.peft_config
    return model
