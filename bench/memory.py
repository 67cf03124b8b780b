"""GPU memory of one SAK training step, counted (not measured): the same bytes on every device.

    python bench/memory.py [--world_size 8]

For each student (ViT-S/B/L), committee (DINOv2 / CLIP / SAM, base or large), stage (1: distillation only; 2: the
four NYUD-v2 tasks + distillation) at 448 x 576, per-device batch 1/2/4, bf16 autocast, with and without
`gradient_checkpointing`, and for every shipped recipe (configs/*.yaml: its student, committee, stage, size, batch
and tasks) in bf16, bf16 with gradient checkpointing and float32 (`mixed_precision: no`), it counts per device:

- weights: the student in float32; its gradients (float32) and AdamW's two moments (float32), every parameter
  trainable (full fine-tuning: LoRA or `freeze_stem` need less);
- DDP adds its gradient buckets (a float32 copy of the gradients: `gradient_as_bucket_view` is off by default);
- FSDP2 over `--world_size` processes (`modeling_sak.training.sharding.shard_student`) keeps 1/N of weights, gradients and
  moments, plus what is unsharded at a time: the root unit (adapter paths, routers, heads) in float32 with its
  float32 gradient for the whole step, and two stem blocks in bfloat16 (the one running and the one prefetched)
  with one block's float32 gradient before its reduce-scatter;
- saved activations: every tensor autograd keeps for the backward (`torch.autograd.graph.saved_tensors_hooks`,
  each storage once, parameters excluded), found by running the real forward under bf16 autocast on fake tensors
  (`FakeTensorMode`: shapes and dtypes, no data, no compute). Under DDP they include autocast's bfloat16 copies of
  the stem's weights; under FSDP2 the stem's weights are bfloat16 already and those copies are not made. With
  gradient checkpointing each stem block keeps its input only, and its activations come back, one block at a time,
  in the backward (added: the largest block's);
- the frozen committee: its weights in bfloat16 (`teacher_dtype: bfloat16`, replicated on every device under
  either strategy) and the teacher features of the batch (bfloat16, kept for the loss).

Not counted: the CUDA context and NCCL buffers (about 0.5-1 GiB), allocator fragmentation, workspace of single
kernels, the teachers' own forward (no-grad, freed before the student's forward; far below the student's
activations). So `need` is a floor: the GPU column of docs/speed_and_memory.md leaves 15% headroom. The CPU's autocast casts the same
operations to bfloat16 as CUDA's for the matmuls, convolutions and attention (its flash-attention kernel saves the
output and log-sum-exp, as CUDA's does), which hold nearly all saved bytes.
Results go to bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from speed import machine_info
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import teacher_configs


REPO_ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
STUDENTS = {"vit_small": (384, 6, 12), "vit_base": (768, 12, 12), "vit_large": (1024, 16, 24)}
COMMITTEES = {"base": 768, "large": 1024}  # DINOv2 / CLIP / SAM of that size: their common width
NYUD_TASKS = {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
GPUS = [("24 GB (L4, RTX 4090)", 24e9), ("40 GB (A100-40G)", 40e9), ("80 GB (A100-80G, H100)", 80e9)]
HEADROOM = 0.85


def committee_bytes(size: str) -> int:
    """Bytes of the frozen committee's weights in bfloat16: transformers' DINOv2, CLIP and SAM vision models of that
    size (the same architectures as the recipes' timm teachers), built on the meta device."""
    from transformers import CLIPVisionModel, Dinov2Model, SamVisionModel

    classes = {"dinov2": Dinov2Model, "clip": CLIPVisionModel, "sam": SamVisionModel}
    total = 0
    for name, config in teacher_configs(size).items():
        with torch.device("meta"):
            total += sum(p.numel() for p in classes[name](config).parameters())
    return 2 * total


def student_config(student: str, teacher_width: int, image_size, tasks: dict[str, int]):
    from modeling_sak import SAKConfig

    width, heads, depth = STUDENTS[student]
    stem = {
        "model_type": "vit",
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": 4 * width,
        "patch_size": 16,
        "layer_norm_eps": 1e-6,
    }
    return SAKConfig(
        stem_config=stem,
        teachers=dict.fromkeys(("dinov2", "clip", "sam"), teacher_width),
        tasks=tasks,
        image_size=list(image_size),
        use_aligners=teacher_width != width,
    )


def labels_for(tasks: dict[str, int], batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
    labels = {}
    for task, channels in tasks.items():
        if task == "normals":
            labels[task] = torch.nn.functional.normalize(torch.randn(batch, 3, height, width), dim=1)
        elif task in ("edge", "depth"):
            labels[task] = torch.rand(batch, 1, height, width)
        else:  # class ids
            labels[task] = torch.randint(0, channels, (batch, height, width))
    return labels


class WeightCasts(TorchDispatchMode):
    """Storages that autocast's casts of `parameters` produce (their bfloat16 copies), by parameter name."""

    def __init__(self, parameters: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {p.untyped_storage()._cdata: name for name, p in parameters.items()}
        self.casts: dict[int, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):
            name = self.names.get(args[0].untyped_storage()._cdata)
            if name is not None:
                self.casts[out.untyped_storage()._cdata] = name
        return out


def count_step(
    student: str, committee: str, stage: int, image_size, batch: int, checkpointing: bool, tasks=None, bf16=True
):
    """Bytes of one training step's parts (see the module docstring), on fake tensors; call inside `FakeTensorMode`.
    `bf16=False`: float32 throughout (`mixed_precision: no`, the recipes' default)."""
    from modeling_sak import SAKForMultiTask

    tasks = {} if stage == 1 else dict(tasks or NYUD_TASKS)
    config = student_config(student, COMMITTEES[committee], image_size, tasks)
    model = SAKForMultiTask(config).train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    parameters = dict(model.named_parameters())
    weights = sum(p.numel() * p.element_size() for p in parameters.values())
    root = sum(p.numel() * 4 for n, p in parameters.items() if not n.startswith("stem."))
    block = sum(p.numel() for p in model.stem.layers[0].parameters())

    height, width = image_size
    grid = (height // 16, width // 16)
    pixel_values = torch.randn(batch, 3, height, width)
    teacher_features = {
        name: [torch.randn(batch, t["hidden_size"], *grid, dtype=torch.bfloat16) for _ in config.out_indices]
        for name, t in config.teachers.items()
    }
    features = sum(f.numel() * 2 for levels in teacher_features.values() for f in levels)
    labels = labels_for(tasks, batch, height, width) if tasks else None

    saved: dict[int, int] = {}  # storage -> bytes
    per_block: dict[int, int] = {}  # stem block -> bytes saved while it runs (no checkpointing)
    current = [None]
    parameter_storages = {p.untyped_storage()._cdata for p in parameters.values()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in parameter_storages and key not in saved:
            saved[key] = storage.nbytes()
            if current[0] is not None:
                per_block[current[0]] = per_block.get(current[0], 0) + storage.nbytes()
        return tensor

    def keep(tensor) -> None:  # a forward pre-hook must return None to keep the module's input
        pack(tensor)

    handles = []
    for index, layer in enumerate(model.stem.layers):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda *_: current.__setitem__(0, None)))
        # a checkpointed block keeps its input for the recompute (held by the checkpoint, not by a saved tensor)
        handles.append(layer.register_forward_pre_hook(lambda _, args: keep(args[0])))
    casts = WeightCasts(parameters)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with casts:
            model(pixel_values=pixel_values, labels=labels, teacher_features=teacher_features)
    for handle in handles:
        handle.remove()
    stem_casts = sum(saved.get(k, 0) for k, name in casts.casts.items() if name.startswith("stem."))
    activations = sum(saved.values())
    recompute = 0
    if checkpointing:  # one block's activations at a time in the backward: the largest, from a plain pass
        plain = count_step(student, committee, stage, image_size, batch, False, tasks, bf16)
        recompute = plain["largest_block_activations"]
    return {
        "weights": weights,
        "root_weights": root,
        "block_parameters": block,
        "activations": activations,
        "stem_weight_casts": stem_casts,
        "recompute": recompute,
        "largest_block_activations": max(per_block.values(), default=0),
        "teacher_features": features,
        "bf16": bf16,
    }


def per_device(parts: dict, committee: str, world_size: int, teachers: dict[str, int]) -> dict[str, float]:
    """GiB per device for DDP and FSDP2 over `world_size` from the counted parts."""
    weights = parts["weights"]  # float32; gradients and each AdamW moment are as large
    frozen = teachers[committee] + parts["teacher_features"]
    activations = parts["activations"] + parts["recompute"]
    ddp = weights * 5 + activations + frozen  # weights, gradients, buckets, 2 moments
    sharded = weights * 4 / world_size  # weights, gradients, 2 moments
    block_bytes = 2 if parts["bf16"] else 4  # the stem's units all-gather bf16 parameters under bf16
    gathered = 2 * parts["root_weights"] + parts["block_parameters"] * (2 * block_bytes + 4)
    fsdp2 = sharded + gathered + activations - parts["stem_weight_casts"] + frozen
    return {"ddp": ddp / GiB, "fsdp2": fsdp2 / GiB}


def smallest_gpu(gib: float) -> str:
    for name, capacity in GPUS:
        if gib * GiB <= HEADROOM * capacity:
            return name
    return "more than 80 GB"


def recipe_settings(path: Path) -> dict:
    """The student, committee, stage, size, batch and tasks a shipped recipe trains with."""
    recipe = yaml.safe_load(path.read_text())
    stem = recipe.get("stem_model", "")
    student = next(
        s for s, key in (("vit_small", "small"), ("vit_base", "base"), ("vit_large", "large")) if key in stem
    )
    names = " ".join(str(v) for v in (recipe.get("teachers") or {}).values())
    committee = "large" if re.search(r"large|_l_|vit-l", names) else "base"
    return {
        "student": student,
        "committee": committee,
        "stage": recipe.get("stage", 2),
        "image_size": recipe["image_size"],
        "batch": recipe["per_device_train_batch_size"],
        "tasks": recipe.get("tasks", NYUD_TASKS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_size", type=int, default=8, help="processes FSDP2 shards over (default: 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="per-device batch sizes")
    args = parser.parse_args()

    teachers = {size: committee_bytes(size) for size in COMMITTEES}
    rows, recipes = [], {}
    with FakeTensorMode():  # one mode: the heads' cached resize matrices are made in it once
        import modeling_sak.remote_code.losses as losses
        import modeling_sak.remote_code.modeling_sak as modeling

        modeling.SAKForMultiTask._init_weights = lambda self, module: None  # fake tensors: no values to initialise
        # Saliency's balanced cross entropy weighs its 2 classes by the labels' values, which fake tensors do not
        # have: counted unweighted (the same saved tensors, less a 2-number weight).
        cross_entropy = losses.cross_entropy_loss
        losses.cross_entropy_loss = lambda *args, balanced=False, **kwargs: cross_entropy(*args, **kwargs)
        for stage in (2, 1):
            for student in STUDENTS:
                for committee in COMMITTEES:
                    for batch in args.batches:
                        for checkpointing in (False, True):
                            parts = count_step(student, committee, stage, (448, 576), batch, checkpointing)
                            gib = per_device(parts, committee, args.world_size, teachers)
                            rows.append(
                                {
                                    "stage": stage,
                                    "student": student,
                                    "committee": committee,
                                    "batch": batch,
                                    "gradient_checkpointing": checkpointing,
                                    "ddp_GiB": round(gib["ddp"], 2),
                                    f"fsdp2_x{args.world_size}_GiB": round(gib["fsdp2"], 2),
                                    "activations_GiB": round((parts["activations"] + parts["recompute"]) / GiB, 2),
                                }
                            )
                            print(rows[-1], flush=True)
        for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
            if path.name == "toyrooms.yaml" or path.name.startswith("accelerate"):
                continue
            settings = recipe_settings(path)
            entry = {**settings}
            for bf16, checkpointing in ((True, False), (True, True), (False, False)):
                parts = count_step(
                    settings["student"],
                    settings["committee"],
                    settings["stage"],
                    tuple(settings["image_size"]),
                    settings["batch"],
                    checkpointing,
                    settings["tasks"],
                    bf16,
                )
                gib = per_device(parts, settings["committee"], args.world_size, teachers)
                suffix = ("_checkpointing" if checkpointing else "") + ("" if bf16 else "_fp32")
                entry[f"ddp{suffix}_GiB"] = round(gib["ddp"], 2)
                entry[f"fsdp2_x{args.world_size}{suffix}_GiB"] = round(gib["fsdp2"], 2)
                entry[f"ddp{suffix}_gpu"] = smallest_gpu(gib["ddp"])
                entry[f"fsdp2{suffix}_gpu"] = smallest_gpu(gib["fsdp2"])
            recipes[path.name] = entry
            print(path.name, entry, flush=True)

    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        **machine_info(torch.get_num_threads()),
        "command": "python bench/memory.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "batches"),
        "world_size": args.world_size,
        "image_size": [448, 576],
        "mixed_precision": "bf16",
        "teacher_weights_GiB": {size: round(value / GiB, 2) for size, value in teachers.items()},
        "gpu_headroom": HEADROOM,
        "rows": rows,
        "recipes": recipes,
    }
    out = REPO_ROOT / "bench" / "results" / "memory.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
