"""Read multi-task datasets (Hub or local parquet, streaming or not) into SAK batches.

    split = load_multitask_split("org/nyud-v2-multitask", "train", streaming=True)   # or a local folder
    stream = MultiTaskStream(split, MultiTaskTransform(train=True), tasks=["semseg", "depth"], train=True,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, batch_size=2)
    loader = DataLoader(stream, batch_size=2, collate_fn=stream.collate, num_workers=2)

Each process reads its own part of the split and each DataLoader worker its own part of that (`SplitStream`: every row
exactly once per epoch across processes x workers), so the loader must not be sharded again by `accelerator.prepare`.
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

from ..remote_code.tasks_sak import IGNORE_INDEX
from .schema import TASK_COLUMNS, check_example, decode_example, decode_image
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
            "or a folder written by `sak-prepare-dataset`"
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


class SplitStream(torch.utils.data.IterableDataset):
    """The rows of a `datasets` split that one process and one DataLoader worker read, epoch by epoch.

    Every row of the split is read exactly once per epoch across all processes x DataLoader workers:
    - a local (map-style) split is reshuffled across processes every epoch (a permutation drawn from
      `(shuffle_seed, epoch)`, as `DistributedSampler.set_epoch` does), then process `rank` takes every
      `world_size`-th row of it, so that one optimizer step of W processes sees the rows that one process with W
      times the batch would see. Without `shuffle_seed` (evaluation) it takes a contiguous part of the stored order,
      whose batches are those of a single-process run (so metrics summed over processes equal it exactly). In training (`train=True`) the permutation is first extended by wrapping around to a
      multiple of `world_size` (as `DistributedSampler` pads), so that every process has the same number of batches;
      in evaluation no row is repeated. The process's rows are then dealt to DataLoader workers in whole blocks of
      `batch_size` rows, block `k` to worker `k % num_workers`: the DataLoader's in-order round robin then yields
      exactly the batches of a single-worker loader, whatever `num_workers` is.
    - a streamed split (`datasets.IterableDataset`) is split by `datasets.distributed.split_dataset_by_node`, and
      `datasets` itself deals its shards to DataLoader workers; `set_epoch` reshuffles it.

    `start_at(batch, num_workers)` resumes inside an epoch by skipping rows before they are decoded.
    """

    def __init__(
        self,
        dataset,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: int | None = None,
        batch_size: int = 1,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (the DataLoader's batch size)")
        self.streaming = isinstance(dataset, IterableDataset)
        if self.streaming and world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = undecoded_images(dataset)
        self.train, self.rank, self.world_size = train, rank, world_size
        self.shuffle_seed, self.batch_size = shuffle_seed, batch_size
        self.epoch, self.first_batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (and start it from its first batch)."""
        self.epoch, self.first_batch = epoch, 0
        if self.streaming:
            self.dataset.set_epoch(epoch)

    def start_at(self, batch: int, num_workers: int) -> int:
        """Begin the current epoch at batch `batch` of this process without decoding the rows before it.

        Returns the index of the first batch a DataLoader over this stream (with `num_workers` workers and
        `batch_size` rows a batch) will yield: `batch` itself for local data; for streamed data, whose rows `datasets`
        deals to workers by shard, the start of the round of `num_workers` batches holding `batch` (the caller drops
        the fewer than `num_workers` batches before `batch`, so the order stays that of an uninterrupted epoch).
        """
        if self.streaming:
            workers = self._stream_workers(num_workers)
            self.first_batch = batch - batch % workers
        else:
            self.first_batch = batch
        return self.first_batch

    def _stream_workers(self, num_workers: int) -> int:
        """How many DataLoader workers read a stream: `datasets` stops those beyond its number of shards."""
        return max(1, min(num_workers, self.dataset.num_shards))

    def process_rows(self) -> np.ndarray:
        """Indices of the local split that this process reads in the current epoch, in order."""
        count = len(self.dataset)
        if self.shuffle_seed is None:
            order = np.arange(count)
        else:
            order = np.random.default_rng([self.shuffle_seed, self.epoch]).permutation(count)
        if self.train and count % self.world_size:  # wrap around, as DistributedSampler pads
            order = np.resize(order, -(-count // self.world_size) * self.world_size)
        if self.shuffle_seed is None:  # in stored order: a contiguous part, so its batches are single-process batches
            return np.array_split(order, self.world_size)[self.rank]
        return order[self.rank :: self.world_size]

    def rows(self) -> Iterator[tuple[int, Any]]:
        """(position, undecoded row) pairs of this process and DataLoader worker, from `first_batch` on."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.streaming:
            mine = self.process_rows()[self.first_batch * self.batch_size :]
            blocks = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
            for block in blocks[worker::workers]:
                for index in block:
                    yield int(index), self.dataset[int(index)]
            return
        # datasets deals whole shards to the workers it can use: whole rounds of batches were read before first_batch.
        active = self._stream_workers(workers)
        skip = self.first_batch // active * self.batch_size
        read = -1
        for read, row in enumerate(self.dataset):
            if read >= skip:
                yield read, row
        if read + 1 < skip:
            logger.warning(
                f"stream worker {worker}: resuming {skip} rows into epoch {self.epoch}, but its shards hold "
                f"only {read + 1} (it ran out before the checkpoint): the batches after the resume point may "
                "differ from those of an uninterrupted run"
            )


class MultiTaskStream(SplitStream):
    """Decoded, checked and transformed examples of a `datasets` split for one process (see `SplitStream` for which
    rows each process and DataLoader worker reads).

    Args:
        dataset: a `datasets.IterableDataset` or `Dataset` in the package schema (or a known layout).
        transform: callable over one decoded example (e.g. `MultiTaskTransform`); must return tensors.
        tasks: the model's tasks (batches hold `labels[task] = None` for tasks the data lacks).
        train: skip bad rows (counted) instead of raising; pad every process to the same number of rows.
        rank, world_size: this process's part of the data.
        column_mapping: a `COLUMN_MAPPINGS` entry for other layouts; by default looked up by dataset name.
        shuffle_seed: reshuffle a local split every epoch with (shuffle_seed, epoch) (streams use `set_epoch`).
        batch_size: the DataLoader's batch size (rows are dealt to its workers in blocks of this size).
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
        batch_size: int = 1,
    ):
        super().__init__(dataset, train, rank, world_size, shuffle_seed, batch_size)
        self.transform, self.tasks = transform, list(tasks)
        self.column_mapping = column_mapping or COLUMN_MAPPINGS.get(dataset_name or "")

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the rows and redraw augmentations for `epoch`."""
        super().set_epoch(epoch)
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)

    def _prepare(self, row: dict[str, Any], position: int) -> dict[str, Any]:
        example = self.column_mapping(row) if self.column_mapping else decode_example(row)
        if not example.get("id"):
            example["id"] = f"row-{position}"
        check_example(example)
        return self.transform(example)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for position, row in self.rows():
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


class ImageStream(SplitStream):
    """Images only (stage-1 distillation on any Hub image dataset): `{"pixel_values", "id"}` per row (see
    `SplitStream` for which rows each process and DataLoader worker reads); bad rows are skipped and listed in
    `batch["skipped"]` by `collate`.

    `make_transform(epoch)` returns the per-example transform of an epoch (e.g. `partial(stage1_transform, True,
    384, seed)`), so that augmentation is redrawn every epoch.
    """

    def __init__(
        self,
        dataset,
        make_transform: Callable[[int], Callable],
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: int | None = None,
        batch_size: int = 1,
        train: bool = True,
    ):
        super().__init__(dataset, train, rank, world_size, shuffle_seed, batch_size)
        self.make_transform = make_transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        transform = self.make_transform(self.epoch)
        for position, row in self.rows():
            row_id = str(row.get("id", f"row-{position}"))
            try:
                yield transform({"image": decode_image(row["image"], row_id), "id": row_id}) | {"id": row_id}
            except Exception as error:
                logger.warning(f"skipping image row {row_id!r}: {error}")
                yield {"skipped": f"{row_id}: {error}"}

    @staticmethod
    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        """`{"pixel_values": (B, 3, H, W) or None, "ids", "skipped"}` over the good examples."""
        good = [e for e in examples if "skipped" not in e]
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in good]) if good else None,
            "ids": [e["id"] for e in good],
            "skipped": [e["skipped"] for e in examples if "skipped" in e],
        }


def task_columns(dataset) -> list[str]:
    """The task columns a split has (from its features, without reading rows when possible)."""
    features = getattr(dataset, "features", None)
    if features is None and isinstance(dataset, IterableDataset):
        features = next(iter(dataset)).keys()
    return [column for column in TASK_COLUMNS if column in (features or {})]
