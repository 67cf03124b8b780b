"""predict CLI: any images -> per-task pictures at the original size, the model's own predictions, bad files named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_config
from PIL import Image
from test_image_processing_sak import REAL_NYU_DEPTH, depth_like_modes, photo_modes

from modeling_sak import SAKForMultiTask, SAKImageProcessor
from modeling_sak.commands.predict import main
from modeling_sak.evaluation.pictures import VOID_COLOUR, grid_title_height, palette


def test_predict_writes_every_task_at_the_original_size_and_names_unreadable_files(tmp_path, capsys):
    torch.manual_seed(0)
    model = SAKForMultiTask(tiny_config()).eval()
    model.save_pretrained(tmp_path / "model")
    SAKImageProcessor(pad_size=(64, 96)).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 256, (50, 90, 3), np.uint8), rng.integers(0, 256, (70, 60, 3), np.uint8)
    Image.fromarray(first).save(tmp_path / "kitchen.png")
    Image.fromarray(second).save(tmp_path / "office.jpg", quality=95)
    (tmp_path / "broken.png").write_bytes(b"not an image")

    status = main(
        [
            "--model",
            str(tmp_path / "model"),
            "--output_dir",
            str(tmp_path / "out"),
            "--batch_size",
            "2",
            str(tmp_path / "kitchen.png"),
            str(tmp_path / "broken.png"),
            str(tmp_path / "office.jpg"),
        ]
    )
    assert status == 1 and "broken.png: cannot read the image (UnidentifiedImageError" in capsys.readouterr().err
    for stem, (height, width) in (("kitchen", (50, 90)), ("office", (70, 60))):
        for task in ("semseg", "normals", "edge", "depth"):
            assert Image.open(tmp_path / "out" / f"{stem}_{task}.png").size == (width, height)
        grid = Image.open(tmp_path / "out" / f"{stem}_grid.png")
        line = grid_title_height(height)  # input + 4 tasks under a title strip, over their keys (6 lines)
        assert grid.size == (5 * width, line + height + 6 * line)
    assert not list((tmp_path / "out").glob("broken*"))

    # The semseg picture is the NYUD-40 palette of this model's argmax on the batch's common padded canvas.
    processor = SAKImageProcessor(pad_size=(64, 96))
    inputs = processor([first, second])
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"])
    ids = processor.post_process_semantic_segmentation(outputs, inputs["original_sizes"], inputs["content_boxes"])[0]
    expected = palette("semseg", 40)[ids.numpy()]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "kitchen_semseg.png")), expected)
    # The bfloat16 fast path draws nearly the same classes.
    assert (
        main(
            [
                "--model",
                str(tmp_path / "model"),
                "--output_dir",
                str(tmp_path / "fast"),
                "--batch_size",
                "2",
                "--bf16",
                str(tmp_path / "kitchen.png"),
                str(tmp_path / "office.jpg"),
            ]
        )
        == 0
    )
    fast = np.asarray(Image.open(tmp_path / "fast" / "kitchen_semseg.png"))
    assert (fast == expected).all(-1).mean() > 0.9
    depth = np.asarray(Image.open(tmp_path / "out" / "kitchen_depth.png"))
    assert depth.shape == (50, 90, 3) and len(np.unique(depth.reshape(-1, 3), axis=0)) > 10  # a colour map


def test_palettes_follow_the_reference():
    nyud, voc = palette("semseg", 40), palette("human_parts", 7)
    assert tuple(nyud[0]) == (128, 0, 0)  # NYUD class 0 is stored as 1: the colour of id 1
    assert tuple(voc[0]) == (0, 0, 0) and tuple(voc[1]) == (128, 0, 0) and tuple(voc[15]) == (192, 128, 128)
    assert tuple(nyud[255]) == VOID_COLOUR


def test_pictures_of_the_pascal_tasks():
    from modeling_sak.evaluation.pictures import colorize

    logits = torch.zeros(2, 4, 5)
    logits[1, :2] = 5.0  # salient top half
    grey = colorize("sal", logits)
    assert grey.shape == (4, 5, 3) and grey[0, 0, 0] > 250 and grey[3, 0, 0] == 127
    parts = colorize("human_parts", torch.tensor([[0, 1], [6, 255]]), num_classes=7)
    assert tuple(parts[0, 1]) == (128, 0, 0) and tuple(parts[1, 1]) == VOID_COLOUR


def test_predict_cli_reads_every_photo_mode_by_the_rules_and_refuses_depth_maps_by_name(tmp_path):
    """Through the real command: every photo mode is drawn as its documented RGB, every non-photo is named and skipped."""
    torch.manual_seed(0)
    SAKForMultiTask(tiny_config()).eval().save_pretrained(tmp_path / "model")
    SAKImageProcessor(pad_size=(16, 16)).save_pretrained(tmp_path / "model")
    files, expected, refused = [], {}, {}
    for mode, (image, rgb) in photo_modes().items():
        stem = mode.replace("+", "_").replace(";", "_")
        path = tmp_path / (f"{stem}.tif" if mode in ("CMYK", "YCbCr") else f"{stem}.png")
        # Deflate-compressed: Pillow 12.3 (the newest gradio allows) cannot read its own uncompressed YCbCr TIFFs
        # (a compressed one reads back as RGB; test_image_processing_sak checks the YCbCr rule itself).
        image.save(path, **({"compression": "tiff_deflate"} if path.suffix == ".tif" else {}))
        files.append(path)
        expected[stem] = rgb
    for mode, (image, description) in depth_like_modes().items():
        path = tmp_path / ("depth_16.png" if mode == "I;16" else f"depth_{mode}.tif")
        image.save(path)
        files.append(path)
        refused[path] = description
    if REAL_NYU_DEPTH.is_file():  # the real NYU sync depth frame, when this machine has it (not redistributable)
        files.append(REAL_NYU_DEPTH)
        refused[REAL_NYU_DEPTH] = "mode I;16 (16-bit single channel, values 0..6625)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_sak.commands.predict",
            "--model",
            str(tmp_path / "model"),
            "--device",
            "cpu",
            "--output_dir",
            str(tmp_path / "out"),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    for path, description in refused.items():
        assert f"skipped {path}: {description} is not a photo; SAK expects an 8-bit RGB or grayscale photo" in (
            result.stderr
        )
        assert not list((tmp_path / "out").glob(f"{path.stem}_*"))
    assert f"wrote {5 * len(expected)} pictures for {len(expected)} image(s)" in result.stdout
    for stem, rgb in expected.items():
        grid = np.asarray(Image.open(tmp_path / "out" / f"{stem}_grid.png"))
        top = grid_title_height(rgb.shape[0])
        np.testing.assert_array_equal(grid[top : top + rgb.shape[0], : rgb.shape[1]], rgb, err_msg=stem)  # the input
        assert Image.open(tmp_path / "out" / f"{stem}_depth.png").size == (rgb.shape[1], rgb.shape[0])
