"""Atomic training checkpoints: `checkpoint-<step>` folders written whole or not at all, `latest` resolved, the
per-process data positions a resume needs, and what `--overwrite_output_dir` clears."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object


RUN_FILES = ("final", "all_results.json", "stage1", "lora_adapter", "predictions.png", "router_weights.png")


def clear_run(output_dir: str | Path) -> None:
    """Remove what a run left in `output_dir` (checkpoints, partial checkpoints, `RUN_FILES`): --overwrite_output_dir."""
    output_dir = Path(output_dir)
    for path in [
        *output_dir.glob("checkpoint-*"),
        *output_dir.glob(".partial-checkpoint-*"),
        *(output_dir / f for f in RUN_FILES),
    ]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>`), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int, sharded=None
) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoint-<step>` only once complete. An FSDP2
    run passes `sharded=(model, optimizer)`: their shards go to `student_sharded/` in the same folder
    (`sharding.save_sharded`), before the rename."""
    output_dir = Path(output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".partial-checkpoint-{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if sharded is not None:
        from .sharding import SHARDED_STATE_DIR, save_sharded

        save_sharded(*sharded, partial / SHARDED_STATE_DIR)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "training_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | Path, value: str, strategy: str = "ddp") -> Path:
    """`latest` -> the newest complete checkpoint of `output_dir`; otherwise the given folder. A checkpoint of the other
    `distributed_strategy` (FSDP2 shards vs a DDP run's whole state) is a FileNotFoundError naming the one to use."""
    from .sharding import SHARDED_STATE_DIR

    if value == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir}")
        path = found[-1]
    else:
        path = Path(value)
    if not (path / "training_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no training_state.json)")
    written = "fsdp2" if (path / SHARDED_STATE_DIR).is_dir() else "ddp"
    if written != strategy:
        raise FileNotFoundError(
            f"{path} was written by a distributed_strategy {written!r} run; resume it with --distributed_strategy "
            f"{written} (this run is {strategy!r})"
        )
    return path


def training_state(
    step: int, epoch: int, batch_in_epoch: int, loss_history: list[float], lr_history: list[float]
) -> dict[str, Any]:
    """What a checkpoint needs beside accelerate's state: the step, the histories and every process's position in its
    data (streamed parts can differ in length between processes, so each keeps its own epoch and batch). Call it on
    every process: the positions are gathered."""
    positions = gather_object([[epoch, batch_in_epoch]])
    return {"step": step, "positions": positions, "loss_history": loss_history, "lr_history": lr_history}
