"""What a recipe is checked against before any work starts (`check_recipe`): the student's config, readable stem
and teachers, the dataset, and an output folder that does not already hold a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cli import looks_like_path
from ..remote_code.configuration_sak import SAKConfig
from .checkpoints import RUN_FILES, checkpoint_dirs, resolve_checkpoint
from .recipe import Recipe
from .student import config_arguments


def check_recipe(recipe: Recipe, resume: str | None = None, overwrite_output_dir: bool = False) -> None:
    """Everything about a recipe that can be checked before any work (rendering, downloading, training), after the
    values themselves (`Recipe`): the student's config (stem depth vs output levels, widths, tasks), a `stem_model`
    and Hub teachers readable (offline: from the cache), the dataset and `init_from` present, ToyRooms' tasks, and
    an `output_dir` that already holds a run (not resumed). Raises ValueError / FileNotFoundError naming the key,
    the value and the fix."""
    from transformers import AutoConfig

    from ..data.toyrooms import CLASSES
    from ..teachers.committee import teacher_specs

    for key in ("stem_model", "init_from"):
        value = getattr(recipe, key)
        if value and looks_like_path(value) and not Path(value).expanduser().is_dir():
            raise FileNotFoundError(f"{key}={value!r}: no such folder; give a checkpoint folder or a Hub id")
    stem = recipe.stem
    if recipe.stem_model:
        try:
            stem = AutoConfig.from_pretrained(recipe.stem_model)
        except (OSError, ValueError) as error:
            raise ValueError(f"stem_model={recipe.stem_model!r} cannot be read: {error}") from None
    teachers: dict[str, Any] = {}
    if recipe.teachers == "toyrooms_specialists":
        if recipe.dataset != "toyrooms":
            raise ValueError("teachers 'toyrooms_specialists' need dataset 'toyrooms'; name Hub teachers instead")
        teachers = {name: {"hidden_size": 96} for name in ("geometry", "semantics")}  # their fixed width
    elif isinstance(recipe.teachers, dict) and recipe.teachers:
        try:
            teachers = teacher_specs(recipe.teachers)
        except (OSError, ValueError) as error:
            raise ValueError(f"teachers: {error}") from None
    stem = stem if isinstance(stem, dict) else stem.to_dict()
    width = stem.get("hidden_size", 768)
    try:  # the config `build_config` will make, from the teachers' widths alone
        SAKConfig(
            stem_config=stem,
            teachers={name: {"hidden_size": spec["hidden_size"]} for name, spec in teachers.items()},
            use_aligners=any(spec["hidden_size"] != width for spec in teachers.values()),
            **config_arguments(recipe),
        )
    except ValueError as error:
        depth = stem.get("num_hidden_layers")
        hint = " (e.g. --stem num_hidden_layers=4)" if "depth rule" in str(error) else ""
        raise ValueError(f"the student of this recipe (stem of {depth} blocks): {error}{hint}") from None
    if recipe.dataset == "toyrooms":
        unknown = sorted(set(recipe.tasks) - {"semseg", "normals", "edge", "depth"}) if recipe.stage == 2 else []
        if unknown:
            raise ValueError(f"tasks {unknown}: ToyRooms has semseg, normals, edge and depth only")
        if recipe.stage == 2 and "semseg" in recipe.tasks and recipe.tasks["semseg"] != len(CLASSES):
            raise ValueError(f"tasks: semseg={recipe.tasks['semseg']} but ToyRooms has {len(CLASSES)} classes")
    elif looks_like_path(recipe.dataset) and not Path(recipe.dataset).expanduser().exists():
        raise FileNotFoundError(
            f"dataset={recipe.dataset!r}: no such folder; give a folder in the package schema "
            "(sak-prepare-dataset), a Hub id, or 'toyrooms'"
        )
    output_dir = Path(recipe.output_dir)
    held = sorted(p.name for p in [*checkpoint_dirs(output_dir), *(output_dir / f for f in RUN_FILES)] if p.exists())
    if held and not resume and not overwrite_output_dir:
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds a run ({', '.join(held[:4])}); continue it with "
            "--resume_from_checkpoint latest, start over in it with --overwrite_output_dir, or choose another "
            "--output_dir"
        )
    if resume:
        resolve_checkpoint(output_dir, resume, recipe.distributed_strategy)
