"""Export a SAK checkpoint to ONNX and check it against PyTorch with ONNX Runtime.

    sak-export-onnx outputs/sak-toyrooms/final --output outputs/sak-toyrooms/onnx

What is exported: the deployed model (`optimize_for_inference(dtype=None)`: BatchNorm folded, the low-resolution
heads) in float32, every task head and the MoR router weights, with a dynamic batch size (1 to 64), height and width
(`patch_size + 1` to 4096 pixels; sizes that are not a patch multiple are padded right/bottom and cropped back inside
the graph, as in PyTorch).
Outputs, in this order: one `(batch_size, channels, height, width)` raw map per task of `config.tasks` (named after the
task: semseg logits, depth in metres before the clamp, normals before normalisation, boundary logits), then
`router_weights_<task>` `(batch_size, levels, 1 + teachers)` per task when the model has routers, then
`last_hidden_state` `(batch_size, tokens, hidden_size)` (the stem's last block).

What is not exported: training (losses, teacher features, aligners, the routers' noise), float16/bfloat16 (ONNX
Runtime's CPU kernels are float32; convert the float32 graph with onnxconverter-common if a GPU runtime wants half
precision) and the processor's pre- and post-processing (restated in numpy in docs/export_and_demo.md; the processor is saved
beside the model).

Written to `--output`: `model.onnx`, the processor (`preprocessor_config.json` and its code) and `onnx_export.json`
(tasks and channels, `id2label`, input and output names, opset, the relative error of every output at every checked
size). The relative error of an output is `max |onnxruntime - pytorch| / max |pytorch|` over the whole output, against
the checkpoint as loaded (undeployed, float32); above `--tolerance` (default 1e-4) the export is refused and nothing is
left in `--output`.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cli import bad_input_exits, check_model_argument
from ..remote_code.configuration_sak import SAKConfig


PROG = "sak-export-onnx"
MODEL_FILE = "model.onnx"
REPORT_FILE = "onnx_export.json"
MAX_SIZE, MAX_BATCH = 4096, 64  # the exported graph's bounds on height / width and on the batch size


def require_onnx_extra() -> None:
    """Raise ImportError naming the `onnx` extra when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f'exporting to ONNX needs {", ".join(missing)}: install the onnx extra, pip install -e ".[onnx]" '
            "(onnx, onnxscript, onnxruntime)"
        )


class SAKForOnnx(nn.Module):
    """A deployed [`SAKForMultiTask`] with plain tensor outputs (see the module docstring for their order)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.tasks = list(model.config.tasks)
        self.has_routers = model.routers is not None

    @property
    def output_names(self) -> list[str]:
        routers = [f"router_weights_{task}" for task in self.tasks] if self.has_routers else []
        return [*self.tasks, *routers, "last_hidden_state"]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values, return_dict=True)
        routers = [outputs.router_weights[task] for task in self.tasks] if self.has_routers else []
        return (*[outputs.task_outputs[task] for task in self.tasks], *routers, outputs.last_hidden_state)


def default_check_sizes(config: SAKConfig) -> list[tuple[int, int]]:
    """The config's image size, and one a few pixels larger that is not a multiple of the patch size."""
    (height, width), (patch_h, patch_w) = config.image_size, config.patch_size
    odd = [height + 3, width + 5]
    odd[0] += odd[0] % patch_h == 0
    odd[1] += odd[1] % patch_w == 0
    return [(height, width), tuple(odd)]


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(value) for value in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HEIGHTxWIDTH in pixels, e.g. 448x576") from None
    return height, width


def export_program(wrapper: SAKForOnnx, example: torch.Tensor):
    """torch's ONNX exporter (`torch.export`, non-strict) with a dynamic batch, height and width; raises if the
    exported graph fixed any of them (the exporter falls back to fixed shapes when it cannot keep them)."""
    patch_h, patch_w = wrapper.model.config.patch_size
    dims = {
        0: torch.export.Dim("batch_size", min=1, max=MAX_BATCH),
        2: torch.export.Dim("height", min=patch_h + 1, max=MAX_SIZE),
        3: torch.export.Dim("width", min=patch_w + 1, max=MAX_SIZE),
    }
    # Not under torch.no_grad(): there torch 2.14's exporter fails in its decomposition step (an IndexError).
    program = torch.onnx.export(
        wrapper,
        (example,),
        input_names=["pixel_values"],
        output_names=wrapper.output_names,
        dynamic_shapes={"pixel_values": dims},
        dynamo=True,
        verbose=False,
    )
    shape = program.model.graph.inputs[0].shape
    fixed = [
        name
        for name, dim in zip(("batch_size", "height", "width"), (shape[0], shape[2], shape[3]))
        if isinstance(dim, int)
    ]
    if fixed:
        raise RuntimeError(
            f"torch's ONNX exporter fixed the input's {', '.join(fixed)} (input shape {shape}); the model has a "
            "shape-dependent branch that torch.export cannot trace for every size"
        )
    return program


def relative_errors(reference: tuple[torch.Tensor, ...], got: list[np.ndarray], names: list[str]) -> dict:
    errors = {}
    for name, expected, value in zip(names, reference, got):
        if tuple(value.shape) != tuple(expected.shape):
            raise RuntimeError(f"ONNX output {name} has shape {value.shape}, PyTorch's {tuple(expected.shape)}")
        scale = expected.abs().max().item() or 1.0
        errors[name] = (torch.from_numpy(value) - expected).abs().max().item() / scale
    return errors


def export_onnx(
    checkpoint: str | Path,
    output_dir: str | Path,
    check_sizes: list[tuple[int, int]] | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    revision: str | None = None,
) -> dict:
    """Export `checkpoint` (a SAK folder or Hub id) to `output_dir/model.onnx`, check it with ONNX Runtime at
    `check_sizes` (default: [`default_check_sizes`]; batch 2 at the first size, 1 at the others) and return the
    report written to `output_dir/onnx_export.json`.

    Raises:
        ImportError: the onnx extra is missing.
        FileNotFoundError: `checkpoint` names a missing or non-checkpoint folder.
        FileExistsError: `output_dir` already holds an export and `overwrite` is False.
        ValueError: a check size outside `patch_size + 1` .. `MAX_SIZE` pixels, or an output's relative error
            above `tolerance` (nothing is written then).
    """
    require_onnx_extra()
    from .. import SAKForMultiTask, SAKImageProcessor

    output_dir = Path(output_dir)
    if (output_dir / MODEL_FILE).exists() and not overwrite:
        raise FileExistsError(f"--output {output_dir} already holds {MODEL_FILE}; pass --overwrite to replace it")
    check_model_argument(str(checkpoint), flag="CHECKPOINT")
    model = SAKForMultiTask.from_pretrained(checkpoint, revision=revision).float().eval()
    processor = SAKImageProcessor.from_pretrained(checkpoint, revision=revision)
    patch = model.config.patch_size
    check_sizes = [tuple(size) for size in (check_sizes or default_check_sizes(model.config))]
    for height, width in check_sizes:
        if not (patch[0] < height <= MAX_SIZE and patch[1] < width <= MAX_SIZE):
            raise ValueError(
                f"check size {height}x{width}: the export takes images of {patch[0] + 1}x{patch[1] + 1} to "
                f"{MAX_SIZE}x{MAX_SIZE} pixels (patch size {patch[0]}x{patch[1]}: at least two patches per side)"
            )

    wrapper = SAKForOnnx(copy.deepcopy(model).optimize_for_inference(dtype=None)).eval()
    reference = SAKForOnnx(model).eval()
    names = wrapper.output_names
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, *check_sizes[0], generator=generator)
    print(f"exporting {checkpoint} with torch.export (dynamic batch, height, width); this takes a minute", flush=True)
    program = export_program(wrapper, example)

    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        report = _check_and_write(program, reference, names, check_sizes, tolerance, output_dir, processor, checkpoint)
    except BaseException:
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    print(
        f"wrote {output_dir / MODEL_FILE} ({(output_dir / MODEL_FILE).stat().st_size / 2**20:.1f} MiB), the "
        f"processor and {REPORT_FILE}",
        flush=True,
    )
    return report


def _check_and_write(program, reference, names, check_sizes, tolerance, output_dir, processor, checkpoint) -> dict:
    import onnxruntime

    model, patch = reference.model, reference.model.config.patch_size
    generator = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as staging:
        staging = Path(staging)
        program.save(staging / MODEL_FILE)
        session = onnxruntime.InferenceSession(str(staging / MODEL_FILE), providers=["CPUExecutionProvider"])
        checks = []
        for index, size in enumerate(check_sizes):
            pixel_values = torch.randn(2 if index == 0 else 1, 3, *size, generator=generator)
            with torch.no_grad():
                expected = reference(pixel_values)
            got = session.run(names, {"pixel_values": pixel_values.numpy()})
            errors = relative_errors(expected, got, names)
            checks.append({"batch_size": pixel_values.shape[0], "height": size[0], "width": size[1], "errors": errors})
            print(
                f"checked {pixel_values.shape[0]}x{size[0]}x{size[1]}: largest relative error "
                f"{max(errors.values()):.1e}",
                flush=True,
            )
            worst = max(errors, key=errors.get)
            if errors[worst] > tolerance:
                raise ValueError(
                    f"ONNX Runtime's {worst} differs from PyTorch's by {errors[worst]:.2e} (relative) at "
                    f"{size[0]}x{size[1]}, above the tolerance {tolerance:g}; nothing was written"
                )
        processor.save_pretrained(staging)
        config = model.config
        report = {
            "checkpoint": str(checkpoint),
            "file": MODEL_FILE,
            "opset": program.model.opset_imports.get("", None),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "dtype": "float32",
            "input": {
                "name": "pixel_values",
                "shape": ["batch_size", 3, "height", "width"],
                "min_size": [patch[0] + 1, patch[1] + 1],
            },
            "outputs": names,
            "tasks": dict(config.tasks),
            "id2label": {int(k): v for k, v in config.id2label.items()} if "semseg" in config.tasks else None,
            "teachers": list(config.teachers),
            "tolerance": tolerance,
            "relative_error_definition": "max |onnxruntime - pytorch| / max |pytorch| over the output",
            "checks": checks,
        }
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        for path in staging.iterdir():
            target = output_dir / path.name
            if target.is_dir():
                shutil.rmtree(target)
            path.replace(target)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="SAK checkpoint folder (e.g. outputs/sak-toyrooms/final) or Hub id")
    parser.add_argument("--output", required=True, help="folder for model.onnx, the processor and onnx_export.json")
    parser.add_argument(
        "--check_sizes",
        nargs="+",
        type=parse_size,
        default=None,
        metavar="HxW",
        help="input sizes checked against PyTorch (default: the config's image size and one not a multiple of the "
        "patch size)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest relative error accepted per output (default 1e-4)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in --output")
    parser.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command; a bad input ends in one `error:` line and exit status 2 (`modeling_sak.cli`)."""
    args = parse_args(argv)
    with bad_input_exits(PROG):
        if not args.tolerance > 0:
            raise ValueError(f"--tolerance {args.tolerance}: must be positive")
        export_onnx(args.checkpoint, args.output, args.check_sizes, args.tolerance, args.overwrite, args.revision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
