"""Pictures a person would rather look at than read: predictions next to ground truth, and router weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..image_processing_sak import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _palette(num_classes: int) -> np.ndarray:
    """A fixed, distinguishable colour per class (the NYUD-40 convention of bit-interleaved colours)."""
    palette = np.zeros((max(num_classes, 256), 3), dtype=np.uint8)
    for index in range(len(palette)):
        value, r, g, b = index + 1, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    palette[255] = (0, 0, 0)
    return palette


def colorize(task: str, value: torch.Tensor, num_classes: int = 40, depth_range: tuple[float, float] | None = None):
    """One task map -> uint8 RGB (H, W, 3): semseg palette, depth colormap, normals as RGB, boundaries grey."""
    import matplotlib

    value = value.detach().float().cpu()
    if task in ("semseg", "human_parts"):
        ids = value.argmax(0) if value.dim() == 3 and value.shape[0] > 1 else value.reshape(value.shape[-2:])
        return _palette(num_classes)[ids.long().clamp(0, 255).numpy()]
    if task == "depth":
        depth = value.reshape(value.shape[-2:]).numpy()
        valid = depth != 255
        low, high = depth_range or (
            float(depth[valid].min()) if valid.any() else 0,
            float(depth[valid].max()) if valid.any() else 1,
        )
        scaled = np.clip((depth - low) / max(high - low, 1e-6), 0, 1)
        rgb = (matplotlib.colormaps["magma_r"](scaled)[..., :3] * 255).astype(np.uint8)
        rgb[~valid] = 0
        return rgb
    if task == "normals":
        normals = torch.nn.functional.normalize(value, dim=0).permute(1, 2, 0).numpy()
        invalid = (value == 255).all(0).numpy()
        rgb = ((normals + 1) * 127.5).clip(0, 255).astype(np.uint8)
        rgb[invalid] = 0
        return rgb
    probability = value.reshape(value.shape[-2:])
    if probability.min() < 0 or probability.max() > 1.0 and (probability != 255).all():
        probability = probability.sigmoid()
    grey = (np.where(probability.numpy() == 255, 0, probability.numpy()) * 255).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    image = pixel_values.detach().float().cpu().permute(1, 2, 0).numpy() * np.array(IMAGENET_DEFAULT_STD) + np.array(
        IMAGENET_DEFAULT_MEAN
    )
    return (image.clip(0, 1) * 255).astype(np.uint8)


def prediction_grid(pixel_values, labels, task_outputs, path: str | Path, num_classes: int = 40, rows: int = 4):
    """Save a PNG: per image, the input, then ground truth and prediction for every task."""
    from PIL import Image

    tasks = list(task_outputs)
    lines = []
    for i in range(min(rows, pixel_values.shape[0])):
        cells = [denormalize(pixel_values[i])]
        for task in tasks:
            gt = labels.get(task) if labels else None
            depth_range = None
            if task == "depth" and gt is not None:
                valid = gt[i][gt[i] != 255]
                depth_range = (float(valid.min()), float(valid.max())) if valid.numel() else None
            if gt is not None:
                cells.append(colorize(task, gt[i], num_classes, depth_range))
            cells.append(colorize(task, task_outputs[task][i], num_classes, depth_range))
        lines.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(lines, axis=0)
    Image.fromarray(grid).save(path)
    return path


def router_bar_chart(router_weights: dict[str, torch.Tensor], experts: list[str], path: str | Path):
    """Save a PNG bar chart: mean router weight of every expert, per task and output level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(router_weights)
    levels = next(iter(router_weights.values())).shape[1]
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), sharey=True, squeeze=False)
    width = 0.8 / len(experts)
    for axis, task in zip(axes[0], tasks):
        weights = router_weights[task].float().mean(0).cpu().numpy()  # (levels, experts)
        for e, expert in enumerate(experts):
            axis.bar(np.arange(levels) + e * width - 0.4 + width / 2, weights[:, e], width, label=expert)
        axis.set_title(task)
        axis.set_xticks(range(levels), [f"L{k + 1}" for k in range(levels)])
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean router weight")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
