"""The data side of a run: the dataset and teachers a recipe names, resolved (ToyRooms and its specialists made once
under the cache), and each process's DataLoader of a split."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..data.loading import COLUMN_MAPPINGS, ImageStream, MultiTaskStream, load_multitask_split, task_columns
from ..data.toyrooms import OpenedRows
from ..data.transforms import MultiTaskTransform, stage1_transform
from ..teachers.specialists import ensure_specialists, ensure_toyrooms
from .recipe import Recipe


def resolve_data_and_teachers(recipe: Recipe, cache_dir: str, accelerator) -> tuple[str, dict[str, dict[str, Any]]]:
    """The dataset location (ToyRooms rendered or read from the cache) and the teacher specs of `SAKConfig.teachers`
    (`{name: {hidden_size, model_id, **options}}`; empty without teachers), made once (main process first)."""
    from ..teachers.committee import teacher_specs

    dataset = recipe.dataset
    if dataset == "toyrooms":
        toy = recipe.toyrooms
        with accelerator.main_process_first():
            dataset = str(
                ensure_toyrooms(cache_dir, toy["num_train"], toy["num_test"], tuple(recipe.image_size), toy["seed"])
            )
    teachers = recipe.teachers
    if teachers in (None, "none", {}):
        return dataset, {}
    if teachers == "toyrooms_specialists":
        if recipe.dataset != "toyrooms":
            raise ValueError("teachers 'toyrooms_specialists' need dataset 'toyrooms'; name Hub teachers instead")
        with accelerator.main_process_first():
            steps, rates = recipe.toyrooms["teacher_steps"], recipe.toyrooms.get("teacher_learning_rate", 1e-3)
            folders = ensure_specialists(dataset, cache_dir, steps, tuple(recipe.image_size), rates)
        teachers = {name: str(folder) for name, folder in folders.items()}
    if not isinstance(teachers, dict):
        raise ValueError(f"teachers={teachers!r} must map name -> Hub id / path, 'toyrooms_specialists' or 'none'")
    return dataset, teacher_specs(teachers)


def make_loader(recipe: Recipe, dataset: str, split: str, train: bool, tasks: list[str], accelerator, seed: int):
    """This process's DataLoader of a split. Not to be passed to `accelerator.prepare`: the stream reads this
    process's part itself, every row once per epoch across processes x workers (`SplitStream`)."""
    data = load_multitask_split(
        dataset,
        split,
        streaming=recipe.streaming,
        shuffle_buffer=recipe.shuffle_buffer if train and recipe.streaming else None,
        seed=seed,
    )
    if train and recipe.train_limit:
        limit = recipe.train_limit
        data = data.take(limit) if recipe.streaming else data.select(range(min(limit, len(data))))
    batch_size = recipe.per_device_train_batch_size if train else recipe.per_device_eval_batch_size
    split_args = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "batch_size": batch_size,
        "shuffle_seed": seed if train and not recipe.streaming else None,
    }
    columns = task_columns(data)  # may read a row of a stream: once
    if recipe.dataset == "toyrooms" and not recipe.streaming:  # small: its rows are opened once per process
        data = OpenedRows(data, dataset, split)
    if recipe.stage == 1 and not columns:  # images only: any Hub image dataset, e.g. ImageNet-1k
        transform = partial(stage1_transform, train, recipe.image_size[0], seed)
        stream = ImageStream(data, transform, train=train, **split_args)
    else:
        missing = [t for t in tasks if t not in columns] if dataset not in COLUMN_MAPPINGS else []
        if missing:
            raise ValueError(
                f"dataset {dataset!r} ({split}) has no column for the tasks {missing}; remove them from `tasks` or "
                "convert the data with `sak-prepare-dataset`"
            )
        transform = MultiTaskTransform(
            train=train,
            size=recipe.image_size,
            seed=seed,
            scale_range=recipe.scale_range,
            photometric=recipe.photometric,
        )
        stream = MultiTaskStream(data, transform, tasks, train=train, dataset_name=dataset, **split_args)
    # A DataLoader draws a seed whenever it starts iterating; from its own generator that draw leaves the global RNG
    # (noisy gating, restored on resume) untouched, so a resumed run continues the same random sequence.
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, collate_fn=stream.collate, num_workers=recipe.num_workers, generator=generator
    )
