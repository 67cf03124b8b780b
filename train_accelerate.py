"""Train SAK with Accelerate: stage 1 (distillation) or stage 2 (multi-task + distillation), on CPU, one GPU or many.

    accelerate launch train_accelerate.py                          # the offline ToyRooms default, end to end
    accelerate launch train_accelerate.py --config configs/nyud_vitb.yaml --mixed_precision bf16
    accelerate launch train_accelerate.py --config configs/nyud_vitb.yaml --resume_from_checkpoint latest

Every recipe key (`modeling_sak.training.recipe.Recipe`, configs/*.yaml) is also a flag; flags override the recipe, which
overrides the default. The default renders ToyRooms, pretrains its two specialist teachers (both cached under
--cache_dir), trains SAK and a no-teacher baseline of the same budget, and prints and draws the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from modeling_sak.cli import advance, bad_input_exits, progress_bar
from modeling_sak.evaluation.loop import evaluate, evaluation_mode
from modeling_sak.evaluation.registry import METRICS_VERSION
from modeling_sak.teachers.committee import SAKTeachers
from modeling_sak.teachers.specialists import DEFAULT_CACHE, PACKAGE, source_fingerprint
from modeling_sak.training.checkpoints import clear_run, resolve_checkpoint, save_checkpoint, training_state
from modeling_sak.training.cpu_allocator import configure_cpu_allocator
from modeling_sak.training.loaders import make_loader, resolve_data_and_teachers
from modeling_sak.training.lora import merge_lora
from modeling_sak.training.optimization import check_finite, make_optimizer, make_scheduler
from modeling_sak.training.preflight import check_recipe
from modeling_sak.training.recipe import Recipe, add_recipe_arguments, load_recipe, recipe_overrides
from modeling_sak.training.run_outputs import write_run_outputs
from modeling_sak.training.sharding import (
    SHARDED_STATE_DIR,
    distributed_without_gpu,
    fsdp_from_launcher,
    gather_student,
    launch_error,
    load_sharded,
    shard_student,
)
from modeling_sak.training.student import build_config, build_model, student_structure


logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe from configs/ (default: the offline ToyRooms recipe)")
    add_recipe_arguments(parser)  # one flag per recipe key, written as its help says
    parser.add_argument("--resume_from_checkpoint", help="'latest' (in output_dir) or a checkpoint folder")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start over in an output_dir that holds a run: its checkpoints, final/ and results are deleted first "
        "(without it such a folder is refused, unless resumed)",
    )
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE), help="cache of ToyRooms data and teachers")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the final model to --hub_model_id")
    parser.add_argument("--hub_model_id", help="ORG/NAME of the Hub repo for --push_to_hub")
    parser.add_argument(
        "--num_threads",
        type=int,
        help="CPU threads per process (default without a GPU: physical "
        "cores / local processes; `accelerate launch` without --cpu would otherwise leave 1)",
    )
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME")
    try:
        recipe = load_recipe(args.config, recipe_overrides(args, parser))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    fsdp = fsdp_from_launcher()  # `accelerate launch --use_fsdp`: the same FSDP2 sharding as the recipe key
    if fsdp is not None:
        checkpointing = recipe.gradient_checkpointing or fsdp["activation_checkpointing"]
        recipe = recipe.replace(distributed_strategy="fsdp2", gradient_checkpointing=checkpointing)
    problem = launch_error(recipe, script=Path(__file__).name)
    if problem:  # before any work: never train with another engine than the one asked for
        parser.error(problem)
    return args, recipe


def train(
    recipe: Recipe,
    teacher_specs: dict,
    dataset: str,
    output_dir: Path,
    accelerator: Accelerator,
    resume: str | None = None,
    label: str = "SAK",
) -> dict:
    """One training run: the student, its frozen teachers, the loop, a final checkpoint and evaluation."""
    set_seed(recipe.seed)
    config = build_config(recipe, teacher_specs, dataset)
    tasks = list(config.tasks)
    train_loader = make_loader(recipe, dataset, recipe.train_split, True, tasks, accelerator, recipe.seed)

    model = build_model(config, recipe)
    teachers = None
    if teacher_specs and recipe.distill_alpha > 0:  # frozen, outside the student: never trained, never saved
        teachers = SAKTeachers.from_config(config, dtype=getattr(torch, recipe.teacher_dtype)).to(accelerator.device)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sharded = recipe.distributed_strategy == "fsdp2"
    if sharded:  # each process keeps 1/N of the student's parameters, gradients and AdamW state
        fsdp = fsdp_from_launcher() or {}
        model = shard_student(
            model,
            accelerator.device,
            recipe.mixed_precision,
            reshard_after_forward=fsdp.get("reshard_after_forward", True),
            offload_params=fsdp.get("offload_params", False),
        )
    optimizer = make_optimizer(model, recipe.learning_rate, recipe.weight_decay)
    scheduler = make_scheduler(
        optimizer, recipe.lr_scheduler, recipe.max_steps, recipe.warmup_steps, recipe.poly_power
    )
    # The scheduler is sized in optimizer steps and stepped below once per optimizer step (the Accelerator is made
    # with step_scheduler_with_optimizer=False: otherwise it would step it once per process per optimizer step).
    if sharded:  # the student and its optimizer are already sharded; their checkpoints are `save_sharded`'s
        scheduler = accelerator.prepare(scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    shards = (model, optimizer) if sharded else None  # what save_checkpoint writes with `save_sharded`

    def plain_student() -> torch.nn.Module:  # the whole student, evaluated and saved as a DDP run's
        if not sharded:
            return accelerator.unwrap_model(model)
        return gather_student(model, lambda: student_structure(config, recipe), accelerator.device)

    step, epoch, batch_in_epoch, loss_history, lr_history = 0, 0, 0, [], []
    if resume:
        checkpoint = resolve_checkpoint(output_dir, resume, recipe.distributed_strategy)
        accelerator.load_state(str(checkpoint))
        if sharded:
            load_sharded(model, optimizer, checkpoint / SHARDED_STATE_DIR)
        state = json.loads((checkpoint / "training_state.json").read_text())
        step, loss_history, lr_history = state["step"], state["loss_history"], state["lr_history"]
        epoch, batch_in_epoch = state["positions"][accelerator.process_index]
        accelerator.print(f"resumed from {checkpoint} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    progress = progress_bar(
        total=recipe.max_steps, initial=step, desc=f"training {label}", disable=not accelerator.is_local_main_process
    )
    skipped_rows, stream = 0, train_loader.dataset
    model.train()
    while step < recipe.max_steps:
        stream.set_epoch(epoch)
        # Resuming inside an epoch: the stream skips the rows read before the checkpoint without decoding them.
        first = stream.start_at(batch_in_epoch, recipe.num_workers)
        for index, batch in enumerate(train_loader, start=first):
            if index < batch_in_epoch:  # streamed data: the rest of a round of worker batches
                continue
            batch_in_epoch = index + 1
            skipped_rows += len(batch.get("skipped", []))
            if batch.get("pixel_values") is None:
                continue
            pixel_values = batch["pixel_values"].to(accelerator.device)
            labels = {k: v if v is None else v.to(accelerator.device) for k, v in batch.get("labels", {}).items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():  # a prepared (DDP) student autocasts itself too; a sharded one not
                    teacher_features = None
                    if teachers is not None:  # SAK's central step: the committee's targets for this batch
                        teacher_features = teachers(pixel_values)
                    outputs = model(
                        pixel_values=pixel_values, labels=labels or None, teacher_features=teacher_features
                    )
                check_finite(step + 1, outputs.loss, outputs)
                if sharded:  # reduce-scatter the gradients only on the last batch of an optimizer step
                    model.set_requires_gradient_sync(accelerator.sync_gradients)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and recipe.max_grad_norm:
                    if sharded:  # the norm of the whole gradient, over every shard
                        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                    else:
                        accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                if accelerator.sync_gradients or not sharded:  # a prepared optimizer skips the other batches itself
                    optimizer.step()
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            lr_history.append(scheduler.get_last_lr()[0])  # the rate this step used
            if not getattr(optimizer, "step_was_skipped", False):  # fp16: the GradScaler skipped an inf/nan step
                scheduler.step()
            loss_history.append(accelerator.reduce(outputs.loss.detach(), "mean").item())
            advance(progress, loss=f"{outputs.loss.item():.3f}", lr=f"{lr_history[-1]:.2e}")
            if recipe.logging_steps and step % recipe.logging_steps == 0:
                logs = {"loss": outputs.loss.item(), "lr": lr_history[-1]}
                logs |= {f"loss/{k}": v.item() for k, v in (outputs.task_losses or {}).items()}
                logs |= {f"distill/{k}": v.item() for k, v in (outputs.distill_losses or {}).items()}
                accelerator.log({f"{label}/{k}": v for k, v in logs.items()}, step=step)
            if recipe.checkpointing_steps and step % recipe.checkpointing_steps == 0:
                state = training_state(step, epoch, batch_in_epoch, loss_history, lr_history)
                save_checkpoint(accelerator, output_dir, step, state, recipe.checkpoints_total_limit, shards)
            if recipe.eval_steps and step % recipe.eval_steps == 0 and recipe.eval_split and tasks:
                eval_loader = make_loader(recipe, dataset, recipe.eval_split, False, tasks, accelerator, 0)
                results = evaluate(
                    plain_student() if sharded else model, eval_loader, accelerator, config, recipe.eval_boundary
                )
                logs = {f"{label}/eval/{t}/{m}": v for t, r in results.items() for m, v in r.items()}
                accelerator.log(logs, step=step)
            if step >= recipe.max_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()
    if skipped_rows:
        logger.warning(
            f"{skipped_rows} training rows were skipped (undecodable or mismatched labels)", main_process_only=False
        )
    if recipe.checkpointing_steps == 0 or step % recipe.checkpointing_steps:
        state = training_state(step, epoch, batch_in_epoch, loss_history, lr_history)
        save_checkpoint(accelerator, output_dir, step, state, recipe.checkpoints_total_limit, shards)
    unwrapped = plain_student()
    replicas = None
    if recipe.verify_replicas:  # of a sharded run: its gathered copies
        checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).to(accelerator.device)
        gathered = accelerator.gather(checksum[None]).cpu()
        replicas = {"processes": accelerator.num_processes, "identical": bool((gathered == gathered[0]).all())}

    results, router_weights, sample = {}, None, None
    if recipe.eval_split and tasks:
        eval_loader = make_loader(recipe, dataset, recipe.eval_split, False, tasks, accelerator, 0)
        evaluated = unwrapped if sharded else model
        results = evaluate(evaluated, eval_loader, accelerator, config, recipe.eval_boundary)
        sample = next(iter(eval_loader))
        with evaluation_mode(unwrapped):
            outputs = unwrapped(pixel_values=sample["pixel_values"].to(accelerator.device))
            router_weights = outputs.router_weights
            sample["task_outputs"] = {k: v.cpu() for k, v in outputs.task_outputs.items()}
    # Stage 1, stage 2 and the baseline share the Accelerator: let go of this run's model, optimizer and scheduler,
    # or the next run's checkpoints would hold them too.
    accelerator.free_memory()
    return {
        "results": results,
        "router_weights": router_weights,
        "model": unwrapped,
        "sample": sample,
        "config": unwrapped.config,
        "skipped_rows": skipped_rows,
        "steps": step,
        "loss_history": loss_history,
        "lr_history": lr_history,
        "replicas": replicas,
    }


def train_baseline(
    recipe: Recipe, dataset: str, output_dir: Path, cache_dir: str, accelerator: Accelerator, fresh: bool
) -> dict:
    """The no-teacher baseline with the same stage-2 budget, its results cached under a key of the recipe, the metric
    definitions and the code (package, this script, torch and transformers versions): a cached baseline is exactly
    what a cold run would train."""
    code = source_fingerprint(*sorted(PACKAGE.rglob("*.py")), Path(__file__).resolve())
    identity = recipe.to_dict() | {"output_dir": "", "metrics_version": METRICS_VERSION, "code": code}
    cache = Path(cache_dir) / f"baseline-{hashlib.sha256(yaml.safe_dump(identity).encode()).hexdigest()[:16]}.json"
    if cache.exists() and not fresh:
        accelerator.print(f"no-teacher baseline read from {cache}")
        return json.loads(cache.read_text())
    run = train(recipe, {}, dataset, output_dir / "baseline", accelerator, label="baseline")
    baseline = {"results": run["results"]}
    if accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(baseline))
        shutil.rmtree(output_dir / "baseline", ignore_errors=True)
    return baseline


def main(argv: list[str] | None = None) -> None:
    """The script; a bad input ends in one `train_accelerate.py: error:` line and exit status 2."""
    with bad_input_exits(Path(__file__).name):
        _main(argv)


def _main(argv: list[str] | None = None) -> None:
    args, recipe = parse_args(argv)
    # Every check that needs no long work, before any: stem, teachers, dataset, init_from, output_dir.
    check_recipe(recipe, args.resume_from_checkpoint, args.overwrite_output_dir)
    output_dir = Path(recipe.output_dir)
    configure_cpu_allocator(recipe.cpu_allocator)  # before the first step's tensors: freed memory stays mapped
    if args.num_threads or not torch.cuda.is_available():
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.num_threads or max(1, (psutil.cpu_count(logical=False) or 1) // local))
    accelerator = Accelerator(
        cpu=distributed_without_gpu(),  # several processes without a GPU: gloo on the CPU
        mixed_precision=recipe.mixed_precision,
        dynamo_backend="inductor" if recipe.torch_compile else None,  # compiles the student in prepare()
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # train() steps the schedule once per optimizer step itself
        log_with=recipe.report_to.split(",") if recipe.report_to else None,
        project_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            clear_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if recipe.report_to:
        accelerator.init_trackers("sak", config={k: str(v) for k, v in recipe.to_dict().items()})

    seconds, start = {}, time.perf_counter()  # wall time per phase, printed at the end

    def phase_done(name: str) -> None:
        nonlocal start
        seconds[name], start = time.perf_counter() - start, time.perf_counter()

    dataset, teachers = resolve_data_and_teachers(recipe, args.cache_dir, accelerator)
    phase_done("data and teachers")
    baseline_recipe = recipe.replace(teachers="none")  # before stage 1: the baseline never sees a teacher
    if recipe.stage == 2 and recipe.stage1_steps and teachers:
        # Stage 1 (distillation on every training image, labels unused), then stage 2 starts from its student.
        stage1 = recipe.replace(
            stage=1,
            max_steps=recipe.stage1_steps,
            train_limit=None,
            eval_split="",
            output_dir=str(output_dir / "stage1"),
        )
        first = train(stage1, teachers, dataset, output_dir / "stage1", accelerator, label="stage 1")
        if accelerator.is_main_process:
            merge_lora(first["model"]).save_pretrained(output_dir / "stage1" / "final", include_aligners=True)
        accelerator.wait_for_everyone()
        recipe = recipe.replace(init_from=str(output_dir / "stage1" / "final"))
        phase_done("stage 1")
    runs = {"SAK": train(recipe, teachers, dataset, output_dir, accelerator, args.resume_from_checkpoint)}
    phase_done(f"stage {recipe.stage} and evaluation")
    if recipe.baseline and teachers and recipe.stage == 2 and runs["SAK"]["results"]:
        fresh = bool(args.resume_from_checkpoint)
        runs["baseline"] = train_baseline(baseline_recipe, dataset, output_dir, args.cache_dir, accelerator, fresh)
        phase_done("baseline and evaluation")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        final = write_run_outputs(output_dir, runs, recipe, args.hub_model_id, accelerator.print)
        accelerator.print(f"\nmodel, processor and card: {final}; results: {output_dir / 'all_results.json'}")
        phase_done("outputs")
        accelerator.print(
            "wall time per phase: " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        )
        if args.push_to_hub:
            from modeling_sak.commands.publish import publish

            accelerator.print(f"uploaded to {publish(final, args.hub_model_id)}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
