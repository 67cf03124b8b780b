"""One distillation term against a taller teacher grid: SAK's chunked loss against the resize-then-loss composition.

    python bench/distillation_loss.py [--threads 2] [--repeats 20] [--student_grid 14x18] [--teacher_grid 64x64]

The shapes of one SAM-B level in a ViT-B/16 stage-2 step at 224 x 288, batch 2: student `(2, 768, 14, 18)` seen from
tokens (as `SAKForMultiTask._student_features` makes it), a bf16 channels-last teacher `(2, 768, 64, 64)` (as the
fast teacher path returns SAM's). Variants, alternated `--repeats` times after a warm-up, forward + backward each:
- `composition`: the reference's order (`flops.reference_distillation_loss`: the student resized with
  `F.interpolate`, then `F.cosine_embedding_loss` of the flattened maps + `F.smooth_l1_loss`);
- `sak`: `modeling_sak.remote_code.losses.distillation_loss` ([`upsampled_distillation_loss`]).
Medians and the largest relative difference of the two losses go to bench/results/distillation_loss.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from flops import reference_distillation_loss
from speed import machine_info

from modeling_sak.remote_code.losses import distillation_loss


def parse_grid(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward + backward runs per variant")
    parser.add_argument("--student_grid", type=parse_grid, default=(14, 18), help="hxw of the student map")
    parser.add_argument("--teacher_grid", type=parse_grid, default=(64, 64), help="HxW of the teacher map")
    parser.add_argument("--channels", type=int, default=768, help="channels of both maps")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument("--output", default="bench/results/distillation_loss.json", help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    (h, w), (height, width), channels = args.student_grid, args.teacher_grid, args.channels
    tokens = torch.randn(args.batch, h * w, channels, generator=generator, requires_grad=True)
    teacher = torch.randn(args.batch, height, width, channels, generator=generator).to(torch.bfloat16)
    teacher = teacher.permute(0, 3, 1, 2)  # channels-last, as SAM's tokens are row-major
    variants = {"composition": reference_distillation_loss, "sak": distillation_loss}

    def run(loss_function) -> tuple[float, float]:
        start = time.perf_counter()
        loss = loss_function(tokens.transpose(1, 2).reshape(args.batch, channels, h, w), teacher)
        loss.backward()
        tokens.grad = None
        return time.perf_counter() - start, loss.item()

    seconds = {name: [] for name in variants}
    values = {}
    for function in variants.values():
        run(function)  # warm-up
    for _ in range(args.repeats):
        for name, function in variants.items():
            elapsed, values[name] = run(function)
            seconds[name].append(elapsed)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "bench/distillation_loss.py",
        "machine": machine_info(args.threads),
        "student": [args.batch, channels, h, w],
        "teacher": [args.batch, channels, height, width],
        "median_ms": {name: 1e3 * value for name, value in medians.items()},
        "sak_ratio_to_composition": medians["sak"] / medians["composition"],
        "loss_relative_difference": abs(values["sak"] - values["composition"]) / abs(values["composition"]),
    }
    for name, value in medians.items():
        print(f"{name:12s} {1e3 * value:8.1f} ms forward + backward")
    print(f"sak / composition: {results['sak_ratio_to_composition']:.2f}x")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
