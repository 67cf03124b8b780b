"""Read multi-task datasets (Hub or local parquet, streaming or not) into SAK batches.

    split = load_multitask_split("org/nyud-v2-multitask", "train", streaming=True)   # or a local folder
    stream = MultiTaskStream(split, MultiTaskTransform(train=True), tasks=["semseg", "depth"], train=True,
                             rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = DataLoader(stream, batch_size=2, collate_fn=stream.collate, num_workers=2)

Each process reads its own part of the stream (`datasets.distributed.split_dataset_by_node`), so the loader must not
be sharded again by `accelerator.prepare`; DataLoader workers split a process's part further by parquet shard.
Rows that cannot be decoded, or whose labels do not match the image size, are skipped in training (each batch lists
them in `batch["skipped"]`) and raise a `ValueError` naming the row in evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Image, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from transformers.utils import logging

from .schema import IGNORE_INDEX, TASK_COLUMNS, _open, check_example, decode_example
from .transforms import collate_multitask


logger = logging.get_logger(__name__)


def _chw_float_image(value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.max() <= 1.0 + 1e-6:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _tanganke_nyuv2(row: dict[str, Any]) -> dict[str, Any]:
    """`tanganke/nyuv2`: float CHW image in [0, 1], 13-class segmentation with -1 ignore, depth, normals (CHW)."""
    segmentation = np.asarray(row["segmentation"], dtype=np.int64)
    depth = np.asarray(row["depth"], dtype=np.float32)
    normals = np.asarray(row["normal"], dtype=np.float32)
    return {
        "id": str(row.get("id", row.get("__index__", ""))),
        "image": _chw_float_image(row["image"]),
        "semseg": np.where(segmentation < 0, IGNORE_INDEX, segmentation),
        "depth": depth[0] if depth.ndim == 3 else depth,
        "normals": normals.transpose(1, 2, 0) if normals.shape[0] == 3 else normals,
    }


# Known layouts other than this package's schema: Hub name -> function turning one raw row into a decoded example.
COLUMN_MAPPINGS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"tanganke/nyuv2": _tanganke_nyuv2}


def load_multitask_split(
    name_or_path: str, split: str, streaming: bool = True, shuffle_buffer: int | None = None, seed: int = 0, **kwargs
):
    """`load_dataset(name_or_path, split=split, streaming=streaming)`, optionally shuffled with a buffer; image
    columns are left undecoded for `MultiTaskStream`."""
    try:
        dataset = load_dataset(name_or_path, split=split, streaming=streaming, **kwargs)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(
            f"cannot load split {split!r} of {name_or_path!r}: {str(error).splitlines()[0]}. Give a Hub dataset id "
            "or a folder written by `python -m modeling_sak.prepare_dataset`"
        ) from error
    dataset = undecoded_images(dataset)
    if shuffle_buffer:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if streaming else dataset.shuffle(seed=seed)
    return dataset


def undecoded_images(dataset):
    """Image columns left undecoded: `MultiTaskStream` decodes them inside its per-row error handling, so that one
    corrupt file cannot end the stream. (Cast before any shuffle: casting after it is several times slower.)"""
    for column, feature in (getattr(dataset, "features", None) or {}).items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(column, Image(decode=False))
    return dataset


class MultiTaskStream(torch.utils.data.IterableDataset):
    """Decoded, checked and transformed examples of a `datasets` split for one process.

    Args:
        dataset: a `datasets.IterableDataset` or `Dataset` in the package schema (or a known layout).
        transform: callable over one decoded example (e.g. `MultiTaskTransform`); must return tensors.
        tasks: the model's tasks (batches hold `labels[task] = None` for tasks the data lacks).
        train: skip bad rows (counted) instead of raising.
        rank, world_size: this process's part of the data.
        column_mapping: a `COLUMN_MAPPINGS` entry for other layouts; by default looked up by dataset name.
        shuffle_seed: reshuffle a map-style dataset every epoch with this seed + epoch (streams use `set_epoch`).
    """

    def __init__(
        self,
        dataset,
        transform: Callable[[dict], dict],
        tasks: Sequence[str],
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        column_mapping: Callable[[dict], dict] | None = None,
        dataset_name: str | None = None,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        dataset = undecoded_images(dataset)
        self.dataset, self.transform, self.tasks, self.train = dataset, transform, list(tasks), train
        self.column_mapping = column_mapping or COLUMN_MAPPINGS.get(dataset_name or "")
        self.shuffle_seed, self.epoch = shuffle_seed, 0
        self._epoch_dataset = self._shuffled(0)

    def _shuffled(self, epoch: int):
        """A map-style dataset is reshuffled every epoch (seed + epoch); a stream shuffles itself with set_epoch."""
        if self.shuffle_seed is None or isinstance(self.dataset, IterableDataset):
            return self.dataset
        return self.dataset.shuffle(seed=self.shuffle_seed + epoch)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the stream and redraw augmentations for `epoch`."""
        self.epoch = epoch
        if isinstance(self.dataset, IterableDataset):
            self.dataset.set_epoch(epoch)
        self._epoch_dataset = self._shuffled(epoch)
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)

    def _prepare(self, row: dict[str, Any], position: int) -> dict[str, Any]:
        example = self.column_mapping(row) if self.column_mapping else decode_example(row)
        if not example.get("id"):
            example["id"] = f"row-{position}"
        check_example(example)
        return self.transform(example)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for position, row in enumerate(self._epoch_dataset):
            try:
                yield self._prepare(row, position)
            except Exception as error:  # undecodable image, label of the wrong size, ...
                row_id = row.get("id", f"row-{position}") if isinstance(row, dict) else f"row-{position}"
                if not self.train:
                    raise ValueError(f"bad evaluation row {row_id!r}: {error}") from error
                logger.warning(f"skipping training row {row_id!r}: {error}")
                yield {"skipped": f"{row_id}: {error}"}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """`collate_multitask` over the good examples; `batch["skipped"]` lists the rows left out."""
        good = [e for e in examples if "skipped" not in e]
        batch = collate_multitask(good, self.tasks) if good else {"pixel_values": None, "labels": None, "ids": []}
        batch["skipped"] = [e["skipped"] for e in examples if "skipped" in e]
        return batch


class ImageStream(torch.utils.data.IterableDataset):
    """Images only (stage-1 distillation on any Hub image dataset): `{"pixel_values"}` per row, bad rows skipped.

    `make_transform(epoch)` returns the per-example transform of an epoch (e.g. `partial(stage1_transform, True,
    384, seed)`), so that augmentation is redrawn every epoch.
    """

    def __init__(self, dataset, make_transform: Callable[[int], Callable], rank: int = 0, world_size: int = 1,
                 shuffle_seed: int | None = None):  # fmt: skip
        super().__init__()
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset, self.make_transform, self.shuffle_seed, self.epoch = dataset, make_transform, shuffle_seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.dataset, IterableDataset):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset
        if self.shuffle_seed is not None and not isinstance(dataset, IterableDataset):
            dataset = dataset.shuffle(seed=self.shuffle_seed + self.epoch)
        transform = self.make_transform(self.epoch)
        for position, row in enumerate(dataset):
            try:
                image = _open(row["image"]).convert("RGB")
                yield transform({"image": image, "id": str(row.get("id", position))})
            except Exception as error:
                logger.warning(f"skipping image row {row.get('id', position)!r}: {error}")


def task_columns(dataset) -> list[str]:
    """The task columns a split has (from its features, without reading rows when possible)."""
    features = getattr(dataset, "features", None)
    if features is None and isinstance(dataset, IterableDataset):
        features = next(iter(dataset)).keys()
    return [column for column in TASK_COLUMNS if column in (features or {})]
