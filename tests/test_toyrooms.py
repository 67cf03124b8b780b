"""ToyRooms: deterministic, geometrically exact and balanced enough to learn every task."""

from __future__ import annotations

import numpy as np

from modeling_sak.data.toyrooms import CLASSES, generate, render


def test_scenes_are_a_pure_function_of_seed_and_index():
    a, b, c = render(3, 7), render(3, 7), render(4, 7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    assert [s["id"] for s in generate(3, 5, 2, 16, 16)] == ["toyrooms-3-000005", "toyrooms-3-000006"]


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
