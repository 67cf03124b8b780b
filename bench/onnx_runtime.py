"""ONNX Runtime against PyTorch on this CPU, side by side in one run: inference at 480x640, batch 1.

    python bench/onnx_runtime.py [--threads 2] [--repeats 5] [--models vit_s vit_b]

For each student (ViT-S/16 or ViT-B/16, three teachers of the same width, the four NYUD-v2 tasks, random seeded
weights built from configs; nothing is downloaded), saved with `save_pretrained` and exported by
`sak-export-onnx` (its own ONNX Runtime check included), the same input runs through
- `torch-fp32`: `SAKForMultiTask` eager, float32, under `torch.inference_mode()`;
- `torch-fast-fp32`: `optimize_for_inference(dtype=None)` (the exported graph's PyTorch form);
- `torch-fast-bf16`: `optimize_for_inference()` (bfloat16, the fastest PyTorch path on CPUs with bf16 matmuls);
- `onnxruntime-fp32`: the exported `model.onnx` with ONNX Runtime's CPU provider (`intra_op_num_threads=--threads`,
  all graph optimisations).
Each variant: one warm-up run, then the median of `--repeats` timed runs, interleaved round by round. The export time
and the relative error of onnxruntime against torch-fp32 (every output) are reported too. Results go to
bench/results/onnx_runtime.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


STUDENTS = {
    "vit_s": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "vit_b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def build(name: str, image_size: tuple[int, int], seed: int):
    from modeling_sak import SAKConfig, SAKForMultiTask

    torch.manual_seed(seed)
    stem = {"model_type": "vit", "patch_size": 16, "layer_norm_eps": 1e-6, **STUDENTS[name]}
    width = stem["hidden_size"]
    config = SAKConfig(
        stem_config=stem,
        teachers=dict.fromkeys(("dinov2", "clip", "sam"), width),
        tasks="nyud_v2",
        image_size=list(image_size),
    )
    model = SAKForMultiTask(config).eval()
    # Random BatchNorm statistics, so that the fold is not an identity.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--models", nargs="+", choices=sorted(STUDENTS), default=["vit_s", "vit_b"])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"), help="input size")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and input")
    parser.add_argument("--output", default="bench/results/onnx_runtime.json", help="JSON results file")
    args = parser.parse_args(argv)

    import onnxruntime

    from modeling_sak import SAKImageProcessor
    from modeling_sak.commands.export_onnx import SAKForOnnx, export_onnx, relative_errors

    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
        },
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "size": list(size),
        "batch_size": 1,
        "models": {},
    }
    for name in args.models:
        model = build(name, size, args.seed)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(f"{folder}/model")
            SAKImageProcessor().save_pretrained(f"{folder}/model")
            start = time.perf_counter()
            report = export_onnx(f"{folder}/model", f"{folder}/onnx", check_sizes=[size, (size[0] + 3, size[1] + 5)])
            export_seconds = time.perf_counter() - start
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = onnxruntime.InferenceSession(
                f"{folder}/onnx/model.onnx", options, providers=["CPUExecutionProvider"]
            )
        pixel_values = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(args.seed))
        variants = {
            "torch-fp32": SAKForOnnx(model),
            "torch-fast-fp32": SAKForOnnx(copy.deepcopy(model).optimize_for_inference(dtype=None)),
            "torch-fast-bf16": SAKForOnnx(copy.deepcopy(model).optimize_for_inference()),
        }
        feed = {"pixel_values": pixel_values.numpy()}

        def run(variant: str, session=session, feed=feed, variants=variants, pixel_values=pixel_values):
            if variant == "onnxruntime-fp32":
                return session.run(None, feed)
            with torch.inference_mode():
                return variants[variant](pixel_values)

        names = [*variants, "onnxruntime-fp32"]
        times = {variant: [] for variant in names}
        for variant in names:
            run(variant)  # warm-up
        for _ in range(args.repeats):
            for variant in names:
                start = time.perf_counter()
                run(variant)
                times[variant].append(time.perf_counter() - start)
        reference = run("torch-fp32")
        got = run("onnxruntime-fp32")
        errors = relative_errors(reference, got, report["outputs"])
        medians = {variant: statistics.median(values) for variant, values in times.items()}
        results["models"][name] = {
            "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "export_seconds": round(export_seconds, 1),
            "export_check": report["checks"],
            "median_seconds": {variant: round(value, 4) for variant, value in medians.items()},
            "vs_torch_fp32": {variant: round(value / medians["torch-fp32"], 3) for variant, value in medians.items()},
            "onnxruntime_relative_error": errors,
            "times": times,
        }
        print(name, json.dumps(results["models"][name]["median_seconds"]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
