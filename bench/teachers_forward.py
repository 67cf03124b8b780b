"""Time each teacher's forward on CPU: transformers' own forward (SDPA) vs the teachers' fast path, side by side.

    python bench/teachers_forward.py [--width 768] [--layers 12] [--batch 1] [--repeats 3] [--threads 2]
                                     [--dtypes float32 bfloat16] [--teachers dinov2 clip sam]

DINOv2-, CLIP- and SAM-shaped teachers (patch 14 / 16 / 16; by default ViT-B: width 768, 12 layers, 12 heads; SAM
at its native 1024 x 1024 with 14 x 14 windows and global layers 2, 5, 8, 11) are built from transformers configs with
random weights drawn with std 0.02 (`initializer_range=0.02`: `SamVisionConfig`'s default of 1e-10 gives near-zero
weights whose float32 activations are subnormal, about 10x slower on CPU, so such weights are refused) and SAM's
relative-position tables drawn with std 0.02 too (transformers initialises them to zero), saved, and loaded back
through `SAKTeachers` exactly as Hub teachers are. Input: a batch at the NYUD-v2 training size 448 x 576 (SAM resizes
and pads it to 1024 x 1024). For each dtype and teacher, runs alternate between `fast_path=False` (transformers'
forward) and `fast_path=True` on the same teacher, after one warm-up of each; medians are reported with the maps'
maximum relative error (max |fast - transformers| / max |transformers| over the levels). For SAM the fast path is
also timed with its relative-position bias switched off: the same linear layers, norms and attention kernels with no
bias at all, a floor for any exact path, so transformers' time over it bounds the speed-up such a path can reach. The
cores of a shared machine may be busy: repeat, compare the medians, and read the ratio more than the seconds. Results
go to bench/results/teachers_forward.json.
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
import transformers
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SamVisionConfig, SamVisionModel

from modeling_sak import SAKConfig
from modeling_sak.teachers.committee import SAKTeachers
from modeling_sak.teachers.fast_path import transformer_blocks


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Below this, a model's largest weight says it was built with a near-zero initialiser (SAM's default 1e-10).
MIN_WEIGHT_SCALE = 1e-4


def attention_heads(width: int) -> int:
    """ViT's 64-wide heads where the width allows, else the most heads (at most width // 64) dividing the width."""
    return next(heads for heads in range(max(1, width // 64), 0, -1) if width % heads == 0)


def check_realistic_weights(name: str, model: nn.Module) -> None:
    """Refuse a model whose weight matrices are all near zero: its float32 activations would be subnormal, which makes
    CPU arithmetic about 10x slower and the timings meaningless."""
    largest = max(parameter.abs().max().item() for parameter in model.parameters() if parameter.dim() > 1)
    if largest < MIN_WEIGHT_SCALE:
        raise SystemExit(
            f"teacher '{name}' ({type(model).__name__}) has near-zero weights (largest |w| = {largest:.3g}): "
            "SamVisionConfig's default initializer_range=1e-10 gives subnormal float32 activations, about 10x slower "
            "on CPU; build it with initializer_range=0.02 (real checkpoints have weights of that scale)"
        )


def build_teachers(root: Path, width: int, layers: int, names: list[str]) -> dict[str, dict]:
    """Random teachers of realistic weight scale, saved under `root`; returns `SAKConfig.teachers` specs."""
    tower = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": attention_heads(width)}
    global_layers = [layers // 4 * (k + 1) - 1 for k in range(4)]
    builders = {
        "dinov2": lambda: Dinov2Model(Dinov2Config(**tower, image_size=518, patch_size=14, initializer_range=0.02)),
        "clip": lambda: CLIPVisionModel(
            CLIPVisionConfig(**tower, intermediate_size=4 * width, image_size=224, patch_size=16)
        ),
        "sam": lambda: SamVisionModel(
            SamVisionConfig(
                **tower,
                mlp_dim=4 * width,
                image_size=1024,
                patch_size=16,
                window_size=14,
                global_attn_indexes=global_layers,
                initializer_range=0.02,
            )
        ),
    }
    specs = {}
    for name in names:
        model = builders[name]()
        if name == "sam":
            with torch.no_grad():  # zero-initialised by transformers; trained SAMs have non-zero tables
                for layer in model.vision_encoder.layers:
                    layer.attn.rel_pos_h.normal_(0.0, 0.02)
                    layer.attn.rel_pos_w.normal_(0.0, 0.02)
        check_realistic_weights(name, model)
        model.save_pretrained(root / name)
        specs[name] = {"hidden_size": width, "model_id": str(root / name)}
    return specs


def without_relative_position_bias(teacher, x: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of the fast path with SAM's relative-position bias switched off (plain SDPA attention, other results):
    the blocks' linear layers, norms and attention kernels that any exact path must run too, so transformers' time
    over this one bounds the speed-up an exact path can reach with these kernels."""
    attentions = [block.attn for block in transformer_blocks(teacher.model, "sam")]
    teacher.fast_path, seconds = True, []
    try:
        for attention in attentions:
            attention.use_rel_pos = False
        for run in range(repeats + 1):
            start = time.perf_counter()
            teacher(x)
            if run:
                seconds.append(time.perf_counter() - start)
    finally:
        for attention in attentions:
            attention.use_rel_pos = True
    return seconds


def relative_error(fast: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fast, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768, help="teacher width (ViT-B: 768)")
    parser.add_argument("--layers", type=int, default=12, help="teacher depth (a multiple of 4)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward")
    parser.add_argument("--size", type=int, nargs=2, default=[448, 576], metavar=("H", "W"), help="input size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--teachers", nargs="+", default=["dinov2", "clip", "sam"], choices=["dinov2", "clip", "sam"])
    parser.add_argument("--output", default="bench/results/teachers_forward.json", help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, *args.size)
    results, references = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = build_teachers(Path(tmp), args.width, args.layers, args.teachers)
        heads = attention_heads(args.width)
        stem = {"model_type": "vit", "hidden_size": args.width, "num_attention_heads": heads}
        config = SAKConfig(stem_config={**stem, "intermediate_size": 4 * args.width}, teachers=specs)
        for dtype_name in args.dtypes:
            committee = SAKTeachers.from_config(config, dtype=DTYPES[dtype_name])
            for name, teacher in committee.teachers.items():
                times, maps = {"transformers": [], "fast": []}, {}
                with torch.inference_mode():
                    for run in range(args.repeats + 1):
                        for path in ("transformers", "fast"):
                            teacher.fast_path = path == "fast"
                            start = time.perf_counter()
                            maps[path] = teacher(x)
                            if run:  # run 0 is the warm-up
                                times[path].append(time.perf_counter() - start)
                    if name == "sam":  # a floor for any exact path: the same blocks with unbiased attention
                        times["fast_without_relative_position_bias"] = without_relative_position_bias(
                            teacher, x, args.repeats
                        )
                median = {path: statistics.median(values) for path, values in times.items()}
                references.setdefault(name, maps["transformers"])
                results[f"{name}/{dtype_name}"] = {
                    "median_seconds": median,
                    "all_seconds": times,
                    "speedup_fast_over_transformers": median["transformers"] / median["fast"],
                    "max_relative_error_fast_vs_transformers": relative_error(maps["fast"], maps["transformers"]),
                    "max_relative_error_fast_vs_float32_transformers": relative_error(maps["fast"], references[name]),
                    # transformers' own rounding in this dtype, for comparison
                    "max_relative_error_transformers_vs_float32_transformers": relative_error(
                        maps["transformers"], references[name]
                    ),
                    "grid": list(maps["fast"][0].shape[-2:]),
                }
                row = results[f"{name}/{dtype_name}"]
                if "fast_without_relative_position_bias" in median:
                    row["speedup_bound_transformers_over_unbiased"] = (
                        median["transformers"] / median["fast_without_relative_position_bias"]
                    )
                print(
                    f"{name:7s} {dtype_name:9s} transformers {median['transformers']:7.2f} s   fast "
                    f"{median['fast']:7.2f} s   {row['speedup_fast_over_transformers']:.2f}x   max rel. error "
                    f"{row['max_relative_error_fast_vs_transformers']:.1e}; vs float32 transformers: fast "
                    f"{row['max_relative_error_fast_vs_float32_transformers']:.1e}, transformers "
                    f"{row['max_relative_error_transformers_vs_float32_transformers']:.1e}",
                    flush=True,
                )
                if "speedup_bound_transformers_over_unbiased" in row:
                    print(
                        f"{'':17s} fast without the relative-position bias "
                        f"{median['fast_without_relative_position_bias']:7.2f} s: an exact path is at most "
                        f"{row['speedup_bound_transformers_over_unbiased']:.2f}x faster than transformers",
                        flush=True,
                    )
            del committee
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.platform()}, {args.threads} threads (cores possibly shared)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python bench/teachers_forward.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "output"
        ),
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
