"""Which rows each process and DataLoader worker reads, through the training script's `make_loader`, with real parquet
files and real DataLoader worker processes."""

from __future__ import annotations

import io
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value, load_dataset
from PIL import Image as PILImage

from modeling_sak.commands.prepare_dataset import make_toyrooms
from modeling_sak.training.loaders import make_loader
from modeling_sak.training.recipe import Recipe


TASKS = ["semseg", "normals", "edge", "depth"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """24 training rows in 4 parquet shards of 6 (ids scene-000000 ...)."""
    root = tmp_path_factory.mktemp("loading")
    make_toyrooms(root / "toy", num_train=24, num_test=6, size=(16, 24), rows_per_shard=6)
    return str(root / "toy")


@pytest.fixture(scope="module")
def images_only(toy, tmp_path_factory):
    """The same 24 training images without labels (a stage-1 image dataset, as ImageNet), in 4 parquet shards."""
    folder = tmp_path_factory.mktemp("images") / "data"
    folder.mkdir()
    split = load_dataset(toy, split="train").select_columns(["id", "image"])
    for shard in range(4):
        split.shard(4, shard, contiguous=True).to_parquet(folder / f"train-{shard:05d}-of-00004.parquet")
    return str(folder.parent)


def recipe(**overrides) -> Recipe:
    return Recipe(image_size=[16, 24], per_device_train_batch_size=3, per_device_eval_batch_size=3).replace(
        **overrides
    )


def epoch_batches(loader, epoch: int, start: int = 0) -> list[dict]:
    stream = loader.dataset
    stream.set_epoch(epoch)
    first = stream.start_at(start, loader.num_workers)
    return [batch for index, batch in enumerate(loader, start=first) if index >= start]


def read(toy, world_size: int, epoch: int = 0, train: bool = True, **overrides) -> list[list[dict]]:
    """The batches of every process of a `world_size`-process run in `epoch`."""
    settings = recipe(**overrides)
    split = settings.train_split if train else "test"
    processes = []
    for rank in range(world_size):
        accelerator = SimpleNamespace(process_index=rank, num_processes=world_size)  # what make_loader reads of it
        loader = make_loader(settings, toy, split, train, TASKS, accelerator, seed=0)
        processes.append(epoch_batches(loader, epoch))
    return processes


def ids(batches: list[dict]) -> list[str]:
    return [i for batch in batches for i in batch["ids"]]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_row_is_read_once_per_epoch_across_processes_and_workers(toy, streaming, num_workers):
    for epoch in (0, 1):
        processes = read(toy, 2, epoch, streaming=streaming, num_workers=num_workers, shuffle_buffer=4)
        counts = Counter(i for batches in processes for i in ids(batches))
        assert len(counts) == 24 and set(counts.values()) == {1}, counts
        assert [len(ids(batches)) for batches in processes] == [12, 12]


def test_workers_do_not_change_the_batches_of_a_local_split(toy):
    one = read(toy, 2, epoch=1, num_workers=0)
    two = read(toy, 2, epoch=1, num_workers=2)
    for batches_one, batches_two in zip(one, two):
        assert [b["ids"] for b in batches_one] == [b["ids"] for b in batches_two]
        for a, b in zip(batches_one, batches_two):
            assert torch.equal(a["pixel_values"], b["pixel_values"])  # same augmentation draw per (seed, epoch, id)


def test_local_rows_are_reshuffled_across_processes_every_epoch(toy):
    epoch0 = [set(ids(batches)) for batches in read(toy, 2, epoch=0)]
    epoch1 = [set(ids(batches)) for batches in read(toy, 2, epoch=1)]
    assert epoch0[0] != epoch1[0] and epoch0[0] | epoch0[1] == epoch1[0] | epoch1[1]
    assert read(toy, 2, epoch=1)[0][0]["ids"] == read(toy, 2, epoch=1)[0][0]["ids"]  # deterministic in seed, epoch


def test_uneven_split_pads_training_like_distributed_sampler_and_never_pads_evaluation(toy):
    processes = read(toy, 2, train_limit=23, num_workers=2)
    counts = Counter(i for batches in processes for i in ids(batches))
    assert len(counts) == 23 and sorted(counts.values()) == [1] * 22 + [2]
    assert [len(ids(batches)) for batches in processes] == [12, 12]  # the same number of steps on every process
    evaluation = read(toy, 4, train=False, num_workers=2)  # 6 test rows over 4 processes
    counts = Counter(i for batches in evaluation for i in ids(batches))
    assert len(counts) == 6 and set(counts.values()) == {1}


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_inside_an_epoch_yields_the_remaining_batches_unchanged(toy, streaming):
    settings = recipe(streaming=streaming, num_workers=2, shuffle_buffer=4)
    accelerator = SimpleNamespace(process_index=0, num_processes=1)
    loader = make_loader(settings, toy, "train", True, TASKS, accelerator, seed=0)
    straight = epoch_batches(loader, epoch=1)
    for start in (3, 4):  # a checkpoint after an odd or an even number of batches (2 workers)
        resumed = epoch_batches(make_loader(settings, toy, "train", True, TASKS, accelerator, seed=0), 1, start)
        assert [b["ids"] for b in resumed] == [b["ids"] for b in straight[start:]]
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(resumed, straight[start:]))


def test_resume_skips_rows_before_decoding_them(toy):
    accelerator = SimpleNamespace(process_index=0, num_processes=1)
    loader = make_loader(recipe(), toy, "train", True, TASKS, accelerator, seed=0)
    decoded = []
    transform = loader.dataset.transform
    loader.dataset.transform = lambda example: decoded.append(example["id"]) or transform(example)
    batches = epoch_batches(loader, epoch=0, start=5)
    assert len(decoded) == len(ids(batches)) == 24 - 5 * 3


def test_stage1_image_stream_reads_every_row_once_across_processes_and_workers(images_only):
    for streaming in (False, True):
        processes = read(images_only, 2, stage=1, tasks={}, image_size=[16, 16], streaming=streaming, num_workers=2)
        counts = Counter(i for batches in processes for i in ids(batches))
        assert len(counts) == 24 and set(counts.values()) == {1}
        assert processes[0][0]["pixel_values"].shape == (3, 3, 16, 16)


def test_stage1_image_stream_skips_a_depth_map_row_and_names_it(tmp_path):
    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        PILImage.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    photos = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(3)]
    depth = np.full((16, 16), 6625, np.uint16)  # NYU sync depth: 16-bit millimetres
    cells = [{"bytes": png(a), "path": None} for a in [*photos, depth]]
    folder = tmp_path / "data"
    folder.mkdir()
    Dataset.from_dict(
        {"id": ["a", "b", "c", "depth"], "image": cells}, features=Features({"id": Value("string"), "image": Image()})
    ).to_parquet(folder / "train-00000-of-00001.parquet")
    accelerator = SimpleNamespace(process_index=0, num_processes=1)
    loader = make_loader(
        recipe(stage=1, image_size=[16, 16], per_device_train_batch_size=4),
        str(tmp_path),
        "train",
        True,
        [],
        accelerator,
        seed=0,
    )
    (batch,) = epoch_batches(loader, epoch=0)
    assert sorted(batch["ids"]) == ["a", "b", "c"] and batch["pixel_values"].shape == (3, 3, 16, 16)
    assert len(batch["skipped"]) == 1 and batch["skipped"][0].startswith("depth:") and "I;16" in batch["skipped"][0]
