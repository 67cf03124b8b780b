"""Beyond one device's memory: the student sharded with FSDP2, and the launch checks that refuse what would otherwise
run as something else without a word.

FSDP2 is torch's `torch.distributed.fsdp.fully_shard` (the engine `accelerate launch --use_fsdp --fsdp_version 2`
calls). Here it is applied by `shard_student` itself, on GPUs (NCCL) and CPUs (gloo) alike, so that the sharding,
checkpointing and gathering below are the same code on every device and tests run them on CPUs:

- `shard_student`: one FSDP2 unit per class in the student's `_no_split_modules` (each `SAKStemLayer`, the
  `SAKEmbeddings`), and the root unit with the adapter paths, routers and heads. Frozen and trainable parameters
  (LoRA, `freeze_stem`) share units. Each process keeps 1/N of every parameter, its gradient and its AdamW state.
- `save_sharded` / `load_sharded`: model and optimizer state in `torch.distributed.checkpoint` format, each process
  writing and reading its own shards (accelerate's `save_state` keeps the scheduler, RNG states and the rest).
- `gather_student`: every process gets a plain (unsharded) copy of the student, which evaluates without collective
  calls and saves with `save_pretrained` exactly the files of a DDP run.

The frozen teachers stay outside: replicated, in their dtype, on every process (docs/speed_and_memory.md, "Memory per GPU").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn


SHARDED_STATE_DIR = "student_sharded"  # inside a checkpoint folder: model + optimizer shards (FSDP2 runs)

_TRUE = ("1", "true", "yes", "on")


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def fsdp_from_launcher(environ: Mapping[str, str] | None = None) -> dict[str, bool] | None:
    """The FSDP settings `accelerate launch --use_fsdp` (or an accelerate config with `distributed_type: FSDP`)
    passed to this process, or None when it asked for none: `reshard_after_forward` (`--fsdp_reshard_after_forward`,
    default true), `offload_params` (`--fsdp_offload_params`) and `activation_checkpointing`
    (`--fsdp_activation_checkpointing`, the same as the recipe's `gradient_checkpointing`)."""
    environ = os.environ if environ is None else environ
    if not _flag(environ, "ACCELERATE_USE_FSDP"):
        return None
    return {
        "reshard_after_forward": environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() in _TRUE,
        "offload_params": _flag(environ, "FSDP_OFFLOAD_PARAMS"),
        "activation_checkpointing": _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING"),
    }


def launch_error(
    recipe, environ: Mapping[str, str] | None = None, cuda_available: bool | None = None, script: str = "train.py"
) -> str | None:
    """Why this run must not start as launched, or None. Checked before any work, so a run never trains with another
    engine than the one asked for: DeepSpeed (not run here), FSDP1, FSDP through Accelerate on a machine without GPUs
    (Accelerate would train plain DDP over gloo), `accelerate launch --num_processes N` that started one process,
    and the recipe's `distributed_strategy: fsdp2` with one process, fp16 or torch_compile. Each message names what
    was asked, what would have run instead and the command that works."""
    environ = os.environ if environ is None else environ
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    world_size = int(environ.get("WORLD_SIZE", "1"))
    torchrun = f"torchrun --nproc_per_node N {script}"
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        return (
            "DeepSpeed was asked for (accelerate launch --use_deepspeed, or an accelerate config with distributed_type "
            f"DEEPSPEED), but {script} does not run DeepSpeed (without GPUs Accelerate would have trained plain DDP; "
            "the script's checkpoints, LoRA merge and final save are built for DDP and FSDP2). For ZeRO-3's sharding "
            "of parameters, gradients and optimizer state use FSDP2: `accelerate launch --config_file "
            f"configs/accelerate_fsdp2.yaml {script} ...` on GPUs, or `{torchrun} --distributed_strategy fsdp2 ...` "
            "on GPUs or CPUs"
        )
    fsdp = fsdp_from_launcher(environ)
    if fsdp is not None:
        version = environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            return (
                f"FSDP version {version} was asked for (accelerate launch --use_fsdp without --fsdp_version 2, or an "
                f"accelerate config with fsdp_version: {version}); {script} shards with FSDP2 only: add "
                "--fsdp_version 2, or use --config_file configs/accelerate_fsdp2.yaml"
            )
        policy = environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip()
        if policy != "TRANSFORMER_BASED_WRAP":
            return (
                f"fsdp_auto_wrap_policy {policy}: {script} wraps the student's transformer blocks (SAKStemLayer, "
                "SAKEmbeddings: its _no_split_modules) and nothing else; use TRANSFORMER_BASED_WRAP or leave it out"
            )
        state_dict_type = environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT").strip()
        if state_dict_type != "SHARDED_STATE_DICT":
            return (
                f"fsdp_state_dict_type {state_dict_type}: {script}'s checkpoints are always sharded "
                "(torch.distributed.checkpoint, each process its part) and its final folder always the whole model "
                "gathered into one safetensors file; use SHARDED_STATE_DICT or leave it out"
            )
        classes = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").replace(" ", "")
        if classes and set(classes.split(",")) != {"SAKStemLayer", "SAKEmbeddings"}:
            return (
                f"fsdp_transformer_layer_cls_to_wrap {classes}: {script} shards one unit per SAKStemLayer and the "
                "SAKEmbeddings (the student's _no_split_modules); write SAKStemLayer,SAKEmbeddings or leave it out"
            )
        if not cuda_available:
            return (
                "FSDP was asked for (accelerate launch --use_fsdp) on a machine without a GPU: Accelerate sets FSDP up "
                "only for GPUs and would have trained plain DDP over gloo instead. The same FSDP2 sharding runs on "
                f"CPUs when named in the recipe: `{torchrun} --distributed_strategy fsdp2 ...` (or `{torchrun} ...` "
                "for DDP)"
            )
    if "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ:
        # accelerate's single-process launcher (it alone sets ACCELERATE_USE_CPU without WORLD_SIZE) sets MASTER_ADDR
        # only when asked for several processes or machines
        return (
            "accelerate launch was asked for several processes (--num_processes N) but started one: without "
            "--multi_gpu (or --use_fsdp on GPUs) it runs the script once, and this run would have trained alone. "
            f"Start N processes with `{torchrun} ...` (CPUs or GPUs) or `accelerate launch --multi_gpu "
            f"--num_processes N {script} ...`"
        )
    if recipe.distributed_strategy == "fsdp2":
        if world_size < 2:
            return (
                "distributed_strategy 'fsdp2' shards the student across processes, and this run has one: start "
                f"several with `{torchrun} ...` or `accelerate launch --config_file configs/accelerate_fsdp2.yaml "
                f"--num_processes N {script} ...` (GPUs), or use distributed_strategy 'ddp'"
            )
        if recipe.mixed_precision == "fp16":
            return (
                "mixed_precision 'fp16' with distributed_strategy 'fsdp2': fp16 needs a loss scaler whose overflow "
                "check spans every shard, which this script does not have; use --mixed_precision bf16"
            )
        if recipe.torch_compile:
            return (
                "torch_compile with distributed_strategy 'fsdp2': Accelerate compiles an unsharded student (DDP) "
                "only; leave torch_compile off with fsdp2"
            )
    return None


def _device_mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def shard_student(
    model: nn.Module,
    device: torch.device,
    mixed_precision: str = "no",
    reshard_after_forward: bool = True,
    offload_params: bool = False,
) -> nn.Module:
    """Shard `model` in place with FSDP2 across every process of the default process group and return it.

    One `fully_shard` unit per module whose class is in `model._no_split_modules` (SAK: each `SAKStemLayer` and the
    `SAKEmbeddings`), then the root (adapter paths, routers, heads). Under bf16 the stem's units all-gather and
    compute with bfloat16 parameters and reduce gradients in float32 (`MixedPrecisionPolicy`); the root keeps float32
    parameters (its BatchNorm statistics and small layers), and autocast covers the rest as in a DDP run.
    `offload_params` keeps the shards (and AdamW's step) on the CPU. Call after `build_model` (LoRA, freezing and
    gradient checkpointing applied) and before `make_optimizer`: the optimizer must see the sharded parameters.

    Raises:
        RuntimeError: without an initialised process group (`torchrun`, `accelerate launch`).
    """
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    except ImportError as error:
        raise ImportError(f"distributed_strategy 'fsdp2' needs torch>=2.6 (this is {torch.__version__})") from error

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("shard_student needs a process group: launch with torchrun or accelerate launch")
    model.to(device)
    mesh = _device_mesh(device)
    offload = CPUOffloadPolicy() if offload_params else OffloadPolicy()
    common = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "offload_policy": offload}
    low = {"bf16": torch.bfloat16}.get(mixed_precision)
    unit_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [module for module in model.modules() if type(module).__name__ in names]
    if not units:
        raise ValueError(f"{type(model).__name__} names no _no_split_modules found in it: {sorted(names)}")
    for module in units:
        fully_shard(module, mp_policy=unit_policy, **common)
    fully_shard(model, **common)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> Path:
    """Write the sharded student and its optimizer state (every process its own shards) with
    `torch.distributed.checkpoint`. Collective: call on every process.

    Buffers are not sharded: each process's BatchNorm statistics follow its own batches, and the checkpoint keeps one
    copy of each, written by whichever process the planner picks. So every process takes process 0's buffers first
    (what DDP's buffer broadcast does before every forward): the saved copy, and the final model, are process 0's,
    and a resumed run continues bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    return Path(directory)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Read what `save_sharded` wrote into the sharded `model` and `optimizer` (the same number of processes).
    Collective: call on every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gather_student(model: nn.Module, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """A plain copy of the sharded `model` on every process, on `device`: `build()` makes an unsharded module of the same
    structure (LoRA layers included), which receives the full state dict and, for every buffer (BatchNorm
    statistics), process 0's values, as DDP's buffer broadcast gives every replica. Collective: call on every
    process. The copy evaluates without collective calls, and `save_pretrained` writes the student's own files (a
    sharded module would carry torch's FSDP classes into `auto_map` and the copied code)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = build()
    plain.load_state_dict(state, strict=True)
    plain.to(device)
    for buffer in plain.buffers():
        torch.distributed.broadcast(buffer, src=0)
    plain.train(model.training)
    return plain


def distributed_without_gpu() -> bool:
    """True when several processes were launched (torchrun, accelerate launch) on a machine without a GPU: then
    `Accelerator(cpu=True)` is needed for them to form a gloo group instead of each running alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
