"""Run a SAK checkpoint on any images and write every task's prediction as pictures.

    sak-predict --model PATH_OR_REPO IMAGE [IMAGE ...] [--output_dir predictions]

For each image `NAME.ext`, writes `NAME_{task}.png` per task (semseg / human_parts in the reference palettes, depth
as a colour map, normals as RGB, boundaries and saliency as grey probabilities) and `NAME_grid.png` (the image and all
tasks side by side), at the image's original size: the processor normalises and pads as in evaluation, and the
post-processing crops the padding away. With `--batch_size` > 1, images of different sizes share one padded canvas,
which changes their predictions slightly (the stem attends over the whole canvas).

Images are read as 8-bit RGB photos: grayscale is replicated to 3 channels, palette/CMYK/YCbCr images are converted and
transparency is composited onto white. A file that cannot be read, or is not a photo (a 16-bit, 32-bit or float
single-channel image such as a depth map, mode I;16, I or F), is reported by name, mode and values and skipped; the
others are still written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from ..cli import bad_input_exits, check_model_argument
from ..evaluation.pictures import save_task_pictures
from ..remote_code.image_io_sak import load_rgb_image
from ..training.cpu_allocator import configure_cpu_allocator


def load_images(paths: list[str]) -> tuple[list[tuple[Path, np.ndarray]], list[str]]:
    """(path, RGB uint8 array) for every readable photo, and a message per file that is unreadable or not a photo
    (`load_rgb_image`'s rules: e.g. a 16-bit depth PNG is refused, an RGBA PNG is composited onto white)."""
    images, errors = [], []
    for name in paths:
        try:
            images.append((Path(name), load_rgb_image(name)))
        except ValueError as error:
            errors.append(str(error))
    return images, errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sak-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument(
        "--model", required=True, help="a SAK checkpoint folder or Hub id (loaded with trust_remote_code)"
    )
    parser.add_argument("--output_dir", default="predictions", help="where the pictures go (default: predictions)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (they are padded together)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="fast path: model.optimize_for_inference() in bfloat16 "
        "(about 2.4x faster on CPU, outputs within ~1e-2 of float32)",
    )
    parser.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command; a bad input ends in one `error:` line and exit status 2 (`modeling_sak.cli`)."""
    with bad_input_exits("sak-predict"):
        return _main(argv)


@torch.inference_mode()  # with `.eval()` below: eval-mode outputs and no autograd, as every evaluation path
def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_cpu_allocator()  # a loop of forwards: freed tensors stay mapped (same outputs)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: must be at least 1")
    check_model_argument(args.model)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, revision=args.revision)
    model = model.to(args.device).eval()
    if args.bf16:
        model.optimize_for_inference(torch.bfloat16)
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True, revision=args.revision)
    images, errors = load_images(args.images)
    for message in errors:
        print(f"skipped {message}", file=sys.stderr)
    written = 0
    for start in range(0, len(images), args.batch_size):
        chunk = images[start : start + args.batch_size]
        inputs = processor([array for _, array in chunk], return_tensors="pt")
        outputs = model(pixel_values=inputs["pixel_values"].to(args.device))
        task_outputs = {task: value.float().cpu() for task, value in outputs.task_outputs.items()}
        results = processor.post_process_multi_task(
            task_outputs, target_sizes=inputs["original_sizes"], content_boxes=inputs["content_boxes"]
        )
        for (path, array), predictions in zip(chunk, results):
            files = save_task_pictures(
                array, predictions, args.output_dir, path.stem, dict(model.config.tasks), model.config.id2label
            )
            written += len(files)
            print(f"{path} -> {', '.join(f.name for f in files)}")
    print(f"wrote {written} pictures for {len(images)} image(s) to {args.output_dir}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
