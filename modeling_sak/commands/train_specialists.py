"""Pretrain the two ToyRooms specialist teachers (`modeling_sak.teachers.specialists`): a geometry ViT (depth +
normals) and a semantics ViT (segmentation), each saved with `save_pretrained` under OUTPUT_DIR.

    sak-train-specialists --data DIR --output_dir DIR [--steps N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import bad_input_exits
from ..teachers.specialists import SPECIALISTS, train_specialist
from ..training.recipe import MIN_TEACHER_STEPS, Recipe


PROG = "sak-train-specialists"


def main(argv: list[str] | None = None) -> None:
    """The command; a bad input ends in one `error:` line and exit status 2 (`modeling_sak.cli`)."""
    with bad_input_exits(PROG):
        return _main(argv)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="a ToyRooms folder (sak-prepare-dataset toyrooms)")
    parser.add_argument("--output_dir", required=True, help="writes OUTPUT_DIR/geometry and OUTPUT_DIR/semantics")
    parser.add_argument(
        "--steps",
        type=int,
        help="optimizer steps of each teacher, at least 20 (default: the default run's, geometry 800, semantics 300)",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        help="peak of each teacher's one-cycle learning rate (default: the default run's, geometry 1e-3, semantics "
        "2e-3)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="images per step")
    parser.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"), help="ToyRooms image size")
    parser.add_argument("--width", type=int, default=96, help="teacher width")
    parser.add_argument(
        "--depth", type=int, default=4, help="teacher layers (a multiple of 4: levels by the depth rule)"
    )
    parser.add_argument("--patch", type=int, default=8, help="teacher patch size")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "README.md").is_file():
        raise FileNotFoundError(
            f"--data {args.data}: not a ToyRooms folder (no README.md); render one first: "
            f"sak-prepare-dataset toyrooms --output_dir {args.data}"
        )
    if args.steps is not None and args.steps < MIN_TEACHER_STEPS:
        raise ValueError(
            f"--steps {args.steps}: at least {MIN_TEACHER_STEPS} (the one-cycle schedule warms up over 10% of them)"
        )
    if args.depth < 4 or args.depth % 4 or args.width < 1 or args.batch_size < 1 or args.patch < 1:
        raise ValueError("--depth must be a multiple of 4, and --width, --batch_size and --patch positive")
    defaults = Recipe().toyrooms
    for kind in SPECIALISTS:
        metrics = train_specialist(
            kind,
            args.data,
            Path(args.output_dir) / kind,
            tuple(args.size),
            args.steps or defaults["teacher_steps"][kind],
            args.batch_size,
            args.width,
            args.depth,
            args.patch,
            args.seed,
            args.learning_rate or defaults["teacher_learning_rate"][kind],
        )
        print(f"{kind}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
