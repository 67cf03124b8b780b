"""FLOPs of SAK against the authors' model, counted per part of one stage-2 training step and one inference forward.

    python bench/flops.py [--train_size 224x288] [--train_batch 2] [--inference_size 448x576] [--threads 2]

Counted with torch's `FlopCounterMode` (matmuls, convolutions, attention, their backwards) plus the formulas it lacks
on the CPU (`speed.flop_counter`: the CPU flash-attention kernels and bilinear resizing), so the numbers hold on every
device: a FLOP count depends on shapes, not on hardware or dtype. A ViT-B/16 student with three ViT-B-wide teachers
(DINOv2-B/14, CLIP-B/16, SAM-B at 1024 x 1024) and the four NYUD-v2 tasks:

- `reference`: the authors' model as `tests/reference_sak.py` restates it (their module structure and forward order:
  per-level projections, resize to 1/4, concatenation, 3x3 conv at 1/4 resolution), with their loss
  (`reference_loss`);
- `sak-plain`: `SAKForMultiTask` with `head_implementation="plain"` (the reference's head arithmetic);
- `sak`: `SAKForMultiTask` as it trains by default (`head_implementation="low_resolution"`);
- for inference also `sak-deployed`: `optimize_for_inference()` (BatchNorm folded).

Each step is split into parts: stem, adapter paths (with their output norms), routers (gates and mixing), heads,
aligners, and the rest (losses, padding, the final resize outside the reference's heads). Forward operations go to
the part whose module is running (module hooks); backward operations go to the part whose forward made the autograd
node being run (node pre-hooks, set from a `TorchFunctionMode` that sees every node as it is made); the parts add up
to `FlopCounterMode`'s total (checked). Teachers (frozen, forward only) are counted on their own, as the training
step runs them: the fast path in bfloat16 for SAK, transformers' forward for the reference.
The computation runs under bfloat16 autocast on the CPU only to be quick; the counts are those of float32.
Results go to bench/results/flops.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from speed import flop_counter, machine_info, nyud_labels
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from train_step import build_student, build_teachers, teacher_configs


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the authors' model, restated independently for the tests
PARTS = ("stem", "adapter_paths", "routers", "heads", "aligners", "losses_and_rest")
TEACHERS = ("dinov2", "clip", "sam")


def extra_flop_formulas() -> dict:
    """The formulas `speed.flop_counter` adds to torch's registry (shape-wrapped, as torch's own)."""
    return {op: formula for op, formula in flop_counter().flop_registry.items() if op not in flop_registry}


class PartFlopCounter:
    """FLOPs per named part of a model, forward and backward (see the module docstring for the attribution rule).

    `parts` maps a part name to the modules whose forward belongs to it; operations outside them go to `rest`.
    `counts[part]` is the part's FLOPs; `total` their sum.
    """

    def __init__(self, parts: dict[str, list[nn.Module]], rest: str = "losses_and_rest"):
        self.registry = {**flop_registry, **extra_flop_formulas()}
        self.counts: dict[str, int] = defaultdict(int)
        self.stack = [rest]  # the part of the forward now running
        self.backward_part = None  # the part of the autograd node now running
        self.handles = []
        for name, modules in parts.items():
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(lambda *_, name=name: self.stack.append(name)))
                self.handles.append(module.register_forward_hook(self._leave))

    def _leave(self, *_) -> None:  # a forward hook: returning None keeps the module's output
        self.stack.pop()

    def current(self) -> str:
        return self.backward_part if self.backward_part is not None else self.stack[-1]

    def __enter__(self):
        counter = self

        class NodeParts(TorchFunctionMode):
            """Tag every autograd node made in the forward with the forward's part."""

            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                part = counter.stack[-1]
                for value in out if isinstance(out, tuple | list) else (out,):
                    node = getattr(value, "grad_fn", None) if isinstance(value, torch.Tensor) else None
                    if node is not None and "sak_part" not in node.metadata:
                        node.metadata["sak_part"] = part
                        node.register_prehook(lambda *_, part=part: setattr(counter, "backward_part", part))
                return out

        class CountFlops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = counter.registry.get(func._overloadpacket)
                if formula is not None:
                    counter.counts[counter.current()] += formula(*args, **kwargs, out_val=out)
                return out

        self.modes = [NodeParts(), CountFlops()]
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        self.backward_part = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ----------------------------------------------------------------------------------------------------------- models
def sak_parts(model) -> dict[str, list[nn.Module]]:
    heads = model.heads
    return {
        "stem": [model.stem],
        "adapter_paths": list(model.teacher_paths.values()),
        "routers": [router for routers in (model.routers or {}).values() for router in routers],
        "heads": list(heads.values()),
        "aligners": list(model.aligners.values()) if model.aligners is not None else [],
    }


def build_reference(image_size: tuple[int, int], seed: int):
    """The authors' stage-2 model (ViT-B/16, three ViT-B-wide teachers, NYUD-v2 tasks), default PyTorch init."""
    from reference_sak import RefMultiTaskModel

    from modeling_sak.remote_code.tasks_sak import TASK_PRESETS

    torch.manual_seed(seed)
    return RefMultiTaskModel(
        image_size,
        dict(TASK_PRESETS["nyud_v2"]["tasks"]),
        dim=768,
        depth=12,
        heads=12,
        hidden=3072,
        tea_dims=dict.fromkeys(TEACHERS, 768),
        out_indices=[2, 5, 8, 11],
    )


def reference_parts(model) -> dict[str, list[nn.Module]]:
    backbone = model.backbone
    return {
        "stem": [backbone.vit.patch_embed, *backbone.vit.blocks],
        "adapter_paths": [*(a for adapters in backbone.tsap.values() for a in adapters), *backbone.out_norms.values()],
        "routers": list(backbone.mor.values()),
        "heads": list(model.heads.values()),
        "aligners": list(backbone.ts_aligners.values()) if backbone.ts_aligners is not None else [],
    }


def reference_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference's "cos+l1" term as its code composes it: the grid rule, then `F.cosine_embedding_loss` of the
    flattened maps and `F.smooth_l1_loss`, in whatever memory layout the maps come (SAK's `distillation_loss` computes
    the same number without copies at the teacher's resolution)."""
    import torch.nn.functional as F

    from modeling_sak.remote_code.losses import match_feature_grids

    student, teacher = match_feature_grids(student.float(), teacher.float())
    cosine = F.cosine_embedding_loss(student.flatten(1), teacher.flatten(1), student.new_ones(student.shape[0]))
    return 0.9 * cosine + 0.1 * F.smooth_l1_loss(student, teacher, beta=1.0)


def reference_loss(model, config, pixel_values, labels, teacher_features):
    """The authors' forward, then their loss: SAK's task losses (the same definitions, tests/test_losses.py) and the
    distillation terms as `reference_distillation_loss` composes them."""
    from modeling_sak.remote_code.losses import task_losses_of

    aligned, outputs = model(pixel_values)
    task_losses = task_losses_of(config, outputs, labels)
    loss = sum(config.task_loss_weights[task] * value for task, value in task_losses.items())
    distill = sum(
        reference_distillation_loss(student, teacher)
        for name, maps in aligned.items()
        for student, teacher in zip(maps, teacher_features[name])
    )
    return loss + config.distill_alpha * distill


def count(variant: str, phase: str, size: tuple[int, int], batch: int, seed: int) -> dict:
    """FLOPs per part of one `phase` ("training": forward + backward, no teachers; "inference") of `variant`."""
    torch.manual_seed(seed)
    pixel_values = torch.randn(batch, 3, *size)
    labels = nyud_labels(batch, *size, seed=seed + 1)
    grid = (size[0] // 16, size[1] // 16)
    teacher_features = {t: [torch.randn(batch, 768, *grid) for _ in range(4)] for t in TEACHERS}
    heads = "plain" if variant == "sak-plain" else "low_resolution"
    student = build_student("base", size, 768, seed=seed, head_implementation=heads)  # its config: the loss's too
    if variant == "reference":
        model = build_reference(size, seed)
        parts = reference_parts(model)
    else:
        if variant == "sak-deployed":
            student.optimize_for_inference(dtype=None)
        model, parts = student, sak_parts(student)
    model.train(phase == "training")
    checked = flop_counter()
    with PartFlopCounter(parts) as counter, checked, torch.autocast("cpu", dtype=torch.bfloat16):
        if phase == "training":
            torch.manual_seed(seed + 2)
            if variant == "reference":
                loss = reference_loss(model, student.config, pixel_values, labels, teacher_features)
            else:
                loss = model(pixel_values, labels=labels, teacher_features=teacher_features).loss
            loss.backward()
        else:
            with torch.no_grad():
                model(pixel_values)
    if counter.total != checked.get_total_flops():
        raise RuntimeError(
            f"{variant} {phase}: parts add up to {counter.total}, FlopCounterMode counted {checked.get_total_flops()}"
        )
    gflops = {part: counter.counts.get(part, 0) / 1e9 for part in PARTS}
    return {"gflops": gflops, "gflops_total": counter.total / 1e9}


def count_teachers(fast: bool, size: tuple[int, int], batch: int, seed: int) -> float:
    """GFLOPs of the frozen committee's forward on a `size` batch (the fast path as SAK runs it, or transformers')."""
    teachers, _ = build_teachers(teacher_configs("base"), torch.bfloat16 if fast else torch.float32, fast, seed=seed)
    counter = flop_counter()
    with counter, torch.inference_mode():  # float32 (reference) or bfloat16 (fast) weights, no autocast: same counts
        teachers(torch.randn(batch, 3, *size))
    return counter.get_total_flops() / 1e9


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_size", type=parse_size, default=(224, 288), help="HxW of the training step")
    parser.add_argument("--train_batch", type=int, default=2, help="batch of the training step")
    parser.add_argument("--inference_size", type=parse_size, default=(448, 576), help="HxW of the inference forward")
    parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (speed only, not the counts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--output", default="bench/results/flops.json", help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    training = {
        v: count(v, "training", args.train_size, args.train_batch, args.seed)
        for v in ("reference", "sak-plain", "sak")
    }
    inference = {
        v: count(v, "inference", args.inference_size, 1, args.seed)
        for v in ("reference", "sak-plain", "sak", "sak-deployed")
    }
    teachers = {
        "reference": count_teachers(False, args.train_size, args.train_batch, args.seed),
        "sak": count_teachers(True, args.train_size, args.train_batch, args.seed),
    }
    for rows in (training, inference):
        for row in rows.values():
            row["ratio_to_reference"] = row["gflops_total"] / rows["reference"]["gflops_total"]
    for name, row in training.items():
        row["teachers_gflops"] = teachers["reference" if name == "reference" else "sak"]
        row["with_teachers_gflops"] = row["gflops_total"] + row["teachers_gflops"]
        row["with_teachers_ratio_to_reference"] = row["with_teachers_gflops"] / (
            training["reference"]["gflops_total"] + teachers["reference"]
        )
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine_info(args.threads),
        "student": "ViT-B/16, teachers DINOv2-B/14 + CLIP-B/16 + SAM-B (1024x1024), NYUD-v2 tasks",
        "training_step": {"size": list(args.train_size), "batch": args.train_batch, "variants": training},
        "inference": {"size": list(args.inference_size), "batch": 1, "variants": inference},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    for title, rows in (("training step (teachers excluded)", training), ("inference forward", inference)):
        print(f"\n{title}: GFLOPs")
        print(f"{'variant':<14}" + "".join(f"{p[:14]:>15}" for p in PARTS) + f"{'total':>9}{'x ref':>7}")
        for name, row in rows.items():
            cells = "".join(f"{row['gflops'][p]:>15.1f}" for p in PARTS)
            print(f"{name:<14}{cells}{row['gflops_total']:>9.1f}{row['ratio_to_reference']:>7.3f}")
    print(f"\nteachers (forward, training batch): {teachers}")
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
