"""The multi-task dataset schema shared by every loader and writer of this package.

One row per image, columns (all `datasets.Image` features, so the Hub viewer shows them):

| column    | storage                                   | decoded by `decode_example`                        |
| --------- | ----------------------------------------- | -------------------------------------------------- |
| `id`      | string                                    | str                                                |
| `image`   | 8-bit RGB PNG/JPEG                        | uint8 (H, W, 3) (see `decode_image`)               |
| `semseg`  | 8-bit L PNG: class ids 0..N-1, 255 ignore | int64 (H, W)                                       |
| `depth`   | 32-bit float TIFF (mode F), metres, 0 = no measurement | float32 (H, W), lossless             |
| `normals` | 8-bit RGB PNG, `v = (n + 1) * 255 / 2`; (0, 0, 0) = no normal | float32 (H, W, 3) in [-1, 1] (`2 v / 255 - 1`), 0 where none |
| `edge`    | 8-bit L PNG, 255 = boundary               | float32 (H, W) in [0, 1] (`v / 255`)               |

Depth is stored as float32 TIFF rather than 16-bit millimetres: it is lossless, keeps sub-millimetre values and
needs no scale convention. A normal of exactly zero ("no label here", e.g. PASCAL-Context pixels outside the
classes its distilled normals are valid for) cannot survive `(n + 1) * 255 / 2` quantisation, so it is stored as the
pixel (0, 0, 0) (which would otherwise mean the non-unit vector (-1, -1, -1)) and decoded back to zero; the
transforms then mark zero-norm normals as ignored, as the reference does. Datasets may lack some task columns (e.g.
PASCAL-Context has no depth); the extra PASCAL columns `human_parts` (8-bit ids, 255 ignore) and `sal` (8-bit,
255 = salient) follow the same rules. `decode_example` raises a `ValueError` naming the row for a cell that cannot be
decoded, an image that is not an 8-bit photo (a 16-bit depth PNG, say) or a label stored in another mode than above.

The names of the `semseg` class ids travel beside the parquet files as `id2label.json` at the dataset's root
(`{"0": "wall", ...}`, the file transformers' semantic-segmentation examples read from a dataset repo with
`hf_hub_download(repo, "id2label.json", repo_type="dataset")`): `write_id2label` writes it, `read_id2label` reads it
from a local folder or a Hub dataset repo.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Features, Image, Value
from PIL import Image as PILImage

from ..remote_code.image_io_sak import to_rgb_array
from ..remote_code.tasks_sak import IGNORE_INDEX


# The task columns of a split, in the order files are written (kept for the splits already written); the tasks
# themselves are the task table's (`tasks_sak.TASKS`; tests/test_architecture.py checks the two agree).
TASK_COLUMNS = ("semseg", "depth", "normals", "edge", "human_parts", "sal")


ID2LABEL_NAME = "id2label.json"


def write_id2label(folder: str | Path, class_names: Sequence[str]) -> Path:
    """Write `{folder}/id2label.json` mapping the semseg class ids 0..N-1 to `class_names`; returns its path."""
    names = [str(name) for name in class_names]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class names must be a non-empty list without repeats, got {names}")
    path = Path(folder) / ID2LABEL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(i): name for i, name in enumerate(names)}, indent=2) + "\n")
    return path


def read_id2label(name_or_path: str | Path, revision: str | None = None) -> dict[int, str] | None:
    """The semseg class names a dataset ships (`id2label.json` at its root), as `{class id: name}`.

    `name_or_path` is a local folder or a Hub dataset id (read with `hf_hub_download`, so offline runs use the cache).
    Returns None when the dataset has no such file; `ValueError` names the file when its ids are not 0..N-1.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        path = folder / ID2LABEL_NAME
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            path = Path(hf_hub_download(str(name_or_path), ID2LABEL_NAME, repo_type="dataset", revision=revision))
        except RemoteEntryNotFoundError:
            return None
    try:
        mapping = {int(key): str(value) for key, value in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path} is not a JSON object of class id -> name ({error})") from error
    if sorted(mapping) != list(range(len(mapping))):
        raise ValueError(f"{path} has class ids {sorted(mapping)}; expected 0..{len(mapping) - 1}")
    return dict(sorted(mapping.items()))


def features_for(columns: list[str]) -> Features:
    """`datasets.Features` of a multi-task split holding `columns` (task columns of TASK_COLUMNS)."""
    unknown = sorted(set(columns) - set(TASK_COLUMNS))
    if unknown:
        raise ValueError(f"unknown task columns {unknown}; the schema has {list(TASK_COLUMNS)}")
    return Features({"id": Value("string"), "image": Image(), **{column: Image() for column in columns}})


def encode_example(example_id: str, image: np.ndarray, **labels: np.ndarray | None) -> dict[str, Any]:
    """Numpy arrays in the decoded convention (see the module table) -> one row of PIL images."""
    row: dict[str, Any] = {"id": str(example_id), "image": PILImage.fromarray(_check_uint8(image, "image", 3))}
    for task, value in labels.items():
        if value is None:
            continue
        if task in ("semseg", "human_parts"):
            if value.min() < 0 or (value.max() > 254 and value.max() != IGNORE_INDEX):
                raise ValueError(f"{task} of {example_id}: ids must lie in 0..254 (255 = ignore)")
            row[task] = PILImage.fromarray(value.astype(np.uint8), mode="L")
        elif task == "depth":
            row[task] = PILImage.fromarray(np.ascontiguousarray(value, dtype=np.float32), mode="F")
        elif task == "normals":
            value = np.asarray(value, np.float32)
            quantised = np.clip(np.round((value + 1.0) * 127.5), 0, 255).astype(np.uint8)
            quantised[~value.any(axis=-1)] = 0  # "no normal": see the module docstring
            row[task] = PILImage.fromarray(quantised, mode="RGB")
        elif task in ("edge", "sal"):
            row[task] = PILImage.fromarray(np.clip(np.round(np.asarray(value) * 255), 0, 255).astype(np.uint8), "L")
        else:
            raise ValueError(f"unknown task column {task!r}")
    return row


def _check_uint8(array: np.ndarray, name: str, channels: int) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != channels:
        raise ValueError(f"{name} must be uint8 (H, W, {channels}), got {array.dtype} {array.shape}")
    return array


def _open(value: Any) -> PILImage.Image:
    """A PIL image from a decoded value or an undecoded `{"bytes", "path"}` cell (`Image(decode=False)`)."""
    if isinstance(value, dict):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
        image = PILImage.open(source)
        image.load()
        return image
    return value


# The PIL modes each label column may be stored in (see the module table); anything else is another convention.
LABEL_MODES = {
    "semseg": ("L", "P"),
    "human_parts": ("L", "P"),
    "depth": ("F",),
    "normals": ("RGB",),
    "edge": ("L", "1"),
    "sal": ("L", "1"),
}


def _open_cell(value: Any, row_id: str, column: str) -> PILImage.Image:
    try:
        return _open(value)
    except Exception as error:  # corrupt bytes, missing file, malformed cell
        raise ValueError(f"row {row_id!r}: cannot decode {column} ({type(error).__name__}: {error})") from error


def decode_image(value: Any, row_id: str) -> np.ndarray:
    """The `image` cell of a row as uint8 (H, W, 3) RGB, by the mode rules of `image_io_sak.to_rgb_array`
    (grayscale replicated, transparency composited onto white); `ValueError` naming the row when it cannot be decoded
    or is not an 8-bit photo (e.g. a 16-bit depth map)."""
    return to_rgb_array(_open_cell(value, row_id, "image"), f"row {row_id!r}: image")


def decode_example(row: dict[str, Any]) -> dict[str, Any]:
    """One row (PIL images, or undecoded image cells) -> numpy arrays in the training convention; `ValueError` naming
    the row for a cell that cannot be decoded, an image that is not an 8-bit photo or a label in another mode."""
    row_id = str(row.get("id", ""))
    example = {"id": row_id, "image": decode_image(row["image"], row_id)}
    for task in TASK_COLUMNS:
        value = row.get(task)
        if value is None:
            continue
        value = _open_cell(value, row_id, task)
        if value.mode not in LABEL_MODES[task]:
            raise ValueError(
                f"row {row_id!r}: {task} is stored in mode {value.mode}; the schema stores it in mode "
                f"{' or '.join(LABEL_MODES[task])} (see modeling_sak.data.schema)"
            )
        if task in ("semseg", "human_parts"):
            example[task] = np.asarray(value, dtype=np.int64)
        elif task == "depth":
            example[task] = np.asarray(value, dtype=np.float32)
        elif task == "normals":
            stored = np.asarray(value.convert("RGB"))
            normals = stored.astype(np.float32) * (2.0 / 255.0) - 1.0
            normals[~stored.any(axis=-1)] = 0.0  # (0, 0, 0) = no normal
            example[task] = normals
        else:
            example[task] = np.asarray(value.convert("L"), dtype=np.float32) / 255.0
    return example


def check_example(example: dict[str, Any]) -> None:
    """Raise ValueError naming the row when a label's size differs from the image's."""
    height, width = example["image"].shape[:2]
    for task in TASK_COLUMNS:
        if task in example and example[task].shape[:2] != (height, width):
            raise ValueError(
                f"row {example.get('id')!r}: {task} is {example[task].shape[:2]} but the image is {(height, width)}"
            )
