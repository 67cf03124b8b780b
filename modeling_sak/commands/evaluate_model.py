"""Evaluate a SAK checkpoint on a multi-task dataset split and print the paper's metrics.

    sak-evaluate --model PATH_OR_REPO --dataset NAME_OR_PATH [--split test]
        [--output_dir DIR] [--save_predictions N] [--baseline nyud_vitb|results.json]

The images are normalised and padded as the reference evaluation does (no resizing), predicted, and compared with
the labels over valid pixels. Metrics come from streaming sufficient statistics (see
`modeling_sak.evaluation`). To split the data over K processes, run it under
`accelerate launch --num_processes K [--cpu] -m modeling_sak.commands.evaluate_model ...` or
`torchrun --nproc_per_node K -m modeling_sak.commands.evaluate_model ...`: every statistic is an integer sum, so the numbers
equal the single-process ones exactly. Boundaries are scored with the paper's odsF (the authors' SEISM protocol:
radius-4 non-maximum suppression, 99 thresholds, one-to-one matching; `--boundary tolerance` for a quick
approximation). Writes
`DIR/metrics.json` and, with `--save_predictions N`, for the first N images `DIR/predictions/{id}_{task}.png` per
task, `DIR/predictions/{id}_grid.png`, and `DIR/predictions.png` (input, ground truth and prediction per task, one
row per image).
"""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModel

from ..cli import bad_input_exits, check_model_argument, looks_like_path
from ..data.loading import MultiTaskStream, load_multitask_split
from ..data.transforms import MultiTaskTransform
from ..evaluation.loop import evaluate, evaluation_mode
from ..evaluation.pictures import denormalize, prediction_grid, save_task_pictures
from ..evaluation.registry import BOUNDARY_KINDS, SINGLE_TASK_BASELINES, delta_m
from ..remote_code.image_processing_sak import SAKImageProcessor
from ..training.cpu_allocator import configure_cpu_allocator
from ..training.sharding import distributed_without_gpu


def save_predictions(model, stream: MultiTaskStream, count: int, output_dir: Path, device) -> None:
    """Pictures of the first `count` images, from eval-mode outputs: per-task PNGs and a grid per image, and one grid
    with ground truth."""
    batch = stream.collate(list(islice(stream, count)))
    with evaluation_mode(model):
        outputs = model(pixel_values=batch["pixel_values"].to(device))
    task_outputs = {task: value.float().cpu() for task, value in outputs.task_outputs.items()}
    tasks = dict(model.config.tasks)
    prediction_grid(
        batch["pixel_values"],
        batch["labels"],
        task_outputs,
        output_dir / "predictions.png",
        tasks.get("semseg", 40),
        rows=count,
    )
    boxes = batch.get("content_boxes")
    per_image = SAKImageProcessor().post_process_multi_task(task_outputs, content_boxes=boxes)
    for i, predictions in enumerate(per_image):
        image = denormalize(batch["pixel_values"][i])
        if boxes is not None:
            top, left, height, width = (int(v) for v in boxes[i])
            image = image[top : top + height, left : left + width]
        stem = str(batch["ids"][i] or f"image{i}").replace("/", "_").replace("\\", "_")
        save_task_pictures(image, predictions, output_dir / "predictions", stem, tasks, model.config.id2label)


def main(argv: list[str] | None = None) -> dict:
    """The command; a bad input ends in one `error:` line and exit status 2 (`modeling_sak.cli`)."""
    with bad_input_exits("sak-evaluate"):
        return _main(argv)


def _main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="sak-evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a SAK checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="a dataset in the package schema (Hub id or local folder)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--streaming", action="store_true", help="stream the split instead of reading it whole")
    parser.add_argument("--output_dir", default="outputs/evaluation", help="where metrics.json and pictures go")
    parser.add_argument("--save_predictions", type=int, default=0, metavar="N", help="draw the first N images")
    parser.add_argument(
        "--boundary",
        choices=BOUNDARY_KINDS,
        default="bsds",
        help="edge metric: bsds = the paper's odsF (default), tolerance = a quick approximation",
    )
    parser.add_argument(
        "--baseline",
        help="also report Delta_m against single-task results: "
        f"{' / '.join(SINGLE_TASK_BASELINES)} (the paper's) or a metrics.json of another run",
    )
    parser.add_argument(
        "--write_card",
        metavar="REPO_ID",
        help="also write MODEL/README.md: a model card for REPO_ID "
        "with these measurements (and the paper's numbers for released configurations); the base_model of the card "
        "it replaces is kept",
    )
    args = parser.parse_args(argv)
    configure_cpu_allocator()  # a loop of forwards: freed tensors stay mapped (same outputs)
    baseline = args.baseline
    if baseline and baseline not in SINGLE_TASK_BASELINES:
        if not Path(baseline).is_file():
            parser.error(f"--baseline {baseline}: neither {' / '.join(SINGLE_TASK_BASELINES)} nor a metrics.json file")
        baseline = json.loads(Path(baseline).read_text())
        baseline = baseline.get("metrics", baseline)

    check_model_argument(args.model)
    if args.dataset == "toyrooms" and not Path(args.dataset).is_dir():
        raise ValueError(
            "--dataset toyrooms: ToyRooms is rendered, not on the Hub (training renders it into its cache); render "
            "the default run's test set with `sak-prepare-dataset toyrooms --output_dir DIR` and pass --dataset DIR"
        )
    if looks_like_path(args.dataset) and not Path(args.dataset).expanduser().exists():
        raise FileNotFoundError(
            f"--dataset {args.dataset}: no such folder; give a folder in the package schema or a Hub id"
        )
    accelerator = Accelerator(cpu=distributed_without_gpu())
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(accelerator.device).eval()
    config = model.config
    split = load_multitask_split(args.dataset, args.split, streaming=args.streaming)
    stream = MultiTaskStream(
        split,
        MultiTaskTransform(train=False, size=config.image_size),
        list(config.tasks),
        train=False,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        dataset_name=args.dataset,
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=args.batch_size, collate_fn=stream.collate)
    results = evaluate(model, loader, accelerator, config, boundary=args.boundary)
    if baseline:
        results["Delta_m"] = {"percent": delta_m(results, baseline)}
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        saved = {
            "model": args.model,
            "dataset": args.dataset,
            "split": args.split,
            "processes": accelerator.num_processes,
            "metrics": results,
        }
        (output_dir / "metrics.json").write_text(json.dumps(saved, indent=2))
        print(f"{'task':<12}{'metric':<16}{'value':>10}")
        for task, values in results.items():
            for metric, value in values.items():
                print(f"{task:<12}{metric:<16}{value:>10.4f}")
        if args.save_predictions:
            save_predictions(model, stream, args.save_predictions, output_dir, accelerator.device)
        print(f"wrote {output_dir / 'metrics.json'}")
        if args.write_card:
            from huggingface_hub import ModelCard

            from ..model_card import render_model_card

            card_path = Path(args.model) / "README.md"
            # The weights' origin is not known here: keep what the card being replaced said (training wrote it).
            base_model = ModelCard.load(card_path).data.base_model if card_path.is_file() else None
            recipe = {"evaluated_on": f"{args.dataset} ({args.split})"}
            render_model_card(
                config, args.write_card, results, recipe, args.dataset, base_model=base_model, dataset_split=args.split
            ).save(card_path)
            print(f"wrote {Path(args.model) / 'README.md'}")
    return results


def console_main() -> None:
    """`sak-evaluate`: `main` without its return value (a console script's return value is its exit status)."""
    main()


if __name__ == "__main__":
    console_main()
