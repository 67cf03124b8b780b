"""Examples per second of streaming + the reference training augmentation, with 0 and 2 DataLoader workers.

    python bench/data_throughput.py [--images 256] [--batch_size 8]

Two datasets in the package schema are rendered into a temporary folder (ToyRooms scenes, so nothing is
downloaded): NYUD-v2-sized 480 x 640 images cropped to 448 x 576, and ToyRooms-sized 96 x 128 images. Each is read
with `load_dataset(..., streaming=True)` through `MultiTaskStream` (decode, check, random scale / crop / flip /
photometric distortion, normalise, pad) into batches, timed from the first to the last batch. Results go to bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from modeling_sak.commands.prepare_dataset import make_toyrooms
from modeling_sak.data.loading import MultiTaskStream, load_multitask_split
from modeling_sak.data.transforms import MultiTaskTransform


TASKS = ["semseg", "normals", "edge", "depth"]


def throughput(folder: Path, crop: tuple[int, int], workers: int, batch_size: int) -> dict[str, float]:
    split = load_multitask_split(str(folder), "train", streaming=True, shuffle_buffer=16)
    stream = MultiTaskStream(split, MultiTaskTransform(train=True, size=crop), TASKS, train=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=stream.collate, num_workers=workers)
    # Timed from the first to the last batch (dataset resolution and worker start-up left out). datasets 5.x sleeps
    # a fixed 5 s (SLEEP_TIME_ON_THREADS_SHUTDOWN) when a shuffled multi-shard stream's source ends, once per pass:
    # reported separately, since it does not depend on the number of examples.
    stamps, count = [], 0
    for batch in loader:
        stamps.append(time.perf_counter())
        count += batch["pixel_values"].shape[0] if len(stamps) > 1 else 0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    stall = max(gaps) if gaps and max(gaps) > 2.0 else 0.0
    total = stamps[-1] - stamps[0]
    return {
        "steady": round(count / (total - stall), 1),
        "with_stall": round(count / total, 1),
        "stall_s": round(stall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images per dataset (split in 4 parquet shards)")
    parser.add_argument("--batch_size", type=int, default=8, help="DataLoader batch size")
    parser.add_argument("--output", default="bench/results/data_throughput.json", help="JSON results file")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"nyud_448x576": ((480, 640), (448, 576)), "toyrooms_96x128": ((96, 128), (96, 128))}
        for name, (size, crop) in settings.items():
            folder = Path(tmp) / name
            make_toyrooms(folder, args.images, 1, size, rows_per_shard=max(1, args.images // 4))
            for workers in (0, 2):
                result = results[f"{name}/workers={workers}"] = throughput(folder, crop, workers, args.batch_size)
                print(
                    f"{name:<18} workers={workers}: {result['steady']:7.1f} examples/s steady, "
                    f"{result['with_stall']:7.1f} with the end-of-pass stall of {result['stall_s']} s"
                )
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "command": f"python bench/data_throughput.py --images {args.images} --batch_size {args.batch_size}",
        "examples_per_second": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
