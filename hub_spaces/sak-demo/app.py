"""SAK demo: every task of a SAK checkpoint from one photo, and how much each teacher path each task uses.

    python hub_spaces/sak-demo/app.py [--model outputs/sak-toyrooms/final | ORG/NAME] [--port 7860]

The model comes from `--model`, else the `SAK_MODEL` environment variable (a Space's variable), else the default
training run's `outputs/sak-toyrooms/final` beside this folder. It runs through the checkpoint's own "sak-multi-task"
pipeline (its remote code), so this app needs neither the sak-hf package nor a teacher: torch, transformers, gradio.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import matplotlib
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import pipeline


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


HERE = Path(__file__).resolve().parent
DEFAULT_RUN = HERE.parents[1] / "outputs" / "sak-toyrooms" / "final"
MAX_SIDE = 2048  # pixels; larger photos take minutes on a CPU Space
NO_TEACHER_OFF = "none (the trained model)"


def resolve_model(name: str | None) -> str:
    """`--model`, else `$SAK_MODEL`, else the default run's final/ folder; SystemExit with the fix otherwise."""
    name = name or os.environ.get("SAK_MODEL")
    if name:
        return name
    if (DEFAULT_RUN / "config.json").is_file():
        return str(DEFAULT_RUN)
    raise SystemExit(
        f"no SAK checkpoint to show: {DEFAULT_RUN} does not exist. Train the default one with `accelerate launch "
        "train_accelerate.py` (a few minutes on a CPU), or name a checkpoint folder or Hub id with --model "
        "(or the SAK_MODEL environment variable)"
    )


def example_photos(folder: Path) -> list[str]:
    """Real photos bundled with scikit-image (no download), written as JPEG files for the examples."""
    from skimage import data

    paths = []
    for name in ("coffee", "astronaut", "chelsea"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path, quality=92)
        paths.append(str(path))
    return paths


def open_photo(path: str | None) -> Image.Image:
    """The uploaded file as a PIL image; ValueError with the reason for a missing, unreadable or huge file (other
    rules, e.g. 16-bit depth maps, are the processor's)."""
    if not path:
        raise ValueError("upload an image (or pick an example) first")
    name = Path(path).name
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: not an image this demo can read ({error}); upload a JPEG or PNG photo") from None
    if max(image.size) > MAX_SIDE:
        raise ValueError(
            f"{name} is {image.width}x{image.height} pixels; this demo takes up to {MAX_SIDE} pixels per side. "
            "Resize it first (the model itself takes any size)"
        )
    return image


def class_colours(count: int) -> np.ndarray:
    """`(count, 3)` uint8 colours, distinct for neighbouring ids (matplotlib's tab20, then hsv)."""
    base = plt.get_cmap("tab20")(np.arange(20))[:, :3]
    extra = plt.get_cmap("hsv")(np.linspace(0, 1, max(count - 20, 1), endpoint=False))[:, :3]
    return (np.concatenate([base, extra])[:count] * 255).round().astype(np.uint8)


def semseg_overlay(photo: np.ndarray, class_ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    return (0.45 * photo + 0.55 * colours[class_ids]).round().astype(np.uint8)


def semseg_legend(class_ids: np.ndarray, colours: np.ndarray, id2label: dict) -> str:
    ids, counts = np.unique(class_ids, return_counts=True)
    items = []
    for class_id, count in sorted(zip(ids, counts), key=lambda item: -item[1]):
        r, g, b = colours[class_id]
        label = html.escape(str(id2label.get(int(class_id), class_id)))
        share = 100 * count / class_ids.size
        items.append(
            f'<span class="sak-legend-item"><span style="display:inline-block;width:14px;height:14px;'
            f'background:rgb({r},{g},{b});margin-right:4px;vertical-align:middle"></span>{label} {share:.0f}%</span>'
        )
    return '<div id="semseg-legend">' + " &nbsp; ".join(items) + "</div>"


def depth_picture(depth: np.ndarray) -> tuple[np.ndarray, str]:
    """Depth coloured by matplotlib's turbo over its own range, and an HTML colour bar in metres."""
    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / max(high - low, 1e-6)
    picture = (plt.get_cmap("turbo")(scaled)[..., :3] * 255).round().astype(np.uint8)
    stops = ", ".join(
        f"rgb({r},{g},{b})" for r, g, b in (plt.get_cmap("turbo")(np.linspace(0, 1, 9))[:, :3] * 255).astype(int)
    )
    bar = (
        f'<div id="depth-colorbar"><div style="height:14px;background:linear-gradient(to right, {stops})"></div>'
        f'<div style="display:flex;justify-content:space-between"><span>{low:.2f} m</span>'
        f"<span>{(low + high) / 2:.2f} m</span><span>{high:.2f} m</span></div></div>"
    )
    return picture, bar


def router_chart(router_weights: dict[str, torch.Tensor], experts: list[str], switched_off: str | None):
    tasks = list(router_weights)
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.1 * len(tasks), 2.8), sharey=True, squeeze=False)
    for axis, task in zip(axes[0], tasks):
        weights = router_weights[task].numpy()  # (levels, experts)
        levels = weights.shape[0]
        width = 0.8 / len(experts)
        for e, expert in enumerate(experts):
            positions = np.arange(levels) + e * width - 0.4 + width / 2
            axis.bar(positions, weights[:, e], width, label=expert)
        axis.set_title(task)
        axis.set_xticks(range(levels), [f"L{k + 1}" for k in range(levels)])
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("router weight")
    axes[0][-1].legend(fontsize=8)
    title = "MoR router weights per level and teacher path"
    figure.suptitle(title + (f" ({switched_off} path switched off)" if switched_off else ""), fontsize=10)
    figure.tight_layout()
    return figure


@contextlib.contextmanager
def teacher_path_off(model, index: int | None):
    """Within the block, every router gives weight 0 to expert `index` (0 is the stem's path, then the teachers) and
    renormalises the others: the model as if that teacher path were not there."""
    if index is None or model.routers is None:
        yield
        return
    mix_experts = sys.modules[type(model).__module__].mix_experts

    def hook(module, inputs, output):
        stem_features, expert_features = inputs
        weights = output[1].clone()
        weights[:, index] = 0
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return mix_experts([stem_features, *expert_features], weights), weights

    handles = [router.register_forward_hook(hook) for routers in model.routers.values() for router in routers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def router_weights_of(model):
    """Within the block, collect every forward's `router_weights` (task -> `(batch, levels, experts)`): read from the
    model's output, so that checkpoints whose pipeline predates `return_router_weights` show them too."""
    seen = []
    handle = model.register_forward_hook(lambda module, inputs, output: seen.append(output.router_weights))
    try:
        yield seen
    finally:
        handle.remove()


class Demo:
    def __init__(self, model: str):
        self.name = model
        self.sak = pipeline("sak-multi-task", model=model, trust_remote_code=True)
        config = self.sak.model.config
        self.tasks = dict(config.tasks)
        self.experts = ["stem", *config.teachers]
        self.id2label = {int(k): v for k, v in config.id2label.items()}
        self.label2id = {label: class_id for class_id, label in self.id2label.items()}
        self.colours = class_colours(self.tasks.get("semseg", 1))

    def predict(self, path, switched_off, progress=gr.Progress()):  # noqa: B008 (how gradio injects a progress bar)
        """Every output for the uploaded photo; a bad file ends in `gr.Error` with its message (shown in the page)."""
        start = time.perf_counter()
        try:
            progress(0.1, desc="reading the photo")
            image = open_photo(path)
            # The processor's photo rules first: the pipeline of checkpoints made before it kept them converted
            # every image to RGB (a 16-bit depth map would pass as a clipped photo).
            self.sak.image_processor(images=[image], return_tensors="pt")
            off = self.experts.index(switched_off) if switched_off in self.experts else None
            progress(0.3, desc="predicting every task")
            with (
                torch.inference_mode(),
                teacher_path_off(self.sak.model, off),
                router_weights_of(self.sak.model) as seen,
            ):
                result = self.sak(image)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None
        progress(0.9, desc="drawing")
        photo = np.asarray(image.convert("RGB"))
        outputs = {}
        if "semseg" in result:
            class_ids = np.zeros(photo.shape[:2], dtype=np.int64)
            for segment in result["semseg"]:
                class_ids[np.asarray(segment["mask"]) > 0] = self.label2id.get(segment["label"], 0)
            outputs["semseg"] = semseg_overlay(photo, class_ids, self.colours)
            outputs["semseg_legend"] = semseg_legend(class_ids, self.colours, self.id2label)
        if "depth" in result:
            outputs["depth"], outputs["depth_colorbar"] = depth_picture(result["depth"]["predicted_depth"].numpy())
        if "normals" in result:
            outputs["normals"] = np.asarray(result["normals"]["normals"])
        if "edge" in result:
            outputs["edge"] = np.asarray(result["edge"]["boundaries"])
        routers = {task: weights[0].float() for task, weights in seen[-1].items()} if seen and seen[-1] else None
        chart = router_chart(routers, self.experts, switched_off if off is not None else None) if routers else None
        seconds = time.perf_counter() - start
        status = f"{photo.shape[1]}x{photo.shape[0]} pixels, {seconds:.1f} s on {self.sak.device}"
        return (
            outputs.get("semseg"),
            outputs.get("semseg_legend", ""),
            outputs.get("depth"),
            outputs.get("depth_colorbar", ""),
            outputs.get("normals"),
            outputs.get("edge"),
            chart,
            status,
        )

    def blocks(self, examples: list[str]) -> gr.Blocks:
        with gr.Blocks(title="SAK: one model, four tasks") as demo:
            gr.Markdown(
                f"## SAK (Swiss Army Knife, ICLR 2025): every task from one photo\n"
                f"Model `{html.escape(self.name)}`: {', '.join(self.tasks)}; teacher paths {', '.join(self.experts[1:])}"
                ". Upload a photo (JPEG or PNG, up to 2048 pixels per side) or pick an example."
            )
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="photo", file_types=["image"], type="filepath", elem_id="upload")
                    switched_off = gr.Dropdown(
                        [NO_TEACHER_OFF, *self.experts[1:]],
                        value=NO_TEACHER_OFF,
                        label="switch a teacher path off (its router weight set to 0, the others renormalised)",
                    )
                    run = gr.Button("Predict", variant="primary", elem_id="predict")
                    status = gr.Markdown(elem_id="status")
                    gr.Examples(examples, inputs=upload)
                with gr.Column(scale=3):
                    with gr.Row():
                        with gr.Column():
                            semseg = gr.Image(label="semantic segmentation", elem_id="semseg", format="png")
                            legend = gr.HTML()
                        with gr.Column():
                            depth = gr.Image(label="depth", elem_id="depth", format="png")
                            colorbar = gr.HTML()
                    with gr.Row():
                        normals = gr.Image(
                            label="surface normals (RGB = (n + 1) / 2)", elem_id="normals", format="png"
                        )
                        edge = gr.Image(label="boundaries (probability)", elem_id="edge", format="png")
                    chart = gr.Plot(label="router weights", elem_id="routers")
            outputs = [semseg, legend, depth, colorbar, normals, edge, chart, status]
            run.click(self.predict, inputs=[upload, switched_off], outputs=outputs)
        return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="SAK checkpoint folder or Hub id (default: $SAK_MODEL or the default run's outputs/sak-toyrooms/final)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 in a Space)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    args = parser.parse_args(argv)
    demo = Demo(resolve_model(args.model))
    examples_dir = Path(tempfile.mkdtemp(prefix="sak-demo-examples-"))
    demo.blocks(example_photos(examples_dir)).queue().launch(
        server_name=args.host, server_port=args.port, allowed_paths=[str(examples_dir)], show_error=True
    )


if __name__ == "__main__":
    main()
