"""The evaluation loop: a model's metrics over a loader, summed across processes, always in evaluation mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..remote_code.configuration_sak import SAKConfig
from .registry import make_metrics


def evaluate(model, loader, accelerator, config: SAKConfig, boundary: str = "bsds") -> dict[str, dict[str, float]]:
    """Metrics of every task over this process's part of `loader`, summed across processes. The model runs in
    `evaluation_mode` and comes back in the mode it was found in."""
    metrics = make_metrics(config.tasks, config.semantic_loss_ignore_index, boundary)
    with evaluation_mode(model):
        for batch in loader:
            if batch["pixel_values"] is None:
                continue
            outputs = model(pixel_values=batch["pixel_values"].to(accelerator.device))
            for task, metric in metrics.items():
                label = batch["labels"].get(task)
                if label is not None:
                    metric.update(outputs.task_outputs[task].float().cpu(), label)
    results = {}
    for task, metric in metrics.items():
        state = {k: accelerator.reduce(v.to(accelerator.device), "sum").cpu() for k, v in metric.state().items()}
        metric.load_state(state)
        results[task] = metric.compute()
    return results


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode under `torch.inference_mode()` for every evaluation and picture; on exit each module's training flag
    is back as it was found.

    In train mode BatchNorm would normalise with batch statistics and update its running statistics, dropout would
    drop and noisy gating would add noise: evaluation would give other numbers and change the model. The flags are
    restored per module, so a model with some parts kept in eval (e.g. frozen statistics) comes back exactly as it was.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(modes[model])  # through `train` first: modules may act on it (e.g. drop an eval-only cache)
        for module, training in modes.items():
            module.training = training
