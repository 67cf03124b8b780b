"""The training recipe: one dataclass whose fields are the recipe keys of `configs/*.yaml` and the flags of
`train_accelerate.py`, each with its help beside its default (the `HfArgumentParser` style).

    recipe = load_recipe("configs/nyud_vitb.yaml", {"max_steps": 100})  # YAML recipe <- overrides (None = not given)
    recipe.learning_rate, recipe.teachers, ...

`Recipe()` is the offline ToyRooms default run; a YAML recipe starts from `Recipe.yaml_base()` (the same values
without the default run's ToyRooms-only choices). Values are checked when the recipe is made: unknown keys, values of
the wrong type and choices outside their `Literal` are errors naming the key and the valid values.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _field(default: Any, help: str, **metadata: Any) -> Any:
    """A recipe field: its default, its help and how the command line writes it (see `flag_kwargs`)."""
    factory = (lambda: copy.deepcopy(default)) if isinstance(default, dict | list) else None
    kwargs = {"default_factory": factory} if factory else {"default": default}
    return field(**kwargs, metadata={"help": help, **metadata})


@dataclass
class Recipe:
    """Everything a training run is made from. Defaults: the offline ToyRooms default run."""

    stage: Literal[1, 2] = _field(
        2, "1 = distillation only (no tasks, e.g. ImageNet), 2 = multi-task training with distillation"
    )
    dataset: str = _field(
        "toyrooms", "Hub id or local folder of a dataset in the package schema, or 'toyrooms' (rendered offline)"
    )
    train_split: str = _field("train", "split to train on")
    train_limit: int | None = _field(
        200,
        "use only the first N training examples (none: all); the ToyRooms default trains the student on 200 "
        "labelled scenes while its teachers saw 2000, as VFMs see far more data than NYUD-v2",
    )
    eval_split: str = _field("test", "split to evaluate on (empty: no evaluation)")
    eval_boundary: Literal["bsds", "tolerance"] = _field(
        "bsds", "edge metric: 'bsds' (the paper's odsF: NMS + one-to-one matching) or 'tolerance' (quick)"
    )
    streaming: bool = _field(
        False, "stream the dataset (Hub-scale data) instead of reading it as a local map-style dataset"
    )
    image_size: list[int] = _field(
        [96, 128],
        "training resolution H W, e.g. `--image_size 448 576` (the crop size; the stem's position grid)",
        example="448 576",
    )
    tasks: dict[str, int] = _field(
        {"semseg": 7, "normals": 3, "edge": 1, "depth": 1},
        "task -> output channels: `--tasks semseg=40 depth=1` or `--tasks '{semseg: 40, depth: 1}'`",
        example="semseg=40 depth=1",
    )
    task_loss_weights: dict[str, float] = _field(
        {"semseg": 1.0, "normals": 10.0, "edge": 50.0, "depth": 1.0},
        "task -> loss weight: `semseg=1 depth=1` or a YAML/JSON mapping",
        example="semseg=1 depth=1",
    )
    stem: dict[str, Any] = _field(
        {
            "model_type": "vit",
            "hidden_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "intermediate_size": 384,
            "patch_size": 8,
            "layer_norm_eps": 1e-6,
        },
        "the stem's transformers config: `hidden_size=384 num_hidden_layers=12 ...` or a YAML/JSON mapping (used when "
        "stem_model is not given)",
        example="hidden_size=384 num_hidden_layers=12",
    )
    stem_model: str | None = _field(None, "Hub id or path of a ViT/DINOv2 checkpoint to start the stem from")
    teachers: dict[str, Any] | str = _field(
        "toyrooms_specialists",
        "name -> Hub id or path: `dinov2=facebook/dinov2-base sam=facebook/sam-vit-base` (timm ids too: "
        "`clip=timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k`, the `timm` extra), or a YAML/JSON mapping whose "
        "values may also be `{model_id, out_indices, position_interpolation, config_overrides}`; "
        "'toyrooms_specialists'; or 'none' for no distillation",
        example="dinov2=facebook/dinov2-base",
    )
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = _field("float32", "dtype of the frozen teachers")
    down_ratio: int = _field(4, "adapter bottleneck ratio")
    router_type: Literal["mor", "none"] = _field("mor", "MoR routers, or 'none': every task gets stem + all paths")
    noisy_gating: bool = _field(True, "noisy MoR gating in training")
    distill_alpha: float = _field(1.0, "weight of the distillation loss (0: no distillation)")
    distill_loss_type: Literal["cos+l1", "cos", "l2"] = _field("cos+l1", "distillation loss")
    photometric: bool = _field(False, "photometric distortion in the training augmentation")
    scale_range: list[float] = _field(
        [0.75, 1.25],
        "random scale range of the training augmentation: LOW HIGH, e.g. `--scale_range 0.5 2.0`",
        example="0.5 2.0",
    )
    toyrooms: dict[str, Any] = _field(
        {
            "num_train": 2000,
            "num_test": 200,
            "seed": 0,
            "teacher_steps": {"geometry": 800, "semantics": 300},
            "teacher_learning_rate": {"geometry": 1e-3, "semantics": 2e-3},
        },
        "ToyRooms settings: `num_train=2000 num_test=200 seed=0` or a YAML/JSON mapping (also teacher_steps and "
        "teacher_learning_rate, the peak of each teacher's one-cycle schedule)",
        example="num_train=2000 num_test=200",
    )
    stage1_steps: int = _field(
        120,
        "with stage 2: first distil on all training images (no labels, train_limit ignored) for this many steps, then "
        "start stage 2 from that student (SAK's two-stage protocol; 0: off)",
    )
    max_steps: int = _field(180, "optimizer steps")
    per_device_train_batch_size: int = _field(8, "training batch size per process")
    per_device_eval_batch_size: int = _field(16, "evaluation batch size per process")
    gradient_accumulation_steps: int = _field(1, "batches accumulated per optimizer step")
    learning_rate: float = _field(1e-3, "peak learning rate")
    weight_decay: float = _field(0.01, "AdamW weight decay (not applied to norms, biases, adapter scales, tokens)")
    lr_scheduler: Literal["poly", "cosine", "constant"] = _field(
        "cosine", "'poly' (per iteration, power poly_power), 'cosine' (with warm-up) or 'constant'"
    )
    warmup_steps: int = _field(20, "linear warm-up steps")
    poly_power: float = _field(0.9, "power of the polynomial decay")
    max_grad_norm: float = _field(10.0, "gradient clipping norm (0: off)")
    mixed_precision: Literal["no", "fp16", "bf16"] = _field("no", "mixed precision of the student")
    head_implementation: Literal["low_resolution", "plain"] = _field(
        "low_resolution",
        "how the task heads compute their resize + 3x3 conv: 'low_resolution' on the patch grid (the same function, "
        "about 0.3x the student's training FLOPs) or 'plain' (resize, then conv, as the reference code)",
    )
    torch_compile: bool = _field(
        False,
        "compile the student for training with torch.compile (Accelerate's dynamo_backend='inductor'); the first "
        "steps compile (minutes on a CPU); measured slower than eager on a 2-core CPU (docs/speed_and_memory.md)",
    )
    cpu_allocator: Literal["tuned", "default"] = _field(
        "tuned",
        "'tuned': glibc's malloc keeps freed CPU memory mapped, so a step does not fault its tensors in again (the "
        "same numbers, the student's step about a fifth faster on a 2-core CPU, docs/speed_and_memory.md; the process "
        "keeps its peak heap), 'default': glibc's own thresholds (`modeling_sak.training.cpu_allocator`)",
    )
    gradient_checkpointing: bool = _field(
        False,
        "recompute each stem block in the backward pass instead of keeping its activations (transformers' "
        "activation_checkpointing_enable, non-reentrant): the same gradients, less memory, about one more stem forward "
        "of compute (bench/memory.py)",
    )
    distributed_strategy: Literal["ddp", "fsdp2"] = _field(
        "ddp",
        "'ddp': every process holds the whole student; 'fsdp2': the student's parameters, gradients and AdamW state "
        "sharded across processes (torch's fully_shard per stem block, `modeling_sak.training.sharding`), on GPUs or CPUs; "
        "`accelerate launch --use_fsdp --fsdp_version 2` sets it",
    )
    eval_steps: int = _field(0, "evaluate every N steps (0: only at the end)")
    checkpointing_steps: int = _field(100, "save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int = _field(2, "keep the last K checkpoints")
    logging_steps: int = _field(10, "log to the trackers every N steps")
    num_workers: int = _field(0, "DataLoader workers per process")
    shuffle_buffer: int = _field(256, "shuffle buffer of a streamed dataset")
    seed: int = _field(0, "random seed")
    baseline: bool = _field(True, "also train a no-teacher baseline of the same budget and report Delta_m")
    freeze_stem: bool = _field(False, "freeze the Teacher-Agnostic Stem")
    train_only_routers: bool = _field(False, "train only the MoR routers")
    lora: dict[str, Any] | None = _field(
        None,
        "LoRA on the stem through peft: `--lora r=8 alpha=16` or a YAML/JSON mapping (r, alpha, dropout, "
        "target_modules); 'none': off",
        example="r=8 alpha=16",
    )
    init_from: str | None = _field(
        None, "a SAK checkpoint (stage 1 or converted reference) to start from; matching weights are loaded"
    )
    verify_replicas: bool = _field(
        False, "at the end, check that every process holds the same parameters (recorded in all_results)"
    )
    report_to: str | None = _field(None, "trackers: tensorboard, wandb, trackio, ... (comma separated)")
    output_dir: str = _field("outputs/sak-toyrooms", "where checkpoints, the final model, results and pictures go")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Recipe)
        for item in dataclasses.fields(self):
            setattr(self, item.name, _checked(item.name, getattr(self, item.name), hints[item.name]))
        problem = _range_problem(self)
        if problem:
            raise ValueError(problem)

    @classmethod
    def yaml_base(cls) -> Recipe:
        """What a YAML recipe starts from: the defaults without the default run's ToyRooms-only choices."""
        return cls(train_limit=None, baseline=False, stage1_steps=0)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with `changes` (checked like any recipe)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys whose mappings a later layer (YAML recipe, flags) updates key by key instead of replacing: `--toyrooms
# num_train=64` keeps the other ToyRooms settings, `--task_loss_weights depth=2` the other tasks' weights. Not
# `stem`: a stem config given in part would silently keep the default stem's other sizes instead of transformers'
# defaults for that model.
MERGED_KEYS = ("toyrooms", "task_loss_weights")
TOYROOMS_KEYS = ("num_train", "num_test", "seed", "teacher_steps", "teacher_learning_rate")
SPECIALISTS = ("geometry", "semantics")
# OneCycleLR warms up over 10% of its steps; below 2 warm-up steps it divides by zero or runs backwards.
MIN_TEACHER_STEPS = 20


def _range_problem(recipe: Recipe) -> str | None:
    """The first value out of its range or inconsistent with another key, as a message naming the key, the value
    and the fix; None when every value is usable."""
    at_least = {
        "max_steps": 1,
        "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "down_ratio": 1,
        "checkpoints_total_limit": 1,
        "shuffle_buffer": 1,
        "warmup_steps": 0,
        "stage1_steps": 0,
        "eval_steps": 0,
        "checkpointing_steps": 0,
        "logging_steps": 0,
        "num_workers": 0,
        "weight_decay": 0,
        "max_grad_norm": 0,
        "distill_alpha": 0,
    }
    for key, low in at_least.items():
        value = getattr(recipe, key)
        if value < low:
            return f"{key}={value!r} must be at least {low}"
    for key, example in (("learning_rate", "1e-4"), ("poly_power", "0.9")):
        if not getattr(recipe, key) > 0:
            return f"{key}={getattr(recipe, key)!r} must be greater than 0, e.g. --{key} {example}"
    if recipe.train_limit is not None and recipe.train_limit < 1:
        return f"train_limit={recipe.train_limit!r} must be at least 1 (or none: every training row)"
    if min(recipe.image_size) < 1:
        return f"image_size={recipe.image_size!r}: both sides must be positive, e.g. --image_size 448 576"
    low, high = recipe.scale_range
    if not 0 < low <= high:
        return f"scale_range={recipe.scale_range!r} must be LOW HIGH with 0 < LOW <= HIGH, e.g. --scale_range 0.5 2.0"
    if recipe.warmup_steps > recipe.max_steps:
        return (
            f"warmup_steps={recipe.warmup_steps} is more than max_steps={recipe.max_steps}: the rate would never "
            "reach its peak; lower --warmup_steps"
        )
    if recipe.stage == 2 and not recipe.tasks:
        return "tasks={} in stage 2: name at least one task, e.g. --tasks semseg=40 depth=1 (or use --stage 1)"
    for task, channels in recipe.tasks.items():
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            return f"tasks: {task}={channels!r} must be a number of output channels (an integer >= 1)"
    unweighted = sorted(set(recipe.tasks) - set(recipe.task_loss_weights)) if recipe.stage == 2 else []
    if unweighted:
        return f"task_loss_weights has no weight for the tasks {unweighted}; add e.g. --task_loss_weights {unweighted[0]}=1"
    if recipe.lora is not None:
        unknown = sorted(set(recipe.lora) - {"r", "alpha", "dropout", "target_modules"})
        if unknown:
            return (
                f"lora: unknown keys {unknown}; valid keys are r, alpha, dropout and target_modules, e.g. --lora r=8"
            )
    return _toyrooms_problem(recipe.toyrooms)


def _toyrooms_problem(toyrooms: dict[str, Any]) -> str | None:
    unknown = sorted(set(toyrooms) - set(TOYROOMS_KEYS))
    if unknown:
        hint = (
            " (write `{num_train: 64}` with a space after the colon, or num_train=64)"
            if any(":" in str(key) for key in unknown)
            else ""
        )
        return f"toyrooms: unknown keys {unknown}{hint}; valid keys are {list(TOYROOMS_KEYS)}"
    for key in ("num_train", "num_test"):
        value = toyrooms.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"toyrooms: {key}={value!r} must be an integer >= 1, e.g. --toyrooms {key}=64"
    steps = toyrooms.get("teacher_steps", {})
    per_teacher = steps if isinstance(steps, dict) else dict.fromkeys(SPECIALISTS, steps)
    unknown = sorted(set(per_teacher) - set(SPECIALISTS))
    if unknown:
        return f"toyrooms: teacher_steps names {unknown}; the specialists are {list(SPECIALISTS)}"
    for name, value in per_teacher.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < MIN_TEACHER_STEPS:
            return (
                f"toyrooms: teacher_steps {name}={value!r} must be an integer >= {MIN_TEACHER_STEPS} (the teachers' "
                "one-cycle schedule warms up over 10% of its steps), e.g. --toyrooms 'teacher_steps: {geometry: 800, "
                "semantics: 300}'"
            )
    return None


def _merge(old: Any, new: Any) -> Any:
    """`new` over `old`, key by key for mappings (nested ones too); anything else is replaced."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{key: _merge(old.get(key), value) for key, value in new.items()}}
    return new


def _checked(key: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type (ints accepted for floats, 'none' for optional fields), or a ValueError."""
    origin, options = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in options:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(repr(o) for o in options)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in options and (value is None or str(value).lower() in ("none", "null")):
            return None
        kinds = tuple(typing.get_origin(o) or o for o in options if o is not type(None))
    else:
        kinds = (origin or hint,)
    if float in kinds and type(value) is int:
        return float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"{key}={value!r} must be {' or '.join(kind.__name__ for kind in kinds)}")
    if list in kinds and len(value) != 2:
        raise ValueError(f"{key}={value!r} must hold two values, e.g. {_example(key)}")
    return value


def load_recipe(path: str | None, overrides: dict[str, Any]) -> Recipe:
    """`Recipe()` (or `Recipe.yaml_base()` under a YAML recipe) <- YAML recipe <- `overrides` (None means "not
    given"); the mappings of `MERGED_KEYS` are updated key by key, the rest replaced; unknown keys and bad values
    (types, choices, ranges, `_range_problem`'s relations) are ValueErrors naming them."""
    recipe = Recipe.yaml_base() if path else Recipe()
    layers = []
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe {path} does not exist; see configs/ for the shipped recipes")
        layers.append((path, yaml.safe_load(Path(path).read_text()) or {}))
    layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    valid = [item.name for item in dataclasses.fields(Recipe)]
    for source, layer in layers:
        unknown = sorted(set(layer) - set(valid))
        if unknown:
            raise ValueError(f"{source}: unknown recipe keys {unknown}; valid keys are {sorted(valid)}")
        merged = {k: _merge(getattr(recipe, k), v) if k in MERGED_KEYS else v for k, v in layer.items()}
        try:
            recipe = recipe.replace(**merged)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    return recipe


# ---- the command line: one flag per field, written as its help says ----


def parse_bool(text: str) -> bool:
    """`true/false`, `yes/no`, `on/off` or `1/0`, any case."""
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; write true or false")
    return value[text.lower()]


def _optional(kind: type):
    def parse(text: str):  # 'none' stays a string: None would mean "flag not given"; the Recipe reads it as None
        return "none" if text.lower() in ("none", "null") else kind(text)

    return parse


def flag_kwargs(name: str) -> dict[str, Any]:
    """`argparse.add_argument` keyword arguments of the recipe field `name` (no default: None means not given)."""
    item = {f.name: f for f in dataclasses.fields(Recipe)}[name]
    hint = typing.get_type_hints(Recipe)[name]
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    kwargs: dict[str, Any] = {"default": None, "help": f"{item.metadata['help']} (default: {default})"}
    origin, options = typing.get_origin(hint), typing.get_args(hint)
    structured = [typing.get_origin(o) or o for o in (options if origin is not Literal else ())]
    if origin is list:
        return kwargs | {"nargs": "+", "metavar": "VALUE"}
    if origin is dict or dict in structured:
        return kwargs | {"nargs": "+", "metavar": "KEY=VALUE"}
    if origin is Literal:
        return kwargs | {"type": type(options[0]), "choices": list(options)}
    if hint is bool:
        return kwargs | {"type": parse_bool, "metavar": "{true,false}"}
    if type(None) in options:
        return kwargs | {"type": _optional(next(o for o in options if o is not type(None)))}
    return kwargs | {"type": hint}


def parse_flag_value(name: str, tokens: list[str]) -> Any:
    """The recipe value of `--name TOKEN ...` for the pair and mapping flags (their help gives both forms)."""
    hint = typing.get_type_hints(Recipe)[name]
    shown = " ".join(tokens)
    example = f"--{name} {_example(name)}"
    if typing.get_origin(hint) is list:  # a pair: `448 576` or a YAML list `[448, 576]`
        values = yaml.safe_load(tokens[0]) if len(tokens) == 1 else [yaml.safe_load(t) for t in tokens]
        kind = typing.get_args(hint)[0]
        if not isinstance(values, list) or len(values) != 2 or not all(isinstance(v, int | float) for v in values):
            raise ValueError(f"--{name} {shown}: expected two numbers, e.g. {example}")
        if kind is int and not all(float(v).is_integer() for v in values):
            raise ValueError(f"--{name} {shown}: expected two integers, e.g. {example}")
        return [kind(v) for v in values]
    if len(tokens) == 1 and "=" not in tokens[0]:
        value = _flow_mapping(tokens[0])
        if value is None or str(value).lower() in ("none", "null"):
            return "none"  # not None: that would mean "flag not given"; the Recipe reads it as None (or no teachers)
        if name == "teachers" and value == "toyrooms_specialists":
            return value
        if not isinstance(value, dict):
            raise ValueError(f"--{name} {shown}: expected KEY=VALUE pairs or a YAML/JSON mapping, e.g. {example}")
        return value
    pairs = [token.partition("=") for token in tokens]
    bad = [token for token, (key, sep, _) in zip(tokens, pairs) if not key or not sep]
    if bad:
        raise ValueError(f"--{name}: {bad} are not KEY=VALUE pairs, e.g. {example}")
    return {key: value if name == "teachers" else yaml.safe_load(value) for key, _, value in pairs}


def _flow_mapping(text: str) -> Any:
    """`yaml.safe_load(text)`, reading `{a:1,b:{c:2}}` (no space after the colons, as people type it; YAML reads that
    as keys 'a:1' and 'c:2' without values) as `{a: 1, b: {c: 2}}`. A colon before '/' or '\\' (a URL, a Windows
    path) is kept as it is."""

    def glued(value: Any) -> bool:
        return isinstance(value, dict) and any((v is None and ":" in str(k)) or glued(v) for k, v in value.items())

    value = yaml.safe_load(text)
    if glued(value):
        value = yaml.safe_load(re.sub(r"([:,])(?=[^\s/\\])", r"\1 ", text))
    return value


def _example(name: str) -> str:
    return {f.name: f for f in dataclasses.fields(Recipe)}[name].metadata.get("example", "")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--KEY` flag per recipe field."""
    for item in dataclasses.fields(Recipe):
        parser.add_argument(f"--{item.name}", **flag_kwargs(item.name))


def recipe_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The recipe values given on the command line (pairs and mappings parsed; errors through `parser.error`)."""
    overrides = {}
    for item in dataclasses.fields(Recipe):
        value = getattr(args, item.name)
        if value is not None and "nargs" in flag_kwargs(item.name):
            try:
                value = parse_flag_value(item.name, value)
            except (ValueError, yaml.YAMLError) as error:
                parser.error(str(error))
        overrides[item.name] = value
    return overrides
