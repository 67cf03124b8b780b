"""What a training run leaves behind: `final/` (model, processor, card), `all_results.json`, the printed metric table
with Delta_m and router weights, and the pictures (`predictions.png`, `router_weights.png`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.toyrooms import CLASSES
from ..evaluation.pictures import prediction_grid, router_bar_chart
from ..evaluation.registry import MAIN_METRIC, delta_m
from ..model_card import render_model_card
from ..remote_code.image_processing_sak import SAKImageProcessor
from .lora import merge_lora, save_lora_adapter
from .recipe import Recipe


def metric_table(runs: dict[str, dict[str, Any]]) -> str:
    """Every metric of every run side by side (`*` marks each task's Delta_m metric), and Delta_m of the first run
    against the second when there are two."""
    names = list(runs)
    rows = [(task, metric) for task, values in runs[names[0]]["results"].items() for metric in values]
    width = max(len(f"{t} {m}") for t, m in rows) + 2
    lines = ["".join([f"{'metric':<{width}}"] + [f"{n:>14}" for n in names])]
    for task, metric in rows:
        marker = " *" if MAIN_METRIC.get(task) == metric else ""
        values = "".join(f"{runs[n]['results'][task][metric]:>14.4f}" for n in names)
        lines.append(f"{task + ' ' + metric + marker:<{width}}{values}")
    if len(names) == 2:
        gain = delta_m(runs[names[0]]["results"], runs[names[1]]["results"])
        lines.append(f"{'Delta_m (%)':<{width}}{gain:>14.2f}{0.0:>14.2f}   (* = metric used, vs {names[1]})")
    return "\n".join(lines)


def write_run_outputs(
    output_dir: Path,
    runs: dict[str, dict[str, Any]],
    recipe: Recipe,
    hub_model_id: str | None,
    print_fn: Callable[[str], None] = print,
) -> Path:
    """Write `final/` (LoRA merged, no aligners, no teachers; the image processor; a model card with the results),
    the LoRA adapter alone (`lora_adapter/`, when trained with LoRA), `all_results.json` and the pictures of the
    main run `runs["SAK"]`; print the metric table and router weights. Main process only. Returns `final/`."""
    run = runs["SAK"]
    model, config = run["model"], run["config"]
    final = output_dir / "final"
    save_lora_adapter(model, output_dir / "lora_adapter")  # with --lora: the adapter alone, peft's format
    merge_lora(model).save_pretrained(final)  # inference checkpoint: LoRA merged, no aligners, no teachers
    SAKImageProcessor(pad_size=config.image_size, size_divisor=config.patch_size[0]).save_pretrained(final)
    results: dict[str, Any] = {name: r["results"] for name, r in runs.items()}
    if len(runs) == 2:
        results["Delta_m_vs_baseline"] = delta_m(runs["SAK"]["results"], runs["baseline"]["results"])
    results |= {
        "loss_history": run["loss_history"],
        "lr_history": run["lr_history"],
        "skipped_rows": run["skipped_rows"],
    }
    if run["replicas"] is not None:
        results["replicas"] = run["replicas"]
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")

    if run["results"]:
        print_fn("\n" + metric_table(runs))
    router_picture = None
    if run["router_weights"] is not None:
        experts = ["stem", *config.teachers]
        print_fn("\nrouter weights (mean over test images and levels):")
        for task, weights in run["router_weights"].items():
            mean = weights.float().mean((0, 1)).tolist()
            print_fn(f"  {task:<8}" + "".join(f"  {e}={w:.2f}" for e, w in zip(experts, mean)))
        router_picture = router_bar_chart(run["router_weights"], experts, output_dir / "router_weights.png")
        shutil.copy(router_picture, final / "router_weights.png")
    if run["sample"] is not None:
        sample = run["sample"]
        prediction_grid(
            sample["pixel_values"],
            sample["labels"],
            sample["task_outputs"],
            output_dir / "predictions.png",
            config.tasks.get("semseg", len(CLASSES)),
        )
    parameters = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aligners."))
    card = render_model_card(
        config,
        hub_model_id or f"local/{output_dir.name}",
        run["results"],
        recipe.to_dict() | {"parameters": f"{parameters / 1e6:.2f}M"},
        recipe.dataset,
        "router_weights.png" if router_picture else None,
        base_model=[recipe.init_from, recipe.stem_model],
        dataset_split=recipe.eval_split or None,
    )
    card.save(final / "README.md")
    return final
