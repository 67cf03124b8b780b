"""Evaluate a SAK checkpoint on a multi-task dataset split and print the paper's metrics.

    python -m modeling_sak.evaluate_model --model PATH_OR_REPO --dataset NAME_OR_PATH [--split test]
        [--output_dir DIR] [--save_predictions N]

The images are normalised and padded as the reference evaluation does (no resizing), predicted, and compared with
the labels over valid pixels. Metrics come from streaming sufficient statistics (see
`modeling_sak.evaluation.metrics`); run it under `accelerate launch --num_processes K` to split the data over
processes: the summed statistics give exactly the single-process numbers. Writes `DIR/metrics.json` and, with
`--save_predictions N`, `DIR/predictions.png` (input, ground truth and prediction per task for the first N images).
"""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModel

from .data.loading import MultiTaskStream, load_multitask_split
from .data.transforms import MultiTaskTransform
from .evaluation.pictures import prediction_grid
from .training import evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m modeling_sak.evaluate_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="a SAK checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="a dataset in the package schema (Hub id or local folder)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--streaming", action="store_true", help="stream the split instead of reading it whole")
    parser.add_argument("--output_dir", default="outputs/evaluation", help="where metrics.json and pictures go")
    parser.add_argument("--save_predictions", type=int, default=0, metavar="N", help="draw the first N images")
    parser.add_argument("--write_card", metavar="REPO_ID", help="also write MODEL/README.md: a model card for REPO_ID "
                        "with these measurements (and the paper's numbers for released configurations)")  # fmt: skip
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(accelerator.device).eval()
    config = model.config
    split = load_multitask_split(args.dataset, args.split, streaming=args.streaming)
    stream = MultiTaskStream(split, MultiTaskTransform(train=False, size=config.image_size), list(config.tasks),
                             train=False, rank=accelerator.process_index, world_size=accelerator.num_processes,
                             dataset_name=args.dataset)  # fmt: skip
    loader = torch.utils.data.DataLoader(stream, batch_size=args.batch_size, collate_fn=stream.collate)
    results = evaluate(model, loader, accelerator, config)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps({"model": args.model, "dataset": args.dataset,
                                                             "split": args.split, "metrics": results}, indent=2))  # fmt: skip
        print(f"{'task':<12}{'metric':<16}{'value':>10}")
        for task, values in results.items():
            for metric, value in values.items():
                print(f"{task:<12}{metric:<16}{value:>10.4f}")
        if args.save_predictions:
            batch = stream.collate(list(islice(stream, args.save_predictions)))
            with torch.no_grad():
                outputs = model(pixel_values=batch["pixel_values"].to(accelerator.device))
            prediction_grid(batch["pixel_values"], batch["labels"], {k: v.cpu() for k, v in outputs.task_outputs.items()},
                            output_dir / "predictions.png", config.tasks.get("semseg", 40), rows=args.save_predictions)  # fmt: skip
        print(f"wrote {output_dir / 'metrics.json'}")
        if args.write_card:
            from .model_card import render_model_card

            recipe = {"evaluated_on": f"{args.dataset} ({args.split})"}
            render_model_card(config, args.write_card, results, recipe, args.dataset).save(
                Path(args.model) / "README.md"
            )
            print(f"wrote {Path(args.model) / 'README.md'}")
    return results


if __name__ == "__main__":
    main()
