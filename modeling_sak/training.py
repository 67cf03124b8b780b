"""What `train_accelerate.py` needs beside its story: data loaders, teachers, the student, optimizer groups,
schedules, atomic checkpoints, the NaN guard, LoRA merging (evaluation: `modeling_sak.evaluation.loop`)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers.utils import logging

from .cli import looks_like_path
from .configuration_sak import SAKConfig
from .data.loading import COLUMN_MAPPINGS, ImageStream, MultiTaskStream, load_multitask_split, task_columns
from .data.schema import read_id2label
from .data.toyrooms import OpenedRows
from .data.transforms import MultiTaskTransform, stage1_transform
from .modeling_sak import SAKForMultiTask, resize_position_embeddings
from .recipe import Recipe
from .specialist_teachers import ensure_specialists, ensure_toyrooms


logger = logging.get_logger(__name__)


def distributed_without_gpu() -> bool:
    """True when several processes were launched (torchrun, accelerate launch) on a machine without a GPU: then
    `Accelerator(cpu=True)` is needed for them to form a gloo group instead of each running alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


RUN_FILES = ("final", "all_results.json", "stage1", "lora_adapter", "predictions.png", "router_weights.png")


def check_recipe(recipe: Recipe, resume: str | None = None, overwrite_output_dir: bool = False) -> None:
    """Everything about a recipe that can be checked before any work (rendering, downloading, training), after the
    values themselves (`Recipe`): the student's config (stem depth vs output levels, widths, tasks), a `stem_model`
    and Hub teachers readable (offline: from the cache), the dataset and `init_from` present, ToyRooms' tasks, and
    an `output_dir` that already holds a run (not resumed). Raises ValueError / FileNotFoundError naming the key,
    the value and the fix."""
    from transformers import AutoConfig

    from .data.toyrooms import CLASSES
    from .teachers import teacher_specs

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
            image_size=recipe.image_size,
            down_ratio=recipe.down_ratio,
            router_type=recipe.router_type,
            noisy_gating=recipe.noisy_gating,
            tasks={} if recipe.stage == 1 else recipe.tasks,
            task_loss_weights=None if recipe.stage == 1 else task_weights(recipe),
            distill_alpha=recipe.distill_alpha,
            distill_loss_type=recipe.distill_loss_type,
            head_implementation=recipe.head_implementation,
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
            f"dataset={recipe.dataset!r}: no such folder; give a folder in the package schema (python -m "
            "modeling_sak.prepare_dataset), a Hub id, or 'toyrooms'"
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


def clear_run(output_dir: str | Path) -> None:
    """Remove what a run left in `output_dir` (checkpoints, partial checkpoints, `RUN_FILES`): --overwrite_output_dir."""
    output_dir = Path(output_dir)
    for path in [
        *output_dir.glob("checkpoint-*"),
        *output_dir.glob(".partial-checkpoint-*"),
        *(output_dir / f for f in RUN_FILES),
    ]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resolve_data_and_teachers(recipe: Recipe, cache_dir: str, accelerator) -> tuple[str, dict[str, dict[str, Any]]]:
    """The dataset location (ToyRooms rendered or read from the cache) and the teacher specs of `SAKConfig.teachers`
    (`{name: {hidden_size, model_id, **options}}`; empty without teachers), made once (main process first)."""
    from .teachers import teacher_specs

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
                "convert the data with `python -m modeling_sak.prepare_dataset`"
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


def task_weights(recipe: Recipe) -> dict[str, float]:
    """The loss weights of the recipe's tasks: `--tasks semseg=40 depth=1` keeps the default weights of those two and
    drops the others' (every task has one: `Recipe` checks it)."""
    return {task: weight for task, weight in recipe.task_loss_weights.items() if task in recipe.tasks}


def build_config(recipe: Recipe, teachers: dict[str, dict[str, Any]], dataset: str | None = None) -> SAKConfig:
    """The student's `SAKConfig` from a recipe and resolved teacher specs (`teachers.student_config`: aligners where a
    teacher's width differs from the stem's); its semseg classes are named by the `dataset` (local folder or Hub id)
    when it ships `id2label.json` (see `label_names_from_data`)."""
    from transformers import AutoConfig

    from .teachers import student_config

    stem = AutoConfig.from_pretrained(recipe.stem_model) if recipe.stem_model else recipe.stem
    config = student_config(
        stem,
        teachers,
        image_size=recipe.image_size,
        down_ratio=recipe.down_ratio,
        router_type=recipe.router_type,
        noisy_gating=recipe.noisy_gating,
        tasks={} if recipe.stage == 1 else recipe.tasks,
        task_loss_weights=None if recipe.stage == 1 else task_weights(recipe),
        distill_alpha=recipe.distill_alpha,
        distill_loss_type=recipe.distill_loss_type,
        head_implementation=recipe.head_implementation,
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


def apply_lora(model: SAKForMultiTask, lora: dict[str, Any]) -> SAKForMultiTask:
    """LoRA on the stem's attention and MLP projections through peft (the `lora` extra); the rest of the stem is
    frozen. Training and its checkpoints keep the LoRA layers; `merge_lora` folds them in before `save_pretrained`."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("recipe key 'lora' needs peft: pip install 'sak-hf[lora]'") from error
    unknown = sorted(set(lora) - {"r", "alpha", "dropout", "target_modules"})
    if unknown:
        raise ValueError(f"lora: unknown keys {unknown}; valid keys are r, alpha, dropout and target_modules")
    config = LoraConfig(
        target_modules=lora.get("target_modules", ["qkv", "proj", "fc1", "fc2"]),
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.0),
    )
    model.stem = inject_adapter_in_model(config, model.stem)
    return model


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, adapter scales, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith(
            (".scale", "cls_token", "position_embeddings", "register_tokens")
        )
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW of training: `parameter_groups(model, weight_decay)` at `learning_rate`, as one fused kernel per step
    (`fused=True`) where torch has one for every trainable parameter's device and dtype, else the multi-tensor
    (`foreach`) form. Both compute the per-parameter loop's update (AdamW's default on CPU): the moments bit for bit,
    the weights to their last bit (the fused kernel orders the same arithmetic differently; `foreach` is bit for bit;
    tests/test_training_step.py). For a ViT-B NYUD-v2 SAK (519 tensors) the loop issues each elementwise op 519 times
    a step; the fused step took 0.08 s against the loop's 0.51 s on 2 CPU cores.

    Build it before `accelerator.prepare` moves the model: the parameters are kept, only their storage moves.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    groups = parameter_groups(model, weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    fusable_devices = set(_get_fused_kernels_supported_devices())
    fused = bool(parameters) and all(
        p.device.type in fusable_devices and p.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        for p in parameters
    )
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused or None, foreach=None if fused else True)


def make_scheduler(optimizer, kind: str, total_steps: int, warmup_steps: int = 0, power: float = 0.9):
    """Per-iteration learning-rate schedule: "poly" (1 - t/T)^power, "cosine" with linear warm-up, or "constant"."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "poly":
            return (1 - progress) ** power
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    if kind not in ("poly", "cosine", "constant"):
        raise ValueError(f"lr_scheduler={kind!r} is not one of 'poly', 'cosine', 'constant'")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(step: int, loss: torch.Tensor, outputs) -> None:
    """Stop with a message naming the step and every non-finite loss term."""
    if torch.isfinite(loss).all():
        return
    terms = {**(outputs.task_losses or {}), **(outputs.distill_losses or {})}
    bad = sorted(name for name, value in terms.items() if not torch.isfinite(value).all())
    raise FloatingPointError(
        f"step {step}: the loss is {loss.item()} (non-finite terms: {bad or ['total']}); the run stops here and the "
        "last checkpoint is intact. Lower the learning rate, check the data, or use bf16 instead of fp16"
    )


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>`), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int, sharded=None
) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoint-<step>` only once complete. An FSDP2
    run passes `sharded=(model, optimizer)`: their shards go to `student_sharded/` in the same folder
    (`sharding.save_sharded`), before the rename."""
    output_dir = Path(output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".partial-checkpoint-{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if sharded is not None:
        from .sharding import SHARDED_STATE_DIR, save_sharded

        save_sharded(*sharded, partial / SHARDED_STATE_DIR)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "training_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | Path, value: str, strategy: str = "ddp") -> Path:
    """`latest` -> the newest complete checkpoint of `output_dir`; otherwise the given folder. A checkpoint of the other
    `distributed_strategy` (FSDP2 shards vs a DDP run's whole state) is a FileNotFoundError naming the one to use."""
    from .sharding import SHARDED_STATE_DIR

    if value == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir}")
        path = found[-1]
    else:
        path = Path(value)
    if not (path / "training_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no training_state.json)")
    written = "fsdp2" if (path / SHARDED_STATE_DIR).is_dir() else "ddp"
    if written != strategy:
        raise FileNotFoundError(
            f"{path} was written by a distributed_strategy {written!r} run; resume it with --distributed_strategy "
            f"{written} (this run is {strategy!r})"
        )
    return path


def training_state(
    step: int, epoch: int, batch_in_epoch: int, loss_history: list[float], lr_history: list[float]
) -> dict[str, Any]:
    """What a checkpoint needs beside accelerate's state: the step, the histories and every process's position in its
    data (streamed parts can differ in length between processes, so each keeps its own epoch and batch). Call it on
    every process: the positions are gathered."""
    positions = gather_object([[epoch, batch_in_epoch]])
    return {"step": step, "positions": positions, "loss_history": loss_history, "lr_history": lr_history}


def save_lora_adapter(model: SAKForMultiTask, directory: str | Path) -> Path | None:
    """The stem's LoRA adapter, unmerged, in peft's format (`adapter_config.json` + `adapter_model.safetensors`, keys
    relative to the stem); None, writing nothing, when the model has no LoRA. Call it before `merge_lora`.

    It applies to the stem the run started from: `inject_adapter_in_model(LoraConfig.from_pretrained(directory),
    model.stem)` and `set_peft_model_state_dict(model.stem, load_file(directory / "adapter_model.safetensors"))`.
    """
    configs = getattr(model.stem, "peft_config", None)
    if not configs:
        return None
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    configs["default"].save_pretrained(str(directory))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model.stem).items()}
    save_file(state, str(directory / "adapter_model.safetensors"))
    return directory


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every peft LoRA layer into its base layer, in place, and return the model: the plain modules and state-dict
    keys of a model without LoRA (`stem...qkv.weight`, not `...qkv.base_layer.weight`), which is what `save_pretrained`
    must write for `from_pretrained` to load it. A no-op for a model without LoRA (or without peft installed)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for module in model.modules():
        if "peft_config" in module.__dict__:  # set by `inject_adapter_in_model`; nothing is injected any more
            del module.peft_config
    return model
