"""Pictures a person would rather look at than read: predictions next to ground truth, and router weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .tasks_sak import IGNORE_INDEX, TASKS


VOID_COLOUR = (224, 223, 192)  # ignored pixels, as the reference draws them


def _bit_interleaved_colours(count: int, offset: int) -> np.ndarray:
    """The PASCAL VOC colour map: the bits of `index + offset` spread over the high bits of R, G and B."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, r, g, b = index + offset, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def palette(task: str, num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours per id, as the reference draws them: NYUD-40 semseg uses the colour of id + 1 (its
    0 is "unlabeled"), PASCAL semseg, human parts and other label sets the VOC colours of the id; 255 = void."""
    offset = 1 if task == "semseg" and num_classes == 40 else 0
    colours = _bit_interleaved_colours(256, offset)
    colours[IGNORE_INDEX] = VOID_COLOUR
    return colours


def colorize(
    task: str,
    value: torch.Tensor,
    num_classes: int = 40,
    depth_range: tuple[float, float] | None = None,
    logits: bool = True,
):
    """One task map -> uint8 RGB (H, W, 3): semseg palette, depth colormap, normals as RGB, boundaries grey.

    `logits=True` (a head's raw output, as `SAKForMultiTask` returns it): probability maps get the task table's
    post-processing first (`tasks_sak.TASKS`: the sigmoid for `edge`, the softmax's class 1 for `sal`).
    `logits=False`: a label (255 = ignored) or an already post-processed map, drawn as it is."""
    import matplotlib

    value = value.detach().float().cpu()
    post_processing = TASKS[task].post_processing if task in TASKS else None
    if post_processing == "class_ids":
        ids = value.argmax(0) if value.dim() == 3 and value.shape[0] > 1 else value.reshape(value.shape[-2:])
        return palette(task, num_classes)[ids.long().clamp(0, 255).numpy()]
    if post_processing == "depth":
        depth = value.reshape(value.shape[-2:]).numpy()
        valid = depth != IGNORE_INDEX
        low, high = depth_range or (
            float(depth[valid].min()) if valid.any() else 0,
            float(depth[valid].max()) if valid.any() else 1,
        )
        scaled = np.clip((depth - low) / max(high - low, 1e-6), 0, 1)
        rgb = (matplotlib.colormaps["magma_r"](scaled)[..., :3] * 255).astype(np.uint8)
        rgb[~valid] = 0
        return rgb
    if post_processing == "unit_normals":
        normals = torch.nn.functional.normalize(value, dim=0).permute(1, 2, 0).numpy()
        invalid = (value == IGNORE_INDEX).all(0).numpy()
        rgb = ((normals + 1) * 127.5).clip(0, 255).astype(np.uint8)
        rgb[invalid] = 0
        return rgb
    if logits and post_processing == "softmax":  # two-class logits: probability of class 1
        value = value.softmax(0)[1]
    elif logits and post_processing == "sigmoid":
        value = value.sigmoid()
    probability = value.reshape(value.shape[-2:]).numpy()
    grey = (np.where(probability == IGNORE_INDEX, 0, probability) * 255).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    image = pixel_values.detach().float().cpu().permute(1, 2, 0).numpy() * np.array(IMAGENET_DEFAULT_STD) + np.array(
        IMAGENET_DEFAULT_MEAN
    )
    return (image.clip(0, 1) * 255).astype(np.uint8)


def _with_headers(grid: np.ndarray, headers: list[str], cell_width: int) -> np.ndarray:
    """Grid with a white title strip above its columns."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (grid.shape[1], 16), "white")
    draw = ImageDraw.Draw(strip)
    for column, text in enumerate(headers):
        draw.text((column * cell_width + 3, 2), text[: max(1, cell_width // 6)], fill="black")
    return np.concatenate([np.asarray(strip), grid], axis=0)


def prediction_grid(pixel_values, labels, task_outputs, path: str | Path, num_classes: int = 40, rows: int = 4):
    """Save a PNG: per image (row), the input, then ground truth (when given) and prediction for every task, under
    a header naming each column."""
    from PIL import Image

    tasks = list(task_outputs)
    lines, headers = [], ["input"]
    for i in range(min(rows, pixel_values.shape[0])):
        cells = [denormalize(pixel_values[i])]
        for task in tasks:
            gt = labels.get(task) if labels else None
            depth_range = None
            if task == "depth" and gt is not None:
                valid = gt[i][gt[i] != IGNORE_INDEX]
                depth_range = (float(valid.min()), float(valid.max())) if valid.numel() else None
            if gt is not None:
                cells.append(colorize(task, gt[i], num_classes, depth_range, logits=False))
                headers += [f"{task} truth"] if i == 0 else []
            cells.append(colorize(task, task_outputs[task][i], num_classes, depth_range))
            headers += [f"{task} pred"] if i == 0 else []
        lines.append(np.concatenate(cells, axis=1))
    grid = _with_headers(np.concatenate(lines, axis=0), headers, lines[0].shape[1] // len(headers))
    Image.fromarray(grid).save(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 scales its built-in font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _legend(task: str, value: torch.Tensor, num_classes: int, id2label: dict | None, width: int, line: int):
    """The key of one task's panel, `width` pixels wide, one text line `line` pixels high (uint8 RGB): the classes
    it shows most (colour and name), the depth colour bar in metres, the normals' RGB encoding, or the probability
    scale."""
    import matplotlib
    from PIL import Image, ImageDraw

    rows = 6
    canvas = Image.new("RGB", (width, rows * line), "white")
    draw, font = ImageDraw.Draw(canvas), _font(max(8, int(line * 0.7)))
    post_processing = TASKS[task].post_processing if task in TASKS else None
    pad = max(2, line // 5)
    if post_processing == "class_ids":
        ids = value.reshape(value.shape[-2:]).long()
        present = [i for i in torch.bincount(ids.flatten(), minlength=256).argsort(descending=True).tolist()]
        colours = palette(task, num_classes)
        shown = [i for i in present if i != IGNORE_INDEX and (ids == i).any()][:rows]
        for row, index in enumerate(shown):
            top = row * line
            draw.rectangle([pad, top + pad, pad + line - 2 * pad, top + line - pad], fill=tuple(colours[index]))
            name = (id2label or {}).get(index, (id2label or {}).get(str(index), f"class {index}"))
            draw.text((line + pad, top + pad // 2), str(name), fill="black", font=font)
    elif post_processing in ("depth", "sigmoid", "softmax") or task in ("edge", "sal"):
        depth = post_processing == "depth"
        values = value.reshape(value.shape[-2:]).float()
        valid = values[values != IGNORE_INDEX] if depth else values
        low, high = (float(valid.min()), float(valid.max())) if depth and valid.numel() else (0.0, 1.0)
        ramp = np.linspace(0, 1, max(1, width - 2 * pad))
        colours = matplotlib.colormaps["magma_r"](ramp)[..., :3] if depth else np.repeat(ramp[:, None], 3, axis=1)
        bar = np.repeat((colours * 255).astype(np.uint8)[None], line, axis=0)
        canvas.paste(Image.fromarray(bar), (pad, pad))
        unit = " m" if depth else ""
        label = "depth" if depth else "probability"
        draw.text((pad, line + pad), f"{low:.2f}{unit}", fill="black", font=font)
        right = f"{high:.2f}{unit}"
        draw.text((width - pad - draw.textlength(right, font=font), line + pad), right, fill="black", font=font)
        draw.text((pad, 2 * line + pad), label, fill="black", font=font)
    elif post_processing == "unit_normals":  # RGB = (n + 1) / 2 of the unit normal's camera-frame x, y, z
        keys = (
            ("R = x of the normal", (255, 128, 128)),
            ("G = y", (128, 255, 128)),
            ("B = z (camera frame)", (128, 128, 255)),
        )
        for row, (text, colour) in enumerate(keys):
            top = row * line
            draw.rectangle([pad, top + pad, pad + line - 2 * pad, top + line - pad], fill=colour)
            draw.text((line + pad, top + pad // 2), text, fill="black", font=font)
    return np.asarray(canvas)


def save_task_pictures(
    image: np.ndarray | None,
    predictions: dict[str, torch.Tensor],
    directory: str | Path,
    stem: str,
    num_classes: dict[str, int] | None = None,
    id2label: dict | None = None,
) -> list[Path]:
    """Write one PNG per task (`{stem}_{task}.png`: palette ids, depth colour map, normals as RGB, boundary and
    saliency probabilities in grey) and `{stem}_grid.png`: the image, if given, then every task side by side under
    titles scaled to the picture's height, and under each task its key (the classes it shows most, named by
    `id2label`; the depth colour bar in metres; the normals' RGB encoding; the probability scale).

    `predictions` are post-processed maps of one image (`SAKImageProcessor.post_process_multi_task`)."""
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, cells, headers, tasks = [], [], [], []
    if image is not None:
        cells.append(np.asarray(image, dtype=np.uint8))
        headers.append("input")
    for task, value in predictions.items():
        rgb = colorize(task, value, (num_classes or {}).get(task, 40), logits=False)
        path = directory / f"{stem}_{task}.png"
        Image.fromarray(rgb).save(path)
        written.append(path)
        cells.append(rgb)
        headers.append(task)
        tasks.append(task)
    if cells and len({cell.shape for cell in cells}) == 1:
        height, width = cells[0].shape[:2]
        line = grid_title_height(height)
        title = Image.new("RGB", (width * len(cells), line), "white")
        draw, font = ImageDraw.Draw(title), _font(max(8, int(line * 0.7)))
        for column, text in enumerate(headers):
            draw.text((column * width + line // 4, line // 8), text, fill="black", font=font)
        keys = [np.full((6 * line, width, 3), 255, np.uint8)] * (image is not None)
        keys += [
            _legend(task, predictions[task], (num_classes or {}).get(task, 40), id2label, width, line)
            for task in tasks
        ]
        grid = np.concatenate([np.asarray(title), np.concatenate(cells, axis=1), np.concatenate(keys, axis=1)])
        Image.fromarray(grid).save(directory / f"{stem}_grid.png")
        written.append(directory / f"{stem}_grid.png")
    return written


def grid_title_height(height: int) -> int:
    """Pixels of the title strip (and of one legend line) of a `save_task_pictures` grid of `height`-pixel panels:
    readable at the saved size, at least 16."""
    return max(16, round(height / 16))


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
