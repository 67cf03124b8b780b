"""ToyRooms: deterministic, geometrically exact and balanced enough to learn every task."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset, Features, Image, Value

from modeling_sak.commands.prepare_dataset import make_toyrooms
from modeling_sak.data import toyrooms
from modeling_sak.data.loading import MultiTaskStream, load_multitask_split
from modeling_sak.data.toyrooms import CLASSES, OpenedRows, generate, render
from modeling_sak.data.transforms import MultiTaskTransform


def test_scenes_are_a_pure_function_of_seed_and_index():
    a, b, c = render(3, 7), render(3, 7), render(4, 7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    assert [s["id"] for s in generate(3, 5, 2, 16, 16)] == ["toyrooms-3-000005", "toyrooms-3-000006"]


def test_scenes_rendered_in_worker_processes_are_the_same_in_the_same_order():
    serial = list(generate(2, 10, 6, 24, 32, num_workers=1))
    parallel = list(generate(2, 10, 6, 24, 32, num_workers=2))
    assert [s["id"] for s in parallel] == [f"toyrooms-2-{i:06d}" for i in range(10, 16)]
    for one, other in zip(serial, parallel):
        assert one.keys() == other.keys()
        for key in one:
            np.testing.assert_array_equal(one[key], other[key])


def test_labels_have_the_schema_types_and_ranges():
    scene = render(0, 1, 48, 64)
    assert scene["image"].dtype == np.uint8 and scene["image"].shape == (48, 64, 3)
    assert scene["semseg"].min() >= 0 and scene["semseg"].max() < len(CLASSES)
    assert np.isfinite(scene["depth"]).all() and scene["depth"].min() > 0
    np.testing.assert_allclose(np.linalg.norm(scene["normals"], axis=-1), 1.0, atol=1e-5)
    assert set(np.unique(scene["edge"])) <= {0.0, 1.0}


def test_normals_agree_with_depth_gradients_on_planar_surfaces():
    angles = []
    for index in range(5):
        scene = render(0, index, 96, 128, return_camera=True)
        height, width = scene["depth"].shape
        v, u = np.mgrid[0:height, 0:width] + 0.5
        depth, focal = scene["depth"].astype(np.float64), scene["focal"]
        points = np.stack([(u - width / 2) / focal * depth, (v - height / 2) / focal * depth, depth], -1)
        estimate = np.cross(points[:-1, 1:] - points[:-1, :-1], points[1:, :-1] - points[:-1, :-1])
        estimate /= np.linalg.norm(estimate, axis=-1, keepdims=True)
        label = scene["semseg"]
        planar = (label[:-1, :-1] == 0) | (label[:-1, :-1] == 2)  # floor and ceiling
        same = (
            (label[:-1, :-1] == label[1:, :-1]) & (label[:-1, :-1] == label[:-1, 1:]) & (scene["edge"][:-1, :-1] == 0)
        )
        cosine = np.abs((estimate * scene["normals"][:-1, :-1]).sum(-1))[planar & same]
        angles.append(np.degrees(np.arccos(np.clip(cosine, -1, 1))))
    angles = np.concatenate(angles)
    assert len(angles) > 1000 and np.median(angles) < 1.0 and np.percentile(angles, 95) < 5.0


def test_boundaries_lie_where_labels_change():
    scene = render(0, 2)
    label, edge = scene["semseg"], scene["edge"]
    horizontal = label[:, :-1] != label[:, 1:]
    vertical = label[:-1] != label[1:]
    assert (edge[:, :-1][horizontal] == 1).all() and (edge[:-1][vertical] == 1).all()
    # Boundaries are thin: most pixels are not boundary, and every boundary pixel borders a change or a depth jump.
    assert 0.01 < edge.mean() < 0.2


def test_class_balance_is_sane():
    counts = np.zeros(len(CLASSES))
    present = np.zeros(len(CLASSES))
    for index in range(40):
        values = np.bincount(render(1, index, 48, 64)["semseg"].ravel(), minlength=len(CLASSES))
        counts += values
        present += values > 0
    share = counts / counts.sum()
    assert share.max() < 0.6 and share.min() > 0.005, dict(zip(CLASSES, share.round(3)))
    assert (present >= 10).all(), dict(zip(CLASSES, present))


def test_opened_rows_give_the_batches_of_the_stored_rows_and_open_each_cell_once(tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    make_toyrooms(folder, num_train=12, num_test=2, size=(16, 24), rows_per_shard=6)
    opened_cells = []
    real_opened = toyrooms._opened
    monkeypatch.setattr(toyrooms, "_opened", lambda cell: opened_cells.append(cell) or real_opened(cell))
    tasks = ["semseg", "normals", "edge", "depth"]
    split = load_multitask_split(str(folder), "train", streaming=False, shuffle_buffer=1, seed=0)  # a shuffled view
    transform = MultiTaskTransform(train=True, size=(16, 24), seed=0, scale_range=(0.8, 1.25), photometric=False)
    for epoch in (0, 1):
        stored = MultiTaskStream(split, transform, tasks, train=True, shuffle_seed=0, batch_size=4)
        opened = MultiTaskStream(OpenedRows(split, folder, "train"), transform, tasks, train=True, shuffle_seed=0)
        for stream in (stored, opened):
            stream.set_epoch(epoch)
        for one, other in zip(stored, opened, strict=True):
            assert one["id"] == other["id"]
            for key in ("pixel_values", *tasks):
                assert torch.equal(one[key], other[key]), (epoch, one["id"], key)
    assert len(opened_cells) == 12 * 6  # id, image and 4 labels, once per row for both epochs
    # another view of the same split (fewer columns, another order) reuses the opened cells
    view = OpenedRows(split.select_columns(["id", "image", "semseg"]).shuffle(seed=1), str(folder), "train")
    assert sorted(view[i]["id"] for i in range(len(view))) == sorted(split["id"])
    assert list(view[0]) == ["id", "image", "semseg"] and len(opened_cells) == 72

    # a cell that cannot be opened is left for the stream to report as a skipped row, as it would be without caching
    broken = Dataset.from_dict(
        {"id": ["broken"], "image": [{"bytes": b"not an image", "path": None}]},
        features=Features({"id": Value("string"), "image": Image(decode=False)}),
    )
    rows = OpenedRows(broken, tmp_path / "broken", "train")
    [example] = list(MultiTaskStream(rows, MultiTaskTransform(train=False, size=(4, 4)), [], train=True))
    assert example["skipped"].startswith("broken: row 'broken': cannot decode image")
