"""Time a SAK teacher committee forward on CPU: fp32 teachers vs bf16 teachers, side by side in one run.

    python bench/teachers_forward.py [--width 192] [--layers 12] [--batch 2] [--repeats 5]

DINOv2-, CLIP- and SAM-shaped teachers (patch 14 / 16 / 16, SAM at its native 1024 x 1024 with windowed
attention) are built from transformers configs with random weights at a small width, saved, and loaded back through
`SAKTeachers` exactly as Hub teachers are. Input: a batch at the NYUD-v2 training size 448 x 576. Runs alternate
between the two precisions and the median is reported; results go to bench/results/teachers_forward.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SamVisionConfig, SamVisionModel

from modeling_sak import SAKConfig
from modeling_sak.teachers import SAKTeachers


def build_teachers(root: Path, width: int, layers: int) -> dict[str, dict]:
    heads = max(1, width // 64)
    tower = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads}
    global_layers = [layers // 4 * (k + 1) - 1 for k in range(4)]
    models = {
        "dinov2": Dinov2Model(Dinov2Config(**tower, image_size=518, patch_size=14)),
        "clip": CLIPVisionModel(CLIPVisionConfig(**tower, intermediate_size=4 * width, image_size=384, patch_size=16)),
        "sam": SamVisionModel(
            SamVisionConfig(
                **tower,
                mlp_dim=4 * width,
                image_size=1024,
                patch_size=16,
                window_size=14,
                global_attn_indexes=global_layers,
                output_channels=64,
            )
        ),
    }
    specs = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        specs[name] = {"hidden_size": width, "model_id": str(root / name)}
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=192, help="teacher width (ViT-B teachers are 768)")
    parser.add_argument("--layers", type=int, default=12, help="teacher depth")
    parser.add_argument("--batch", type=int, default=2, help="images per forward")
    parser.add_argument("--size", type=int, nargs=2, default=[448, 576], metavar=("H", "W"), help="input size")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per precision (after one warm-up)")
    parser.add_argument("--output", default="bench/results/teachers_forward.json", help="JSON results file")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        specs = build_teachers(Path(tmp), args.width, args.layers)
        config = SAKConfig(
            stem_config={
                "model_type": "vit",
                "hidden_size": args.width,
                "num_hidden_layers": 12,
                "num_attention_heads": 3,
                "intermediate_size": 4 * args.width,
            },
            teachers=specs,
        )
        committees = {
            "fp32": SAKTeachers.from_config(config),
            "bf16": SAKTeachers.from_config(config, dtype=torch.bfloat16),
        }
        x = torch.randn(args.batch, 3, *args.size)
        times = {name: [] for name in committees}
        outputs = {name: committee(x) for name, committee in committees.items()}  # warm-up
        for _ in range(args.repeats):
            for name, committee in committees.items():
                start = time.perf_counter()
                committee(x)
                times[name].append(time.perf_counter() - start)
    errors = {
        teacher: max(
            ((b - a).norm() / a.norm()).item() for a, b in zip(outputs["fp32"][teacher], outputs["bf16"][teacher])
        )
        for teacher in outputs["fp32"]
    }
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.platform()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": "python bench/teachers_forward.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "output"
        ),
        "median_seconds": median,
        "all_seconds": times,
        "speedup_bf16_over_fp32": median["fp32"] / median["bf16"],
        "max_relative_error_bf16_vs_fp32": errors,
        "grids": {t: list(v[0].shape[-2:]) for t, v in outputs["fp32"].items()},
    }
    print(
        f"committee forward, batch {args.batch} at {args.size[0]}x{args.size[1]} (DINOv2/CLIP/SAM-shaped, width "
        f"{args.width}, {args.layers} layers):"
    )
    for name, value in median.items():
        print(f"  {name}: {value:.3f} s (median of {args.repeats})")
    print(
        f"  bf16 speed-up: {result['speedup_bf16_over_fp32']:.2f}x; max relative error per teacher: "
        + ", ".join(f"{t} {e:.4f}" for t, e in errors.items())
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
