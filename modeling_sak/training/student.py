"""The student of a run: its `SAKConfig` from a recipe and the resolved teachers, the model built from it (stem,
`init_from` weights, LoRA, freezing), and the matching-weights loader."""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging

from ..data.schema import read_id2label
from ..remote_code.configuration_sak import SAKConfig
from ..remote_code.modeling_sak import SAKForMultiTask, resize_position_embeddings
from .lora import apply_lora
from .recipe import Recipe


logger = logging.get_logger(__name__)


def task_weights(recipe: Recipe) -> dict[str, float]:
    """The loss weights of the recipe's tasks: `--tasks semseg=40 depth=1` keeps the default weights of those two and
    drops the others' (every task has one: `Recipe` checks it)."""
    return {task: weight for task, weight in recipe.task_loss_weights.items() if task in recipe.tasks}


def config_arguments(recipe: Recipe) -> dict[str, Any]:
    """The `SAKConfig` arguments a recipe gives directly: all but the stem and the teachers (`build_config`, and
    `preflight.check_recipe` before any teacher is resolved)."""
    return {
        "image_size": recipe.image_size,
        "down_ratio": recipe.down_ratio,
        "router_type": recipe.router_type,
        "noisy_gating": recipe.noisy_gating,
        "tasks": {} if recipe.stage == 1 else recipe.tasks,
        "task_loss_weights": None if recipe.stage == 1 else task_weights(recipe),
        "distill_alpha": recipe.distill_alpha,
        "distill_loss_type": recipe.distill_loss_type,
        "head_implementation": recipe.head_implementation,
    }


def build_config(recipe: Recipe, teachers: dict[str, dict[str, Any]], dataset: str | None = None) -> SAKConfig:
    """The student's `SAKConfig` from a recipe and resolved teacher specs (`teachers.student_config`: aligners where a
    teacher's width differs from the stem's); its semseg classes are named by the `dataset` (local folder or Hub id)
    when it ships `id2label.json` (see `label_names_from_data`)."""
    from transformers import AutoConfig

    from ..teachers.committee import student_config

    stem = AutoConfig.from_pretrained(recipe.stem_model) if recipe.stem_model else recipe.stem
    config = student_config(
        stem,
        teachers,
        **config_arguments(recipe),
    )
    return label_names_from_data(config, dataset) if dataset else config


def label_names_from_data(config: SAKConfig, dataset: str) -> SAKConfig:
    """Name the semseg classes of `config` (`id2label`, used by the saved model's image-segmentation pipeline) by the
    `id2label.json` the dataset ships (`prepare_dataset` writes it); kept as they are when the dataset has none, or
    names another number of classes, or the file cannot be read (a warning says why)."""
    if "semseg" not in config.tasks:
        return config
    try:
        names = read_id2label(dataset)
    except Exception as error:  # offline without a cached copy, unreadable file: the names are optional
        logger.warning(f"semseg class names of {dataset!r} not read ({type(error).__name__}: {error})")
        return config
    if names is None:
        return config
    if len(names) != config.tasks["semseg"]:
        logger.warning(
            f"{dataset!r} names {len(names)} semseg classes but the model has {config.tasks['semseg']}; "
            "the class names are left as they are"
        )
        return config
    config.id2label, config.label2id = names, {name: index for index, name in names.items()}
    return config


def build_model(config: SAKConfig, recipe: Recipe) -> SAKForMultiTask:
    """A new student (stem from `stem_model` when given), then `init_from` weights and the freezing options."""
    if recipe.stem_model:
        model = SAKForMultiTask.from_stem_pretrained(recipe.stem_model, config=config)
    else:
        model = SAKForMultiTask(config)
    if recipe.init_from:
        report = load_matching_weights(model, recipe.init_from)
        if int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per process
            logger.warning(
                f"init_from {recipe.init_from}: loaded {report['loaded']} tensors ({report['resized']} position "
                f"embeddings resized); newly initialised: {report['new'][:10]}{' ...' if len(report['new']) > 10 else ''}"
            )
    if recipe.lora:
        model = apply_lora(model, recipe.lora)
    if recipe.gradient_checkpointing:  # each SAKStemLayer recomputed in backward (same gradients)
        model.activation_checkpointing_enable({"use_reentrant": False})
    if recipe.freeze_stem:
        model.stem.requires_grad_(False)
    if recipe.train_only_routers:
        if model.routers is None:
            raise ValueError("train_only_routers needs router_type 'mor' and teachers")
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("routers.")
    return model


def student_structure(config: SAKConfig, recipe: Recipe) -> SAKForMultiTask:
    """A new student of the modules `build_model` makes (LoRA layers included), without loading any weights: what
    `sharding.gather_student` fills with a sharded run's state."""
    model = SAKForMultiTask(config)
    return apply_lora(model, recipe.lora) if recipe.lora else model


def load_matching_weights(model: SAKForMultiTask, path_or_repo: str) -> dict[str, Any]:
    """Copy every tensor of a SAK checkpoint whose name and shape match (position embeddings resized)."""
    source = SAKForMultiTask.from_pretrained(path_or_repo).state_dict()
    target = model.state_dict()
    loaded, resized, new = {}, 0, []
    for key, value in target.items():
        if key not in source:
            new.append(key)
        elif source[key].shape == value.shape:
            loaded[key] = source[key]
        elif key.endswith("position_embeddings"):
            old_cfg = SAKConfig.from_pretrained(path_or_repo)
            loaded[key] = resize_position_embeddings(source[key], old_cfg.grid_size, model.config.grid_size)
            resized += 1
        else:
            new.append(key)
    model.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "resized": resized, "new": new}
