"""SAK in one minute, offline: build a small student, train it a few steps, save it, reload it through AutoModel with
trust_remote_code, and predict all four NYUD-v2 tasks for an image.

    python examples/quickstart.py [--output_dir outputs/quickstart] [--steps 20]

The teacher features here are random stand-ins of the right shapes (the frozen committee itself is built by
`modeling_sak.teachers`); the point is the model's API: losses, router weights, save/load and post-processing.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from modeling_sak import SAKConfig, SAKForMultiTask, SAKImageProcessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/quickstart", help="where the checkpoint is written")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps on one fixed batch")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = SAKConfig(
        stem_config={
            "model_type": "vit",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "layer_norm_eps": 1e-6,
        },
        image_size=[96, 128],
        teachers={"dinov2": 96, "clip": 64, "sam": 64},  # dinov2 wider than the stem -> aligners
        use_aligners=True,
        tasks="nyud_v2",
    )
    model = SAKForMultiTask(config)
    print(
        f"SAK student: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, teachers "
        f"{list(config.teachers)}, tasks {list(config.tasks)}"
    )

    pixel_values = torch.randn(2, 3, 96, 128)
    labels = {
        "semseg": torch.randint(0, 40, (2, 96, 128)),
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 96, 128), dim=1),
        "edge": (torch.rand(2, 1, 96, 128) > 0.9).float(),
        "depth": torch.rand(2, 1, 96, 128) * 5,
    }
    teacher_features = {
        name: [torch.randn(2, spec["hidden_size"], 6, 8) for _ in range(4)] for name, spec in config.teachers.items()
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(1, args.steps + 1):
        out = model(pixel_values, labels=labels, teacher_features=teacher_features)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step == 1 or step % 5 == 0 or step == args.steps:
            tasks = " ".join(f"{k}={v.item():.3f}" for k, v in out.task_losses.items())
            distill = sum(out.distill_losses.values()).item()
            print(f"step {step:3d}  loss {out.loss.item():8.3f}  {tasks}  distill={distill:.3f}")

    model.eval().save_pretrained(args.output_dir)  # inference checkpoint: no aligners, no teachers
    SAKImageProcessor(pad_size=(96, 128)).save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}")

    reloaded = AutoModel.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(args.output_dir, trust_remote_code=True)
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    inputs = processor(image)
    with torch.no_grad():
        outputs = reloaded(**inputs)
    result = processor.post_process_multi_task(outputs, inputs["original_sizes"], inputs["content_boxes"])[0]
    print("predictions for a 90x120 image:")
    for task, value in result.items():
        print(f"  {task:<8} {str(tuple(value.shape)):<14} {value.dtype}  range [{value.min():.3f}, {value.max():.3f}]")
    print("router weights (mean over levels) per task, experts = stem + teachers:")
    for task, weights in outputs.router_weights.items():
        mean = weights[0].mean(0).tolist()
        print(f"  {task:<8} " + "  ".join(f"{e}={w:.2f}" for e, w in zip(["stem", *config.teachers], mean)))


if __name__ == "__main__":
    main()
