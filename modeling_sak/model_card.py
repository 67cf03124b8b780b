"""Render SAK model pages from `hub_cards/` with `huggingface_hub.ModelCard`, with a validated `model-index`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .remote_code.tasks_sak import TASK_PRESETS, TASKS


def hub_cards_dir() -> Path:
    """hub_cards/ of the source tree, or where `pip install` put it (setup.cfg data_files)."""
    for candidate in (Path(__file__).resolve().parents[1] / "hub_cards", Path(sys.prefix) / "hub_cards"):
        if (candidate / "sak_model_card.md").is_file():
            return candidate
    raise FileNotFoundError("hub_cards/sak_model_card.md not found; reinstall sak-hf")


# The model-index names of the metrics a card reports: each task's main metric (the task table's), and the quick
# tolerance-based boundary F of `--eval_boundary tolerance` runs.
METRIC_NAMES = {(task, spec.main_metric): spec.metric_name for task, spec in TASKS.items()} | {
    ("edge", "odsF_tol"): "boundary F (tolerance)"
}


# DESIGN section 3: the paper's numbers for the released configurations, shown beside measured ones.
REPORTED = {
    ("nyud_v2", 768): {
        "semseg mIoU": 59.93,
        "depth RMSE": 0.4942,
        "normals mean error": 17.60,
        "boundary odsF": 78.60,
        "Delta_m vs single-task": 11.11,
    },
    ("nyud_v2", 1024): {
        "semseg mIoU": 63.18,
        "depth RMSE": 0.4313,
        "normals mean error": 16.25,
        "boundary odsF": 79.43,
        "Delta_m vs single-task": 14.05,
    },
    ("pascal_context", 1024): {
        "semseg mIoU": 84.01,
        "human_parts mIoU": 76.99,
        "saliency maxF": 84.65,
        "normals mean error": 13.82,
        "boundary odsF": 76.27,
        "Delta_m vs single-task": 2.30,
    },
}


def reported_table(config) -> str:
    """The authors' numbers for this configuration (NYUD-v2 ViT-B/L, PASCAL-Context ViT-L), or an empty string."""
    preset = next((name for name, p in TASK_PRESETS.items() if p["tasks"] == dict(config.tasks)), None)
    numbers = REPORTED.get((preset, config.hidden_size))
    if not numbers:
        return ""
    rows = "\n".join(f"| {name} | {value} | reported by the authors (ICLR 2025) |" for name, value in numbers.items())
    return "| metric | value | source |\n| --- | ---: | --- |\n" + rows


def results_table(results: dict[str, dict[str, float]], source: str = "measured with this package") -> str:
    rows = [
        f"| {task} | {metric} | {value:.4g} | {source} |"
        for task, values in results.items()
        for metric, value in values.items()
    ]
    return "| task | metric | value | source |\n| --- | --- | ---: | --- |\n" + "\n".join(rows)


def hub_repo_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it names a Hub repo, else None.

    A Hub id is "namespace/name" (`huggingface_hub.utils.validate_repo_id`) that is not an existing local path; a
    single name such as "toyrooms" (the package's offline dataset) or any filesystem path is not, and is named in the
    card text only, never in its metadata.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name_or_path or name_or_path.count("/") != 1 or Path(name_or_path).expanduser().exists():
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def pipeline_tag_for(tasks) -> str:
    """The Hub `pipeline_tag` of a SAK with these tasks: the stock transformers pipeline it serves ("image-segmentation"
    with semseg, else "depth-estimation" with depth, else "image-feature-extraction")."""
    if "semseg" in tasks:
        return "image-segmentation"
    if "depth" in tasks:
        return "depth-estimation"
    return "image-feature-extraction"


def _local_dataset_name(dataset: str) -> str:
    """A display name for data that is not on the Hub: the `pretty_name` of the folder's dataset card (as written by
    `prepare_dataset`), else the folder's name; never the path."""
    from huggingface_hub import DatasetCard

    if dataset == "toyrooms":
        return "ToyRooms"
    card = Path(dataset).expanduser() / "README.md"
    if card.is_file():
        pretty_name = DatasetCard.load(card).data.get("pretty_name")
        if pretty_name:
            return str(pretty_name)
    return Path(dataset).name or "local dataset"


def _describe_dataset(dataset: str, hub_id: str | None, name: str) -> str:
    if hub_id:
        return f"[`{hub_id}`](https://huggingface.co/datasets/{hub_id})"
    if dataset == "toyrooms":
        return "ToyRooms, rendered offline by `sak-prepare-dataset toyrooms` (not on the Hub)"
    return f"{name}, the local folder `{dataset}` (not on the Hub)"


def _describe_origins(origins: list[str]) -> str:
    if not origins:
        return "random initialisation"
    return "; ".join(
        f"[`{o}`](https://huggingface.co/{o})" if hub_repo_id(o) else f"`{o}` (local, not on the Hub)" for o in origins
    )


def render_model_card(
    config,
    repo_id: str,
    results: dict[str, dict[str, float]],
    recipe: dict[str, Any],
    dataset_name: str,
    router_picture: str | None = None,
    limitations: str = "Trained on the data named above only; check the evaluation before use on other domains.",
    *,
    base_model: str | list[str | None] | None = None,
    dataset_split: str | None = None,
) -> ModelCard:
    """A model card for a SAK checkpoint: usage, model, recipe, results (also as model-index), limitations.

    Args:
        config: the checkpoint's `SAKConfig` (tasks, stem, teachers).
        repo_id: the Hub repo the card is for ("org/name").
        results: `{task: {metric: value}}`; each task's main metric (and the boundary F of tolerance runs) becomes
            one model-index result per task, typed by the task table's `hub_task_type`.
        recipe: shown as YAML in the card text (may name local paths).
        dataset_name: the evaluation/training data as the run named it: a Hub dataset id (then in `datasets:` and
            the model-index `dataset.type`), a local folder or "toyrooms" (then named in the text only; the
            model-index names it by its dataset card's `pretty_name` with `dataset.type` "parquet", the `datasets`
            builder that reads it).
        base_model: the checkpoints the weights started from, nearest first (e.g. `[init_from, stem_model]`); the
            first Hub id among them becomes `base_model`, all are named in the text.
        dataset_split: the split the results were measured on (model-index `dataset.split`).

    Raises:
        ValueError: when the rendered model-index does not hold every result.
    """
    origins = [base_model] if isinstance(base_model, str) else [o for o in base_model or [] if o]
    hub_base = next((o for o in origins if hub_repo_id(o)), None)
    hub_dataset = hub_repo_id(dataset_name)
    shown_name = hub_dataset or _local_dataset_name(dataset_name)
    eval_results = [
        EvalResult(
            task_type=TASKS[task].hub_task_type,
            task_name=TASKS[task].hub_task_type.replace("-", " ").capitalize(),
            dataset_type=hub_dataset or "parquet",
            dataset_name=shown_name,
            dataset_split=dataset_split or None,
            metric_type=METRIC_NAMES[(task, metric)].lower().replace(" ", "_"),
            metric_name=METRIC_NAMES[(task, metric)],
            metric_value=round(float(value), 4),
        )
        for task, values in results.items()
        for metric, value in values.items()
        if (task, metric) in METRIC_NAMES
    ]
    task_tags = [TASKS[task].hub_task_type for task in config.tasks if task in TASKS]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag_for(config.tasks),
        tags=list(
            dict.fromkeys(["sak", "multi-task", *task_tags] + (["knowledge-distillation"] if config.teachers else []))
        ),
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=hub_base,
        license="apache-2.0",
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    stem = config.stem_config
    card = ModelCard.from_template(
        card_data,
        template_path=str(hub_cards_dir() / "sak_model_card.md"),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        tasks=list(config.tasks),
        task_channels=", ".join(f"{t} ({c})" for t, c in config.tasks.items()),
        stem=f"{stem.model_type}, width {stem.hidden_size}, {stem.num_hidden_layers} blocks, patch {stem.patch_size}",
        origins=_describe_origins(origins),
        teachers=", ".join(
            f"{n} ({s.get('model_id') or 'width ' + str(s['hidden_size'])})" for n, s in config.teachers.items()
        )
        or "none (multi-task baseline)",
        image_size=f"{config.image_size[0]} x {config.image_size[1]}",
        parameters=recipe.get("parameters", "-"),
        dataset=_describe_dataset(dataset_name, hub_dataset, shown_name)
        + (f", split `{dataset_split}`" if dataset_split else ""),
        recipe_yaml=yaml.safe_dump({k: v for k, v in recipe.items() if k != "parameters"}, sort_keys=False).strip(),
        results_table=results_table(results) if results else "No evaluation was run for this checkpoint.",
        reported_table=reported_table(config),
        router_picture=router_picture,
        limitations=limitations,
    )
    validate_model_index(card, len(eval_results))
    return card


def validate_model_index(card: ModelCard, expected: int) -> None:
    """Offline check that the card's YAML parses and its `model-index` holds every result (the Hub's own validation
    needs a network call)."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    metadata = yaml.safe_load(str(card).split("---")[1])
    if expected == 0:
        return
    _, results = model_index_to_eval_results(metadata.get("model-index", []))
    if len(results) != expected or any(r.metric_value is None for r in results):
        raise ValueError(f"model card model-index holds {len(results)} valid results, expected {expected}")
