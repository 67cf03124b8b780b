"""Seconds per 480 x 640 image of the paper's boundary odsF (modeling_sak.evaluation.boundaries), by stage.

    python bench/boundary_odsf.py [--images 4] [--height 480] [--width 640] [--workers 1 2] [--seed 0]

Ground truth: the inner boundaries of a few random rectangles and ellipses (nothing is downloaded). Two kinds of
prediction per image:

- realistic: the ground truth blurred, weakened on some shapes, shifted by up to a pixel, plus weaker edges of
  distractor shapes and a little Gaussian noise, blurred again;
- noisy: a deliberately hard map, half a blurred ground truth and half uniform noise (every pixel in (0, 1), so
  the lowest thresholds keep most NMS survivors).

Each map goes through the full protocol of the authors' SEISM fork: crop, 8-bit prediction PNG, radius-1
pre-smoothing, radius-4 NMS, 8-bit NMS PNG, ground truth seg2bmap + thinning, then the 99 thresholds 0.01 ... 0.99
(binarise, thin, match). Stage times (NMS with its smoothing and 8-bit steps, thinning, matching) come from a
single-process run of `boundary_counts`; wall times per image come from `BoundaryODSMetric.update` with 1 and 2
worker processes, for a batch of all images (parallel over images) and for a single image (parallel over threshold
subsets). The pool's start-up is timed separately. The machine's load average is recorded before and after: time
only on an otherwise idle machine. Results go to bench/results/boundary_odsf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import scipy
import skimage
import torch
from scipy.ndimage import gaussian_filter, shift
from skimage.draw import ellipse, rectangle
from skimage.segmentation import find_boundaries

from modeling_sak.evaluation.boundaries import SEISM_THRESHOLDS, BoundaryODSMetric, boundary_counts


def random_shapes(rng: np.random.Generator, height: int, width: int, shapes: int) -> np.ndarray:
    """A label map of overlapping random rectangles and rotated ellipses (0 = background)."""
    labels = np.zeros((height, width), dtype=np.int32)
    for k in range(1, shapes + 1):
        if rng.random() < 0.5:
            start = (rng.integers(0, height - 40), rng.integers(0, width - 40))
            extent = (rng.integers(30, height // 2), rng.integers(30, width // 2))
            rows, cols = rectangle(start, extent=extent, shape=(height, width))
        else:
            center = (rng.integers(0, height), rng.integers(0, width))
            radii = (rng.integers(20, height // 3), rng.integers(20, width // 3))
            rows, cols = ellipse(*center, *radii, shape=(height, width), rotation=rng.uniform(0, np.pi))
        labels[rows, cols] = k
    return labels


def realistic_prediction(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Blurred, partly weakened, slightly shifted boundaries plus weaker distractor edges and noise."""
    strength = rng.uniform(0.3, 1.0, labels.max() + 1)
    boundary = find_boundaries(labels, mode="inner") * strength[labels]
    distractors = find_boundaries(random_shapes(rng, *labels.shape, 4), mode="inner") * 0.35
    prediction = gaussian_filter(shift(boundary, rng.uniform(-1, 1, 2), order=1) + distractors, 1.5)
    prediction = prediction / prediction.max() + rng.normal(0, 0.03, labels.shape)
    return np.clip(gaussian_filter(prediction, 0.7), 0, 1)


def noisy_prediction(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """Half a blurred ground truth, half uniform noise."""
    blurred = gaussian_filter(gt.astype(np.float64), 1.0)
    return 0.5 * blurred / blurred.max() + 0.5 * rng.random(gt.shape)


def f_measure(counts: np.ndarray) -> tuple[float, float]:
    precision = counts[0] / np.maximum(counts[1], 1)
    recall = counts[2] / np.maximum(counts[3], 1)
    f = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return round(float(f.max()) * 100, 2), int(f.argmax())


def serial_stages(maps: list[np.ndarray], gts: list[np.ndarray], thresholds) -> dict:
    """Mean seconds per image and per stage with one process, and the odsF of the summed counts."""
    timings, counts = {}, 0
    start = time.perf_counter()
    for probability, gt in zip(maps, gts):
        counts = counts + boundary_counts(probability, gt, thresholds=thresholds, timings=timings)
    total = time.perf_counter() - start
    ods, best = f_measure(counts)
    return {
        "seconds_per_image": round(total / len(maps), 3),
        "stages_seconds_per_image": {k: round(v / len(maps), 3) for k, v in timings.items()},
        "odsF": ods,
        "ods_threshold": float(thresholds[best]),
        "predicted_pixels_at_lowest_threshold_per_image": int(counts[1, 0]) // len(maps),
        "ground_truth_pixels_per_image": int(counts[3, 0]) // len(maps),
    }


def metric_wall(maps: list[np.ndarray], gts: list[np.ndarray], workers: int) -> dict:
    """Wall seconds per image through BoundaryODSMetric.update: a batch of all images, then a single image."""
    probabilities = torch.from_numpy(np.stack(maps)[:, None]).float()
    labels = torch.from_numpy(np.stack(gts)[:, None])
    metric = BoundaryODSMetric(num_workers=workers, from_logits=False)  # the maps are probabilities
    pool_start = 0.0
    if workers > 1:
        start = time.perf_counter()
        metric.update(probabilities[:1, :, :32, :32], labels[:1, :, :32, :32])  # starts the pool
        pool_start = time.perf_counter() - start
        metric.counts.zero_()
    start = time.perf_counter()
    metric.update(probabilities, labels)
    batch = time.perf_counter() - start
    start = time.perf_counter()
    metric.update(probabilities[:1], labels[:1])
    single = time.perf_counter() - start
    metric.close()
    return {
        "pool_start_s": round(pool_start, 3),
        "batch_seconds_per_image": round(batch / len(maps), 3),
        "single_image_seconds": round(single, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="synthetic images per prediction kind")
    parser.add_argument("--height", type=int, default=480, help="image height in pixels")
    parser.add_argument("--width", type=int, default=640, help="image width in pixels")
    parser.add_argument("--shapes", type=int, default=8, help="random rectangles / ellipses per ground-truth map")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts for the metric runs")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic maps")
    parser.add_argument("--output", default="bench/results/boundary_odsf.json", help="JSON results file")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    label_maps = [random_shapes(rng, args.height, args.width, args.shapes) for _ in range(args.images)]
    gts = [find_boundaries(labels, mode="inner").astype(np.uint8) for labels in label_maps]
    kinds = {
        "realistic": [realistic_prediction(rng, labels) for labels in label_maps],
        "noisy": [noisy_prediction(rng, gt) for gt in gts],
    }
    load_before = os.getloadavg()
    results = {}
    for kind, maps in kinds.items():
        result = results[kind] = {"seism_99": serial_stages(maps, gts, SEISM_THRESHOLDS)}
        for workers in args.workers:
            result[f"seism_99_metric_workers={workers}"] = metric_wall(maps, gts, workers)
        serial = result["seism_99"]
        print(
            f"{kind:<9} 99 thresholds: {serial['seconds_per_image']:.2f} s/image serial "
            f"(stages {serial['stages_seconds_per_image']}), odsF {serial['odsF']}"
        )
        for workers in args.workers:
            wall = result[f"seism_99_metric_workers={workers}"]
            print(
                f"{'':<9} metric, {workers} worker(s): {wall['batch_seconds_per_image']:.2f} s/image in a batch of "
                f"{args.images}, {wall['single_image_seconds']:.2f} s for a single image "
                f"(pool start {wall['pool_start_s']:.2f} s)"
            )
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": {
            "torch": torch.__version__,
            "scipy": scipy.__version__,
            "skimage": skimage.__version__,
            "numpy": np.__version__,
        },
        "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "load_average_1_5_15_min": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "command": "python " + " ".join(sys.argv),
        "image_size": [args.height, args.width],
        "images_per_kind": args.images,
        "protocol": "authors' SEISM fork: 8-bit PNG, convTri 1, NMS radius 4 / border 5 / 1.01, 8-bit NMS PNG, "
        "99 thresholds (>=), seg2bmap + thin ground truth, maxDist 0.011",
        "previous": "METRICS_VERSION 2 (radius-1 NMS, 101 thresholds, direct ground truth), 2026-11-22: realistic "
        "2.28 s/image serial (odsF 84.07), noisy 5.01 s/image (odsF 92.33)",
        "reference": "pyEdgeEval 0.2.8 on these machines (METRICS-NOTES): 3-17 s per 480x640 image with 9 "
        "thresholds, 107-218 s with 101 thresholds on a noisy map",
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
