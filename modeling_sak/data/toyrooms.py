"""ToyRooms: procedurally ray-cast indoor scenes with exact depth, normals, semantics and boundaries.

A pinhole camera (x right, y down, z forward) stands in a box room with floor, walls and ceiling, a picture on the
back wall, and random boxes, spheres and cylinders resting on the floor. Every class has its own procedural texture;
pixels are shaded Lambertian from a point light under the ceiling, plus Gaussian noise. Labels are exact: depth is
the camera z of the first hit, normals are the hit surface's normal in the camera frame, semseg is the hit's class,
and boundaries mark pixels whose right or lower neighbour has another class, or lies on another surface with a
depth jump of over 5 % (occlusion).

Every image is a pure function of (seed, index), so a split is reproducible and can be generated in any order.
`OpenedRows` keeps a rendered split's rows opened in memory for training, which reads every row many times.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


CLASSES = ("floor", "wall", "ceiling", "box", "sphere", "cylinder", "picture")
PALETTE = np.array(
    [[150, 110, 70], [200, 190, 170], [235, 235, 230], [170, 60, 40], [50, 110, 190], [60, 160, 80], [220, 180, 40]],
    dtype=np.float32,
)


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    yaw_m = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    pitch_m = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return yaw_m @ pitch_m


class _Hits:
    """Closest hit so far per ray: distance, normal, class and texture value."""

    def __init__(self, n: int):
        self.t = np.full(n, np.inf)
        self.normal = np.zeros((n, 3))
        self.label = np.zeros(n, dtype=np.int64)
        self.texture = np.ones(n)
        self.instance = np.zeros(n, dtype=np.int64)
        self.count = 0

    def update(self, t, normal, label, texture):
        self.count += 1
        closer = t < self.t
        self.instance[closer] = self.count
        self.t[closer] = t[closer]
        self.normal[closer] = normal[closer] if np.ndim(normal) == 2 else normal
        self.label[closer] = label if np.ndim(label) == 0 else label[closer]
        self.texture[closer] = texture[closer]


def _plane(origin, dirs, axis, value, normal, hits, label, texture_fn, picture=None):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (value - origin[axis]) / dirs[:, axis]
    t = np.where(t > 1e-6, t, np.inf)
    points = origin + dirs * np.where(np.isfinite(t), t, 0)[:, None]
    labels = np.full(len(t), label)
    texture = texture_fn(points)
    if picture is not None:  # a painted rectangle: a class boundary without a depth jump
        (u_axis, v_axis), (u0, u1, v0, v1), seed = picture
        inside = (
            (points[:, u_axis] > u0) & (points[:, u_axis] < u1) & (points[:, v_axis] > v0) & (points[:, v_axis] < v1)
        )
        labels = np.where(inside, CLASSES.index("picture"), labels)
        pattern = 0.6 + 0.4 * np.sin(points[:, u_axis] * (7 + seed)) * np.cos(points[:, v_axis] * (5 + seed))
        texture = np.where(inside, pattern, texture)
    hits.update(t, np.asarray(normal, dtype=np.float64), labels, texture)


def _box(origin, dirs, low, high, hits):
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (low - origin) / dirs, (high - origin) / dirs
    t_near = np.nanmax(np.minimum(t1, t2), axis=1)
    t_far = np.nanmin(np.maximum(t1, t2), axis=1)
    t = np.where((t_near <= t_far) & (t_near > 1e-6), t_near, np.inf)
    axis = np.nanargmax(np.minimum(t1, t2), axis=1)
    normal = np.zeros((len(t), 3))
    normal[np.arange(len(t)), axis] = -np.sign(dirs[np.arange(len(t)), axis])
    points = origin + dirs * np.where(np.isfinite(t), t, 0)[:, None]
    local = (points - low) * 6.0
    texture = 0.75 + 0.25 * ((np.floor(local[:, 0]) + np.floor(local[:, 1]) + np.floor(local[:, 2])) % 2)
    hits.update(t, normal, CLASSES.index("box"), texture)


def _sphere(origin, dirs, center, radius, hits):
    oc = origin - center
    a = (dirs * dirs).sum(1)
    b = 2 * (dirs @ oc)
    c = oc @ oc - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    points = origin + dirs * np.where(np.isfinite(t), t, 0)[:, None]
    normal = (points - center) / radius
    dots = np.sin(normal[:, 0] * 9) * np.sin(normal[:, 1] * 9) * np.sin(normal[:, 2] * 9)
    hits.update(t, normal, CLASSES.index("sphere"), 0.7 + 0.3 * (dots > 0))


def _cylinder(origin, dirs, base, radius, height, hits):
    """Vertical cylinder standing on the floor at `base` (y of the floor), with a top cap."""
    ox, oz = origin[0] - base[0], origin[2] - base[2]
    dx, dz = dirs[:, 0], dirs[:, 2]
    a = dx * dx + dz * dz
    b = 2 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
    y_side = origin[1] + dirs[:, 1] * t_side
    side_ok = (disc >= 0) & (t_side > 1e-6) & (y_side <= base[1]) & (y_side >= base[1] - height)
    t_side = np.where(side_ok, t_side, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (base[1] - height - origin[1]) / dirs[:, 1]
    cx, cz = ox + dx * t_cap, oz + dz * t_cap
    t_cap = np.where((t_cap > 1e-6) & (cx * cx + cz * cz <= radius**2), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    points = origin + dirs * np.where(np.isfinite(t), t, 0)[:, None]
    normal = np.zeros((len(t), 3))
    normal[:, 0], normal[:, 2] = (points[:, 0] - base[0]) / radius, (points[:, 2] - base[2]) / radius
    normal[t_cap < t_side] = (0.0, -1.0, 0.0)
    texture = 0.7 + 0.3 * ((np.floor(points[:, 1] * 8)) % 2)
    hits.update(t, normal, CLASSES.index("cylinder"), texture)


def render(seed: int, index: int, height: int = 96, width: int = 128, return_camera: bool = False) -> dict:
    """One ToyRooms scene: image uint8 (H, W, 3), semseg int64, depth float32 (m), normals float32 (H, W, 3) unit
    vectors in the camera frame (pointing towards the camera), edge float32 in {0, 1}; with `return_camera`, also
    the focal length in pixels (principal point at the image centre)."""
    rng = np.random.default_rng([seed, index])
    fov = np.deg2rad(rng.uniform(60, 75))
    focal = (width / 2) / np.tan(fov / 2)
    v, u = np.mgrid[0:height, 0:width] + 0.5
    dirs_camera = np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones_like(u)], -1).reshape(-1, 3)
    rotation = _rotation(np.deg2rad(rng.uniform(-25, 25)), np.deg2rad(rng.uniform(-20, 5)))
    dirs = dirs_camera @ rotation.T
    origin = np.array([rng.uniform(-0.4, 0.4), 0.0, 0.0])

    floor_y, ceiling_y = rng.uniform(1.2, 1.7), -rng.uniform(1.0, 1.5)
    left_x, right_x, back_z = -rng.uniform(1.8, 3.0), rng.uniform(1.8, 3.0), rng.uniform(4.5, 7.0)
    hits = _Hits(len(dirs))
    checker = rng.uniform(0.35, 0.6)

    def floor_texture(p):
        return 0.75 + 0.25 * ((np.floor(p[:, 0] / checker) + np.floor(p[:, 2] / checker)) % 2)

    def wall_texture(p):
        return 0.85 + 0.15 * np.sin((p[:, 0] + p[:, 2]) * 12.0)

    def ceiling_texture(p):
        return 0.95 + 0.05 * np.sin(p[:, 0] * 3.0) * np.sin(p[:, 2] * 3.0)

    _plane(origin, dirs, 1, floor_y, (0, -1, 0), hits, 0, floor_texture)
    _plane(origin, dirs, 1, ceiling_y, (0, 1, 0), hits, 2, ceiling_texture)
    _plane(origin, dirs, 0, left_x, (1, 0, 0), hits, 1, wall_texture)
    _plane(origin, dirs, 0, right_x, (-1, 0, 0), hits, 1, wall_texture)
    picture_u = sorted(rng.uniform(left_x + 0.3, right_x - 0.3, 2))
    picture_v = sorted(rng.uniform(ceiling_y + 0.3, floor_y - 0.5, 2))
    picture = (
        (0, 1),
        (picture_u[0], max(picture_u[1], picture_u[0] + 0.6), picture_v[0], max(picture_v[1], picture_v[0] + 0.4)),
        int(rng.integers(0, 5)),
    )
    _plane(origin, dirs, 2, back_z, (0, 0, -1), hits, 1, wall_texture, picture)

    for _ in range(int(rng.integers(3, 7))):
        kind = rng.integers(3)
        x, z = rng.uniform(left_x + 0.6, right_x - 0.6), rng.uniform(1.8, back_z - 0.6)
        if kind == 0:
            size = rng.uniform([0.3, 0.3, 0.3], [1.0, 1.2, 1.0])
            low = np.array([x - size[0] / 2, floor_y - size[1], z - size[2] / 2])
            _box(origin, dirs, low, low + size, hits)
        elif kind == 1:
            radius = rng.uniform(0.2, 0.5)
            _sphere(origin, dirs, np.array([x, floor_y - radius, z]), radius, hits)
        else:
            _cylinder(origin, dirs, np.array([x, floor_y, z]), rng.uniform(0.15, 0.4), rng.uniform(0.4, 1.5), hits)

    normals_world = hits.normal
    facing = (normals_world * dirs).sum(1) > 0
    normals_world[facing] *= -1
    depth = hits.t  # dirs_camera has z = 1, so the ray parameter is the camera-frame depth
    points = origin + dirs * depth[:, None]
    light = np.array([rng.uniform(left_x + 0.5, right_x - 0.5), ceiling_y + 0.15, rng.uniform(1.0, back_z - 1.0)])
    to_light = light - points
    to_light /= np.linalg.norm(to_light, axis=1, keepdims=True)
    lambert = np.clip((normals_world * to_light).sum(1), 0, None)
    albedo = PALETTE[hits.label] * rng.uniform(0.85, 1.15, size=(len(PALETTE), 3))[hits.label] / 255.0
    shading = (0.3 + 0.7 * lambert) * hits.texture
    image = albedo * shading[:, None] * 255.0 + rng.normal(0, 3.0, size=(len(depth), 3))
    image = np.clip(image, 0, 255).reshape(height, width, 3).astype(np.uint8)

    semseg = hits.label.reshape(height, width)
    depth = depth.reshape(height, width).astype(np.float32)
    normals = (normals_world @ rotation).reshape(height, width, 3).astype(np.float32)  # R^T n in row form
    instance = hits.instance.reshape(height, width)
    edge = np.zeros((height, width), dtype=bool)
    for dy, dx in ((0, 1), (1, 0)):
        label_change = semseg[: height - dy, : width - dx] != semseg[dy:, dx:]
        other_surface = instance[: height - dy, : width - dx] != instance[dy:, dx:]
        near, far = depth[: height - dy, : width - dx], depth[dy:, dx:]
        occlusion = other_surface & (np.abs(near - far) > 0.05 * np.minimum(near, far))
        edge[: height - dy, : width - dx] |= label_change | occlusion
    scene = {"image": image, "semseg": semseg, "depth": depth, "normals": normals, "edge": edge.astype(np.float32)}
    return scene | ({"focal": focal} if return_camera else {})


def _scene(seed: int, height: int, width: int, index: int) -> dict:
    return {"id": f"toyrooms-{seed}-{index:06d}", **render(seed, index, height, width)}


def generate(
    seed: int, start: int, count: int, height: int = 96, width: int = 128, num_workers: int | None = None
) -> Iterator[dict]:
    """Scenes `start .. start + count - 1` of a seed, in order, with string ids.

    Rendered in `num_workers` processes (default: the CPUs this process may use, one for fewer than 64 scenes) while
    the caller consumes them; every scene is a pure function of (seed, index), so the scenes do not depend on it.
    """
    scene = partial(_scene, seed, height, width)
    indices = range(start, start + count)
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = num_workers if count >= 64 else 1
    if num_workers <= 1:
        yield from map(scene, indices)
        return
    with multiprocessing.Pool(num_workers) as pool:  # leaving the block (also by an early close) terminates it
        yield from pool.imap(scene, indices, chunksize=8)


# (resolved folder, split) -> {row id: {column: opened cell}}; shared by every `OpenedRows` of this process
_OPENED_ROWS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}


def _opened(value: Any) -> Any:
    """An undecoded image cell (`{"bytes", "path"}`) opened and loaded as `data.schema` opens it; anything else, or a
    cell that cannot be opened, as it is (so that `decode_example` reports it for its row)."""
    if not isinstance(value, dict) or not ({"bytes", "path"} & value.keys()):
        return value
    try:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
        image.load()
    except Exception:
        return value
    return image


class OpenedRows:
    """The rows of a local split (`datasets.Dataset`, shuffled or selected or not) with their image cells opened once
    per process and kept as PIL images, for `data.loading.MultiTaskStream` to read in place of the dataset.

    The default run reads every ToyRooms row dozens of times (two teachers, stage 1, stage 2, the baseline), and
    opening the PNG/TIFF cells is half the cost of preparing an example; a 96 x 128 scene takes about 150 KB opened,
    so only small splits such as ToyRooms should be kept. Cells are kept by (folder, split, id, column) and shared by
    all views of a split; a row holds the view's columns. `decode_example` makes the same arrays from opened cells as
    from the stored bytes, so batches are unchanged.
    """

    def __init__(self, dataset, folder: str | Path, split: str):
        self.dataset, self.ids, self.columns = dataset, list(dataset["id"]), list(dataset.column_names)
        self.cells = _OPENED_ROWS.setdefault((str(Path(folder).resolve()), split), {})

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cells = self.cells.setdefault(self.ids[index], {})
        if any(column not in cells for column in self.columns):
            row = self.dataset[index]
            cells.update({column: _opened(row[column]) for column in self.columns if column not in cells})
        return {column: cells[column] for column in self.columns}
