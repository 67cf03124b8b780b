"""Train SAK with Accelerate: stage 1 (distillation) or stage 2 (multi-task + distillation), on CPU, one GPU or many.

    accelerate launch train_accelerate.py                          # the offline ToyRooms default, end to end
    accelerate launch train_accelerate.py --config configs/nyud_vitb.yaml --mixed_precision bf16
    accelerate launch train_accelerate.py --config configs/nyud_vitb.yaml --resume_from_checkpoint latest

Every recipe key (see `modeling_sak.training.DEFAULT_RECIPE` and configs/*.yaml) is also a flag; flags override the
recipe, which overrides the default. The default renders ToyRooms, pretrains its two specialist teachers (both
cached under --cache_dir), trains SAK and a no-teacher baseline of the same budget, and prints and draws the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from modeling_sak import SAKImageProcessor
from modeling_sak.data.loading import (
    COLUMN_MAPPINGS,
    ImageStream,
    MultiTaskStream,
    load_multitask_split,
    task_columns,
)
from modeling_sak.data.toyrooms import CLASSES
from modeling_sak.data.transforms import MultiTaskTransform, stage1_transform
from modeling_sak.evaluation.metrics import MAIN_METRIC, METRICS_VERSION, delta_m
from modeling_sak.evaluation.pictures import prediction_grid, router_bar_chart
from modeling_sak.model_card import render_model_card
from modeling_sak.specialist_teachers import (
    DEFAULT_CACHE,
    PACKAGE,
    ensure_specialists,
    ensure_toyrooms,
    source_fingerprint,
)
from modeling_sak.training import (
    DEFAULT_RECIPE,
    build_config,
    build_model,
    check_finite,
    distributed_without_gpu,
    evaluate,
    evaluation_mode,
    load_recipe,
    make_scheduler,
    merge_lora,
    parameter_groups,
    resolve_checkpoint,
    save_checkpoint,
    save_lora_adapter,
)


logger = get_logger(__name__)

HELP = {
    "stage": "1 = distillation only (no tasks, e.g. ImageNet), 2 = multi-task training with distillation",
    "dataset": "Hub id or local folder of a dataset in the package schema, or 'toyrooms' (rendered offline)",
    "train_split": "split to train on",
    "train_limit": "use only the first N training examples (none: all); the ToyRooms default trains the student on "
                   "200 labelled scenes while its teachers saw 2000, as VFMs see far more data than NYUD-v2",
    "eval_split": "split to evaluate on (empty: no evaluation)",
    "fast_path": "run the student through SAKForMultiTask.optimize_for_training() (the same function in fewer "
    "operations, equal up to float rounding); pair with --mixed_precision bf16 --teacher_dtype bfloat16",
    "eval_boundary": "edge metric: 'bsds' (the paper's odsF: NMS + one-to-one matching) or 'tolerance' (quick)",
    "streaming": "stream the dataset (Hub-scale data) instead of reading it as a local map-style dataset",
    "image_size": "training resolution H W, e.g. `--image_size 448 576` (the crop size; the stem's position grid)",
    "tasks": "task -> output channels: `--tasks semseg=40 depth=1` or `--tasks '{semseg: 40, depth: 1}'`",
    "task_loss_weights": "task -> loss weight: `semseg=1 depth=1` or a YAML/JSON mapping",
    "stem": "the stem's transformers config: `hidden_size=384 num_hidden_layers=12 ...` or a YAML/JSON mapping "
            "(used when stem_model is not given)",
    "stem_model": "Hub id or path of a ViT/DINOv2 checkpoint to start the stem from",
    "teachers": "name -> Hub id or path: `dinov2=facebook/dinov2-base sam=facebook/sam-vit-base` (timm ids too: "
                "`clip=timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k`, the `timm` extra), or a YAML/JSON mapping "
                "whose values may also be `{model_id, out_indices, position_interpolation, config_overrides}`; "
                "'toyrooms_specialists'; or 'none' for no distillation",
    "teacher_dtype": "dtype of the frozen teachers: float32, bfloat16 or float16",
    "down_ratio": "adapter bottleneck ratio", "router_type": "'mor' or 'none'",
    "noisy_gating": "noisy MoR gating in training (true/false)", "distill_alpha": "weight of the distillation loss",
    "distill_loss_type": "'cos+l1', 'cos' or 'l2'",
    "photometric": "photometric distortion in the training augmentation (true/false)",
    "scale_range": "random scale range of the training augmentation: LOW HIGH, e.g. `--scale_range 0.5 2.0`",
    "toyrooms": "ToyRooms settings: `num_train=2000 num_test=200 seed=0` or a YAML/JSON mapping (also teacher_steps)",
    "stage1_steps": "with stage 2: first distil on all training images (no labels, train_limit ignored) for this many "
                    "steps, then start stage 2 from that student (SAK's two-stage protocol; 0: off)",
    "max_steps": "optimizer steps", "per_device_train_batch_size": "training batch size per process",
    "per_device_eval_batch_size": "evaluation batch size per process",
    "gradient_accumulation_steps": "batches accumulated per optimizer step", "learning_rate": "peak learning rate",
    "weight_decay": "AdamW weight decay (not applied to norms, biases, adapter scales, tokens)",
    "lr_scheduler": "'poly' (per iteration, power poly_power), 'cosine' (with warm-up) or 'constant'",
    "warmup_steps": "linear warm-up steps", "poly_power": "power of the polynomial decay",
    "max_grad_norm": "gradient clipping norm (0: off)", "mixed_precision": "'no', 'fp16' or 'bf16'",
    "eval_steps": "evaluate every N steps (0: only at the end)",
    "checkpointing_steps": "save a resumable checkpoint every N steps (0: only at the end)",
    "checkpoints_total_limit": "keep the last K checkpoints", "logging_steps": "log to the trackers every N steps",
    "num_workers": "DataLoader workers per process", "shuffle_buffer": "shuffle buffer of a streamed dataset",
    "seed": "random seed", "baseline": "also train a no-teacher baseline of the same budget and report Delta_m",
    "freeze_stem": "freeze the Teacher-Agnostic Stem", "train_only_routers": "train only the MoR routers",
    "lora": "LoRA on the stem through peft: `--lora r=8 alpha=16` or a YAML/JSON mapping (r, alpha, dropout, "
            "target_modules); 'none': off",
    "init_from": "a SAK checkpoint (stage 1 or converted reference) to start from; matching weights are loaded",
    "verify_replicas": "at the end, check that every process holds the same parameters (recorded in all_results)",
    "report_to": "trackers: tensorboard, wandb, trackio, ... (comma separated)",
    "output_dir": "where checkpoints, the final model, results and pictures go",
}  # fmt: skip


# How each kind of recipe value is written on the command line (each flag's help names its form).
PAIRS = {"image_size": int, "scale_range": float}  # two numbers: `--image_size 448 576`
MAPPINGS = {"tasks", "task_loss_weights", "stem", "toyrooms", "lora", "teachers"}  # KEY=VALUE pairs or YAML/JSON
OPTIONAL = {"train_limit": int, "stem_model": str, "init_from": str, "report_to": str}  # 'none' = not set


def parse_bool(text: str) -> bool:
    """`true/false`, `yes/no`, `on/off` or `1/0`, any case."""
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; write true or false")
    return value[text.lower()]


def parse_flag_value(key: str, tokens: list[str]):
    """The recipe value of `--key TOKEN ...` for the list and mapping flags (see PAIRS and MAPPINGS)."""
    if key in PAIRS:
        values = yaml.safe_load(tokens[0]) if len(tokens) == 1 else [yaml.safe_load(t) for t in tokens]
        kind = PAIRS[key]
        if not isinstance(values, list) or len(values) != 2 or not all(isinstance(v, int | float) for v in values):
            raise ValueError(f"--{key} {' '.join(tokens)}: expected two numbers, e.g. --{key} {HELP_EXAMPLES[key]}")
        if kind is int and not all(float(v).is_integer() for v in values):
            raise ValueError(f"--{key} {' '.join(tokens)}: expected two integers, e.g. --{key} {HELP_EXAMPLES[key]}")
        return [kind(v) for v in values]
    if len(tokens) == 1 and "=" not in tokens[0]:
        value = yaml.safe_load(tokens[0])
        if key in ("lora", "teachers") and str(value).lower() in ("none", "null"):
            return "none" if key == "teachers" else None
        if key == "teachers" and value == "toyrooms_specialists":
            return value
        if not isinstance(value, dict):
            raise ValueError(f"--{key} {tokens[0]}: expected KEY=VALUE pairs or a YAML/JSON mapping, e.g. --{key} "
                             f"{HELP_EXAMPLES[key]}")  # fmt: skip
        return value
    pairs = [t.partition("=") for t in tokens]
    bad = [t for t, (k, sep, v) in zip(tokens, pairs) if not k or not sep]
    if bad:
        raise ValueError(f"--{key}: {bad} are not KEY=VALUE pairs, e.g. --{key} {HELP_EXAMPLES[key]}")
    return {k: v if key == "teachers" else yaml.safe_load(v) for k, _, v in pairs}


HELP_EXAMPLES = {"image_size": "448 576", "scale_range": "0.5 2.0", "tasks": "semseg=40 depth=1",
                 "task_loss_weights": "semseg=1 depth=1", "stem": "hidden_size=384 num_hidden_layers=12",
                 "toyrooms": "num_train=2000 num_test=200", "lora": "r=8 alpha=16",
                 "teachers": "dinov2=facebook/dinov2-base"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe from configs/ (default: the offline ToyRooms recipe)")
    for key, default in DEFAULT_RECIPE.items():
        if key in PAIRS or key in MAPPINGS:
            kwargs = {"nargs": "+", "metavar": "VALUE"}
        elif isinstance(default, bool):
            kwargs = {"type": parse_bool, "metavar": "{true,false}"}
        elif key in OPTIONAL:
            kind = OPTIONAL[key]
            kwargs = {"type": lambda text, kind=kind: None if text.lower() in ("none", "null") else kind(text)}
        else:
            kwargs = {"type": type(default)}
        parser.add_argument(f"--{key}", default=None, help=f"{HELP[key]} (default: {default})", **kwargs)
    parser.add_argument("--resume_from_checkpoint", help="'latest' (in output_dir) or a checkpoint folder")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE), help="cache of ToyRooms data and teachers")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the final model to --hub_model_id")
    parser.add_argument("--hub_model_id", help="ORG/NAME of the Hub repo for --push_to_hub")
    parser.add_argument("--num_threads", type=int, help="CPU threads per process (default without a GPU: physical "
                        "cores / local processes; `accelerate launch` without --cpu would otherwise leave 1)")  # fmt: skip
    parser.add_argument("--stop_after_steps", type=int, help=argparse.SUPPRESS)  # tests: an abrupt stop (preemption)
    args = parser.parse_args(argv)
    for key in (*PAIRS, *MAPPINGS):
        if getattr(args, key) is not None:
            try:
                setattr(args, key, parse_flag_value(key, getattr(args, key)))
            except (ValueError, yaml.YAMLError) as error:
                parser.error(str(error))
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME")
    return args


def resolve_teachers(recipe: dict, cache_dir: str, accelerator: Accelerator) -> tuple[dict, str]:
    """Teacher specs `{name: {hidden_size, model_id}}` and the dataset location (ToyRooms made or read from cache)."""
    from modeling_sak.teachers import teacher_specs

    dataset = recipe["dataset"]
    if dataset == "toyrooms":
        settings = recipe["toyrooms"]
        with accelerator.main_process_first():
            dataset = str(ensure_toyrooms(cache_dir, settings["num_train"], settings["num_test"],
                                          tuple(recipe["image_size"]), settings["seed"]))  # fmt: skip
    teachers = recipe["teachers"]
    if teachers in (None, "none", {}):
        return {}, dataset
    if teachers == "toyrooms_specialists":
        if recipe["dataset"] != "toyrooms":
            raise ValueError("teachers 'toyrooms_specialists' need dataset 'toyrooms'; name Hub teachers instead")
        with accelerator.main_process_first():
            teachers = {k: str(v) for k, v in ensure_specialists(dataset, cache_dir, recipe["toyrooms"]["teacher_steps"],
                                                                  tuple(recipe["image_size"])).items()}  # fmt: skip
    if not isinstance(teachers, dict):
        raise ValueError(f"teachers={teachers!r} must map name -> Hub id / path, 'toyrooms_specialists' or 'none'")
    return teacher_specs(teachers), dataset


def make_loader(recipe, dataset: str, split: str, train: bool, tasks: list[str], accelerator, seed: int):
    """This process's DataLoader of a split (not to be passed to accelerator.prepare: the stream shards itself, every
    row once per epoch across processes x workers, see `SplitStream`)."""
    data = load_multitask_split(dataset, split, streaming=recipe["streaming"],
                                shuffle_buffer=recipe["shuffle_buffer"] if train and recipe["streaming"] else None,
                                seed=seed)  # fmt: skip
    if train and recipe["train_limit"]:
        limit = recipe["train_limit"]
        data = data.take(limit) if recipe["streaming"] else data.select(range(min(limit, len(data))))
    batch_size = recipe["per_device_train_batch_size" if train else "per_device_eval_batch_size"]
    split_args = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "batch_size": batch_size,
                  "shuffle_seed": seed if train and not recipe["streaming"] else None}  # fmt: skip
    columns = task_columns(data)  # may read a row of a stream: once
    if recipe["stage"] == 1 and not columns:  # images only: any Hub image dataset, e.g. ImageNet-1k
        stream = ImageStream(data, partial(stage1_transform, train, recipe["image_size"][0], seed), train=train,
                             **split_args)  # fmt: skip
    else:
        missing = [t for t in tasks if t not in columns] if dataset not in COLUMN_MAPPINGS else []
        if missing:
            raise ValueError(
                f"dataset {dataset!r} ({split}) has no column for the tasks {missing}; remove them from `tasks` or "
                "convert the data with `python -m modeling_sak.prepare_dataset`"
            )
        transform = MultiTaskTransform(train=train, size=recipe["image_size"], seed=seed,
                                       scale_range=recipe["scale_range"], photometric=recipe["photometric"])  # fmt: skip
        stream = MultiTaskStream(data, transform, tasks, train=train, dataset_name=dataset, **split_args)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=stream.collate,
                                       num_workers=recipe["num_workers"], generator=loader_generator(seed))  # fmt: skip


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader draws a seed whenever it starts iterating; from its own generator that draw leaves the global
    RNG (noisy gating, restored on resume) untouched, so a resumed run continues the same random sequence."""
    return torch.Generator().manual_seed(seed)


def training_state(accelerator: Accelerator, step: int, epoch: int, batch_in_epoch: int, loss_history: list[float],
                   lr_history: list[float]) -> dict:  # fmt: skip
    """What a checkpoint needs beside accelerate's state: the step, the histories and every process's position in its
    data (streamed parts can differ in length between processes, so each keeps its own epoch and batch)."""
    positions = gather_object([[epoch, batch_in_epoch]])
    return {"step": step, "positions": positions, "loss_history": loss_history, "lr_history": lr_history}


def train(recipe: dict, teachers: dict, dataset: str, output_dir: Path, accelerator: Accelerator,
          resume: str | None = None, stop_after_steps: int | None = None, label: str = "SAK") -> dict:  # fmt: skip
    """One training run; returns {"results", "router_weights", "model", "config"}."""
    set_seed(recipe["seed"])
    config = build_config(recipe, teachers)
    tasks = list(config.tasks)
    train_loader = make_loader(recipe, dataset, recipe["train_split"], True, tasks, accelerator, recipe["seed"])

    model = build_model(config, recipe)
    if recipe["fast_path"]:
        model.optimize_for_training()
    if teachers and recipe["distill_alpha"] > 0:
        model.load_teachers(dtype=getattr(torch, recipe["teacher_dtype"]))
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe["weight_decay"]), lr=recipe["learning_rate"])
    scheduler = make_scheduler(optimizer, recipe["lr_scheduler"], recipe["max_steps"], recipe["warmup_steps"],
                               recipe["poly_power"])  # fmt: skip
    # The scheduler is sized in optimizer steps and stepped below once per optimizer step (the Accelerator is made
    # with step_scheduler_with_optimizer=False: otherwise it would step it once per process per optimizer step).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, batch_in_epoch, loss_history, lr_history = 0, 0, 0, [], []
    if resume:
        checkpoint = resolve_checkpoint(output_dir, resume)
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "training_state.json").read_text())
        step, loss_history, lr_history = state["step"], state["loss_history"], state["lr_history"]
        epoch, batch_in_epoch = state["positions"][accelerator.process_index]
        accelerator.print(f"resumed from {checkpoint} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    progress = tqdm(total=recipe["max_steps"], initial=step, desc=f"training {label}",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    skipped_rows, started, stream = 0, step, train_loader.dataset
    model.train()
    while step < recipe["max_steps"]:
        stream.set_epoch(epoch)
        # Resuming inside an epoch: the stream skips the rows read before the checkpoint without decoding them.
        first = stream.start_at(batch_in_epoch, recipe["num_workers"])
        for index, batch in enumerate(train_loader, start=first):
            if index < batch_in_epoch:  # streamed data: the rest of a round of worker batches
                continue
            batch_in_epoch = index + 1
            skipped_rows += len(batch.get("skipped", []))
            if batch.get("pixel_values") is None:
                continue
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"].to(accelerator.device),
                                labels={k: v.to(accelerator.device) if v is not None else None
                                        for k, v in (batch.get("labels") or {}).items()} or None)  # fmt: skip
                check_finite(step + 1, outputs.loss, outputs)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and recipe["max_grad_norm"]:
                    accelerator.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            lr_history.append(scheduler.get_last_lr()[0])  # the rate this step used
            if not optimizer.step_was_skipped:  # fp16: the GradScaler skipped a step with inf/nan gradients
                scheduler.step()
            loss_history.append(accelerator.reduce(outputs.loss.detach(), "mean").item())
            progress.update()
            progress.set_postfix(loss=f"{outputs.loss.item():.3f}", lr=f"{lr_history[-1]:.2e}")
            if recipe["logging_steps"] and step % recipe["logging_steps"] == 0:
                logs = {"loss": outputs.loss.item(), "lr": lr_history[-1]}
                logs |= {f"loss/{k}": v.item() for k, v in (outputs.task_losses or {}).items()}
                logs |= {f"distill/{k}": v.item() for k, v in (outputs.distill_losses or {}).items()}
                accelerator.log({f"{label}/{k}": v for k, v in logs.items()}, step=step)
            if recipe["checkpointing_steps"] and step % recipe["checkpointing_steps"] == 0:
                state = training_state(accelerator, step, epoch, batch_in_epoch, loss_history, lr_history)
                save_checkpoint(accelerator, output_dir, step, state, recipe["checkpoints_total_limit"])
            if stop_after_steps is not None and step - started >= stop_after_steps:
                accelerator.print(f"stopping abruptly after step {step} (--stop_after_steps)")
                os._exit(75)
            if recipe["eval_steps"] and step % recipe["eval_steps"] == 0 and recipe["eval_split"] and tasks:
                eval_loader = make_loader(recipe, dataset, recipe["eval_split"], False, tasks, accelerator, 0)
                results = evaluate(model, eval_loader, accelerator, accelerator.unwrap_model(model).config,
                                   recipe["eval_boundary"])  # fmt: skip
                accelerator.log(
                    {f"{label}/eval/{t}/{m}": v for t, r in results.items() for m, v in r.items()}, step=step
                )
            if step >= recipe["max_steps"]:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()
    if skipped_rows:
        logger.warning(f"{skipped_rows} training rows were skipped (undecodable or mismatched labels)")
    if recipe["checkpointing_steps"] == 0 or step % recipe["checkpointing_steps"]:
        state = training_state(accelerator, step, epoch, batch_in_epoch, loss_history, lr_history)
        save_checkpoint(accelerator, output_dir, step, state, recipe["checkpoints_total_limit"])
    replicas = None
    if recipe["verify_replicas"]:
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(accelerator.device)
        gathered = accelerator.gather(checksum[None]).cpu()
        replicas = {"processes": accelerator.num_processes, "identical": bool((gathered == gathered[0]).all())}

    results, router_weights, sample = {}, None, None
    unwrapped = accelerator.unwrap_model(model)
    if recipe["eval_split"] and tasks:
        eval_loader = make_loader(recipe, dataset, recipe["eval_split"], False, tasks, accelerator, 0)
        results = evaluate(model, eval_loader, accelerator, unwrapped.config, recipe["eval_boundary"])
        sample = next(iter(eval_loader))
        with evaluation_mode(unwrapped):
            outputs = unwrapped(pixel_values=sample["pixel_values"].to(accelerator.device))
            router_weights = outputs.router_weights
            sample["task_outputs"] = {k: v.cpu() for k, v in outputs.task_outputs.items()}
    # Stage 1, stage 2 and the baseline share the Accelerator: let go of this run's model, optimizer and scheduler,
    # or the next run's checkpoints would hold them too.
    accelerator.free_memory()
    return {"results": results, "router_weights": router_weights, "model": unwrapped, "sample": sample,
            "config": unwrapped.config, "skipped_rows": skipped_rows, "steps": step, "loss_history": loss_history,
            "lr_history": lr_history, "replicas": replicas}  # fmt: skip


def print_table(runs: dict[str, dict], accelerator: Accelerator) -> None:
    names = list(runs)
    rows = [(task, metric) for task, values in runs[names[0]]["results"].items() for metric in values]
    width = max(len(f"{t} {m}") for t, m in rows) + 2
    accelerator.print("\n" + "".join([f"{'metric':<{width}}"] + [f"{n:>14}" for n in names]))
    for task, metric in rows:
        marker = " *" if MAIN_METRIC.get(task) == metric else ""
        values = "".join(f"{runs[n]['results'][task][metric]:>14.4f}" for n in names)
        accelerator.print(f"{task + ' ' + metric + marker:<{width}}{values}")
    if len(names) == 2:
        gain = delta_m(runs[names[0]]["results"], runs[names[1]]["results"])
        accelerator.print(f"{'Delta_m (%)':<{width}}{gain:>14.2f}{0.0:>14.2f}   (* = metric used, vs {names[1]})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args.config, {k: getattr(args, k) for k in DEFAULT_RECIPE})
    output_dir = Path(recipe["output_dir"])
    if args.num_threads or not torch.cuda.is_available():
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.num_threads or max(1, (psutil.cpu_count(logical=False) or 1) // local))
    accelerator = Accelerator(
        cpu=distributed_without_gpu(),  # several processes without a GPU: gloo on the CPU
        mixed_precision=recipe["mixed_precision"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        step_scheduler_with_optimizer=False,  # train() steps the schedule once per optimizer step itself
        log_with=recipe["report_to"].split(",") if recipe["report_to"] else None,
        project_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if recipe["report_to"]:
        accelerator.init_trackers("sak", config={k: str(v) for k, v in recipe.items()})

    teachers, dataset = resolve_teachers(recipe, args.cache_dir, accelerator)
    baseline_recipe = recipe | {"teachers": "none"}  # before stage 1: the baseline never sees a teacher
    if recipe["stage"] == 2 and recipe["stage1_steps"] and teachers:
        # Stage 1 (distillation on every training image, labels unused), then stage 2 starts from its student.
        stage1 = recipe | {"stage": 1, "max_steps": recipe["stage1_steps"], "train_limit": None, "eval_split": "",
                           "output_dir": str(output_dir / "stage1")}  # fmt: skip
        first = train(stage1, teachers, dataset, output_dir / "stage1", accelerator, label="stage 1")
        merge_lora(first["model"])  # on every process, so that the replicas (and their checkpoints) stay alike
        if accelerator.is_main_process:
            first["model"].save_pretrained(output_dir / "stage1" / "final", include_aligners=True)
        accelerator.wait_for_everyone()
        recipe = recipe | {"init_from": str(output_dir / "stage1" / "final")}
    run = train(recipe, teachers, dataset, output_dir, accelerator, args.resume_from_checkpoint, args.stop_after_steps)
    runs = {"SAK": run}
    if recipe["baseline"] and teachers and recipe["stage"] == 2 and run["results"]:
        baseline_dir = output_dir / "baseline"
        # The key covers the recipe, the metric definitions and the code (package, this script, torch and
        # transformers versions), so that a cached baseline is what a cold run would train.
        code = source_fingerprint(*sorted(PACKAGE.rglob("*.py")), Path(__file__).resolve())
        identity = baseline_recipe | {"output_dir": "", "metrics_version": METRICS_VERSION, "code": code}
        key = hashlib.sha256(yaml.safe_dump(identity).encode()).hexdigest()[:16]
        cache = Path(args.cache_dir) / f"baseline-{key}.json"
        if cache.exists() and not args.resume_from_checkpoint:
            runs["baseline"] = json.loads(cache.read_text())
            accelerator.print(f"no-teacher baseline read from {cache}")
        else:
            baseline = train(baseline_recipe, {}, dataset, baseline_dir, accelerator, label="baseline")
            runs["baseline"] = {"results": baseline["results"]}
            if accelerator.is_main_process:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(runs["baseline"]))
            shutil.rmtree(baseline_dir, ignore_errors=True)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        model, config = run["model"], run["config"]
        final = output_dir / "final"
        save_lora_adapter(model, output_dir / "lora_adapter")  # with --lora: the adapter alone, peft's format
        merge_lora(model).save_pretrained(final)  # inference checkpoint: LoRA merged, no aligners, no teachers
        SAKImageProcessor(pad_size=config.image_size, size_divisor=config.patch_size[0]).save_pretrained(final)
        results = {name: r["results"] for name, r in runs.items()}
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
        router_picture = None
        if run["results"]:
            print_table(runs, accelerator)
        if run["router_weights"] is not None:
            experts = ["stem", *config.teachers]
            accelerator.print("\nrouter weights (mean over test images and levels):")
            for task, weights in run["router_weights"].items():
                mean = weights.float().mean((0, 1)).tolist()
                accelerator.print(f"  {task:<8}" + "".join(f"  {e}={w:.2f}" for e, w in zip(experts, mean)))
            router_picture = router_bar_chart(run["router_weights"], experts, output_dir / "router_weights.png")
            shutil.copy(router_picture, final / "router_weights.png")
        if run["sample"] is not None:
            num_classes = config.tasks.get("semseg", len(CLASSES))
            prediction_grid(run["sample"]["pixel_values"], run["sample"]["labels"], run["sample"]["task_outputs"],
                            output_dir / "predictions.png", num_classes)  # fmt: skip
        parameters = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aligners."))
        card = render_model_card(config, args.hub_model_id or f"local/{output_dir.name}", run["results"],
                                 recipe | {"parameters": f"{parameters / 1e6:.2f}M"},
                                 recipe["dataset"], "router_weights.png" if router_picture else None)  # fmt: skip
        card.save(final / "README.md")
        accelerator.print(f"\nmodel, processor and card: {final}; results: {output_dir / 'all_results.json'}")
        if args.push_to_hub:
            from modeling_sak.publish import publish

            accelerator.print(f"uploaded to {publish(final, args.hub_model_id)}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
