"""Parameter counts of ViT-S/B/L SAK students (3 teachers, NYUD-v2 tasks), built on the meta device.

    python bench/param_counts.py [--output bench/results/param_counts.json]

No weights are allocated or downloaded. The reference ViT-B NYUD-v2 student without aligners has 126.40M parameters.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from modeling_sak import SAKConfig, SAKForMultiTask
from modeling_sak.commands.convert_original_sak import REFERENCE_STEMS


# Reference teacher committees: ViT-S/B students learn from base teachers, ViT-L from large ones (DESIGN, configs).
TEACHER_WIDTH = {"vit_small": 768, "vit_base": 768, "vit_large": 1024}


def count(stem: str, aligners: bool) -> dict[str, float]:
    spec = REFERENCE_STEMS[stem]
    width = TEACHER_WIDTH[stem]
    with torch.device("meta"):
        config = SAKConfig(
            stem_config={"model_type": "vit", "layer_norm_eps": 1e-6, **spec},
            teachers=dict.fromkeys(("dinov2", "clip", "sam"), width),
            use_aligners=aligners or width != spec["hidden_size"],
            tasks="nyud_v2",
        )
        model = SAKForMultiTask(config)
    parts = {"stem": 0, "teacher_paths": 0, "routers": 0, "heads": 0, "aligners": 0}
    for name, parameter in model.named_parameters():
        parts[name.split(".")[0]] += parameter.numel()
    inference = sum(parts.values()) - parts["aligners"]
    return {"total_M": round(sum(parts.values()) / 1e6, 2), "inference_M": round(inference / 1e6, 2)} | {
        f"{k}_M": round(v / 1e6, 2) for k, v in parts.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/param_counts.json", help="where to write the JSON results")
    args = parser.parse_args()
    rows = {}
    for stem in REFERENCE_STEMS:
        for aligners in (False, True):
            if not aligners and TEACHER_WIDTH[stem] != REFERENCE_STEMS[stem]["hidden_size"]:
                continue  # teachers wider than the stem need aligners
            rows[f"{stem}{'+aligners' if aligners else ''}"] = count(stem, aligners)
    print(
        f"{'student':<22}{'total':>9}{'inference':>11}{'stem':>8}{'paths':>8}{'routers':>9}{'heads':>8}{'aligners':>10}"
    )
    for name, row in rows.items():
        print(
            f"{name:<22}{row['total_M']:>8.2f}M{row['inference_M']:>10.2f}M{row['stem_M']:>8.2f}"
            f"{row['teacher_paths_M']:>8.2f}{row['routers_M']:>9.2f}{row['heads_M']:>8.2f}{row['aligners_M']:>10.2f}"
        )
    result = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "command": "python bench/param_counts.py",
        "students": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
