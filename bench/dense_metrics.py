"""Time the dense metrics on NYUD-sized predictions: 100 images of 448 x 576, the four NYUD-v2 tasks.

    python bench/dense_metrics.py [--images 100] [--batch 4] [--boundary]

Random model-like outputs (40 semseg logits, 3 normal channels, 1 depth channel; boundary logits with --boundary)
and labels with ignored pixels go through `make_metrics` batch by batch, exactly as `evaluate_model` feeds them.
Reports seconds per task for the whole set and the size of the accumulated state; results go to
bench/results/dense_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from modeling_sak.evaluation.registry import make_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="number of 448 x 576 predictions")
    parser.add_argument("--batch", type=int, default=4, help="images per update, as an evaluation batch")
    parser.add_argument("--boundary", action="store_true", help="also time the BSDS boundary odsF (slow: ~2 s/image)")
    parser.add_argument("--output", default="bench/results/dense_metrics.json", help="where the JSON goes")
    args = parser.parse_args()

    tasks = {"semseg": 40, "normals": 3, "depth": 1} | ({"edge": 1} if args.boundary else {})
    metrics = make_metrics(tasks)
    generator = torch.Generator().manual_seed(0)
    seconds = dict.fromkeys(tasks, 0.0)
    for start in range(0, args.images, args.batch):
        n = min(args.batch, args.images - start)
        shape = (n, 448, 576)
        semseg = torch.randint(0, 40, shape, generator=generator)
        semseg[:, :16] = 255
        labels = {
            "semseg": semseg,
            "normals": torch.nn.functional.normalize(torch.randn(n, 3, *shape[1:], generator=generator), dim=1),
            "depth": torch.rand(n, 1, *shape[1:], generator=generator) * 9 + 0.5,
            "edge": (torch.rand(n, 1, *shape[1:], generator=generator) > 0.97).float(),
        }
        predictions = {
            "semseg": torch.randn(n, 40, *shape[1:], generator=generator),
            "normals": labels["normals"] + 0.3 * torch.randn(n, 3, *shape[1:], generator=generator),
            "depth": labels["depth"] + torch.randn(n, 1, *shape[1:], generator=generator),
            "edge": torch.randn(n, 1, *shape[1:], generator=generator),
        }
        for task, metric in metrics.items():
            began = time.perf_counter()
            metric.update(predictions[task], labels[task])
            seconds[task] += time.perf_counter() - began
    state_bytes = {t: sum(v.numel() * v.element_size() for v in m.state().values()) for t, m in metrics.items()}
    result = {
        "date": str(date.today()),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": "python bench/dense_metrics.py" + (" --boundary" if args.boundary else ""),
        "images": args.images,
        "size": [448, 576],
        "seconds": {task: round(value, 2) for task, value in seconds.items()},
        "seconds_dense_total": round(sum(v for t, v in seconds.items() if t != "edge"), 2),
        "state_bytes": state_bytes,
        "results": {task: metric.compute() for task, metric in metrics.items()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "seconds_dense_total", "state_bytes")}, indent=2))


if __name__ == "__main__":
    main()
