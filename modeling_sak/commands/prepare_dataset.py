"""Write multi-task datasets in the package schema (parquet shards + dataset card), optionally pushing them to the Hub.

    # The reference NYUD-v2 folder (images/, segmentation/, normals/, edge/, depth/, gt_sets/{train,val}.txt):
    sak-prepare-dataset nyud --source NYUDv2 --output_dir nyud-v2-multitask [--push_to_hub ORG/NAME]
    # The reference PASCAL-Context folder (JPEGImages/, semseg/, human_parts/, normals_distill/, sal_distill/,
    # pascal-context/trainval/, json/, ImageSets/Context/{train,val}.txt):
    sak-prepare-dataset pascal_context --source PASCAL_MT --output_dir pascal-context-multitask
    # ToyRooms, generated (no download):
    sak-prepare-dataset toyrooms --output_dir toyrooms [--num_train 2000 --num_test 200]

Example images are read by `image_processing_sak.load_rgb_image`'s rules (grayscale replicated, palette and CMYK
converted, transparency composited onto white); an image that is not an 8-bit photo (a 16-bit or float single-channel
map such as a depth PNG) stops the conversion with an error naming the file and its mode.

The output folder loads with `datasets.load_dataset(output_dir)` (add `streaming=True` to stream it) and with
`modeling_sak.data.loading.load_multitask_split`. See `modeling_sak.data.schema` for the columns. Shards hold
`--rows_per_shard` rows in row groups of at most `--max_row_group_size` uncompressed bytes (default
`datasets.config.MAX_ROW_GROUP_SIZE`, the bound `datasets` keeps itself, so that reading one row reads little more); the
semseg class names are written beside them as `id2label.json` (`modeling_sak.data.schema.read_id2label` reads it).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import config as datasets_config
from datasets.arrow_writer import ParquetWriter
from datasets.utils.py_utils import convert_file_size_to_int
from PIL import Image

from ..cli import bad_input_exits, progress_bar
from ..data import toyrooms
from ..data.schema import ID2LABEL_NAME, encode_example, features_for, write_id2label
from ..remote_code.image_processing_sak import load_rgb_image
from ..remote_code.tasks_sak import NYUD_V2_CLASSES, PASCAL_CONTEXT_CLASSES


NYUD_SPLITS = {"train": "train.txt", "test": "val.txt"}
NYUD_EXPECTED = {"train": 795, "test": 654}
NYUD_CITATION = """@inproceedings{silberman2012indoor,
  title={Indoor Segmentation and Support Inference from RGBD Images},
  author={Silberman, Nathan and Hoiem, Derek and Kohli, Pushmeet and Fergus, Rob},
  booktitle={ECCV}, year={2012}
}"""

NYUD_PROVENANCE = """- `semseg`: the reference's `segmentation/ID.png` stores classes 1..40 with 0 = unlabeled; here 0..39, 255 = ignore.
- `depth`: `depth/ID.npy` in metres, stored losslessly as float32 TIFF.
- `normals`, `edge`: `normals/ID.png` and `edge/ID.png` as they are (8-bit)."""


def row_group_bytes(size: int | str | None) -> int:
    """A row-group bound in bytes from an int, a digit string or a size such as "100MB" / "64MiB" (`datasets`' own
    parser); None gives `datasets.config.MAX_ROW_GROUP_SIZE`."""
    size = datasets_config.MAX_ROW_GROUP_SIZE if size is None else size
    try:
        bound = int(size) if isinstance(size, int) or str(size).isdigit() else convert_file_size_to_int(size)
    except ValueError:
        bound = 0
    if bound <= 0:
        raise ValueError(f"max_row_group_size={size!r} must be a positive number of bytes or a size such as '100MB'")
    return bound


def write_split(
    rows: Iterable[dict[str, Any]],
    columns: list[str],
    output_dir: Path,
    split: str,
    total: int,
    rows_per_shard: int,
    max_row_group_size: int | str | None = None,
) -> int:
    """Encode rows into `data/{split}-XXXXX-of-YYYYY.parquet` shards of `rows_per_shard` rows (each written to a
    temporary name, then renamed) with `datasets`' `ParquetWriter`; returns the number of rows written.

    Rows are packed, in order, into row groups of at most `max_row_group_size` uncompressed (Arrow) bytes: an int or a
    size string such as "100MB", by default `datasets.config.MAX_ROW_GROUP_SIZE`. A single row larger than the bound
    makes a row group of its own.
    """
    features = features_for(columns)
    schema = features.arrow_schema
    bound = row_group_bytes(max_row_group_size)
    shards = max(1, math.ceil(total / rows_per_shard))
    data_dir = output_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    shard, count, in_shard, writer = 0, 0, 0, None
    group: list[pa.Table] = []
    group_bytes = 0

    def write_group():
        nonlocal group_bytes
        if group:
            table = pa.concat_tables(group)
            writer.write_table(table, writer_batch_size=table.num_rows)  # one call, one row group
            group.clear()
            group_bytes = 0

    def close_shard():
        nonlocal shard, in_shard, writer
        write_group()
        writer.finalize()
        path = data_dir / f"{split}-{shard:05d}-of-{shards:05d}.parquet"
        path.with_suffix(".tmp").rename(path)
        shard, in_shard, writer = shard + 1, 0, None

    for row in progress_bar(iterable=rows, total=total, desc=f"writing {split}", unit="image"):
        if writer is None:
            partial = data_dir / f"{split}-{shard:05d}-of-{shards:05d}.tmp"
            writer = ParquetWriter(path=str(partial), features=features)
        encoded = pa.Table.from_pylist([features.encode_example(row)], schema=schema)
        if group and group_bytes + encoded.nbytes > bound:
            write_group()
        group.append(encoded)
        group_bytes += encoded.nbytes
        count += 1
        in_shard += 1
        if in_shard == rows_per_shard:
            close_shard()
    if writer is not None:
        close_shard()
    return count


def write_card(
    output_dir: Path,
    pretty_name: str,
    counts: dict[str, int],
    columns: list[str],
    description: str,
    citation: str | None = None,
    license: str = "other",
    repo_id: str | None = None,
    provenance: str | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """README.md from hub_cards/dataset_card.md, with YAML metadata (features, splits, data files); with
    `class_names`, also `id2label.json` (the semseg class names, see `modeling_sak.data.schema`) and a class table."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from ..model_card import hub_cards_dir

    features = features_for(columns)
    data = DatasetCardData(
        pretty_name=pretty_name,
        license=license,
        task_categories=["image-segmentation"] + (["depth-estimation"] if "depth" in columns else []),
        tags=["multi-task", "sak", "semantic-segmentation", "surface-normals", "boundary-detection"]
        + (["human-parts"] if "human_parts" in columns else [])
        + (["saliency"] if "sal" in columns else []),
        configs=[{"config_name": "default", "data_files": [{"split": s, "path": f"data/{s}-*"} for s in counts]}],
        dataset_info={
            "features": [{"name": name, "dtype": "string" if name == "id" else "image"} for name in features],
            "splits": [
                {
                    "name": split,
                    "num_bytes": sum(p.stat().st_size for p in (output_dir / "data").glob(f"{split}-*")),
                    "num_examples": n,
                }
                for split, n in counts.items()
            ],
        },
    )
    columns_table = "\n".join(
        f"| `{c}` | {d} |"
        for c, d in [
            ("id", "example id"),
            ("image", "RGB image"),
            ("semseg", "8-bit class ids, 255 = ignore"),
            ("depth", "float32 TIFF, metres, 0 = no measurement"),
            ("normals", "8-bit RGB, n = 2 v / 255 - 1 (camera frame); (0, 0, 0) = no normal"),
            ("edge", "8-bit, 255 = boundary"),
            (
                "human_parts",
                "8-bit part ids (0 background, 1 head, 2 torso, 3 upper arm, 4 lower arm, 5 upper leg, "
                "6 lower leg), 255 = ignore",
            ),
            ("sal", "8-bit, 255 = salient"),
        ]
        if c in ("id", "image") or c in columns
    )
    classes_table = None
    if class_names:
        write_id2label(output_dir, class_names)
        classes_table = "| id | class |\n| ---: | --- |\n" + "\n".join(
            f"| {i} | {name} |" for i, name in enumerate(class_names)
        )
    card = DatasetCard.from_template(
        data,
        template_path=str(hub_cards_dir() / "dataset_card.md"),
        pretty_name=pretty_name,
        description=description,
        columns_table=columns_table,
        splits=", ".join(f"{split}: {n} image{'s' * (n != 1)}" for split, n in counts.items()),
        provenance=provenance,
        classes_table=classes_table,
        id2label_name=ID2LABEL_NAME,
        repo_id=repo_id or output_dir.name,
        citation=citation,
    )
    card.save(output_dir / "README.md")


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path} is missing; the reference NYUD layout has gt_sets/train.txt, val.txt"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _find(folder: Path, example_id: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        path = folder / f"{example_id}{suffix}"
        if path.is_file():
            return path
    return None


def _read_photo(path: Path, example_id: str) -> np.ndarray:
    """The RGB image of an example by the package's one set of image rules (`load_rgb_image`): 8-bit photos of any
    common mode are converted, anything else (a 16-bit depth PNG in images/, say) fails naming the file and its mode."""
    try:
        return load_rgb_image(path)
    except ValueError as error:
        raise ValueError(f"{example_id}: {error}") from error


def _nyud_row(source: Path, example_id: str) -> dict[str, Any]:
    paths = {
        "image": _find(source / "images", example_id, (".png", ".jpg")),
        "semseg": _find(source / "segmentation", example_id, (".png",)),
        "normals": _find(source / "normals", example_id, (".png",)),
        "edge": _find(source / "edge", example_id, (".png",)),
        "depth": _find(source / "depth", example_id, (".npy",)),
    }
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{example_id}: missing {', '.join(missing)}")
    image = _read_photo(paths["image"], example_id)
    try:
        raw_semseg = np.asarray(Image.open(paths["semseg"]), dtype=np.int64)
        normals = np.asarray(Image.open(paths["normals"]).convert("RGB"), dtype=np.float32) * (2 / 255) - 1
        edge = np.asarray(Image.open(paths["edge"]).convert("L"), dtype=np.float32) / 255
        depth = np.load(paths["depth"], allow_pickle=False).astype(np.float32)
    except Exception as error:
        raise ValueError(f"{example_id}: unreadable file ({error})") from error
    depth = depth[..., 0] if depth.ndim == 3 else depth
    # Stored 1..40 with 0 = unlabeled -> 0..39 with 255 ignored.
    semseg = np.where(raw_semseg == 0, 255, raw_semseg - 1)
    for name, value in (("semseg", semseg), ("normals", normals), ("edge", edge), ("depth", depth)):
        if value.shape[:2] != image.shape[:2]:
            raise ValueError(f"{example_id}: {name} is {value.shape[:2]} but the image is {image.shape[:2]}")
    return encode_example(example_id, image, semseg=semseg, normals=normals, edge=edge, depth=depth)


def convert_nyud(
    source: str | Path, output_dir: str | Path, rows_per_shard: int = 200, max_row_group_size: int | str | None = None
) -> dict[str, int]:
    """Convert the reference NYUD-v2 folder (40 classes, `tasks_sak.NYUD_V2_CLASSES`); every file is checked before
    anything is written."""
    source, output_dir = Path(source), Path(output_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"NYUD source folder {source} does not exist")
    splits = {split: _read_ids(source / "gt_sets" / name) for split, name in NYUD_SPLITS.items()}
    problems = []
    for ids in splits.values():
        for example_id in ids:
            for folder, suffixes in (
                ("images", (".png", ".jpg")),
                ("segmentation", (".png",)),
                ("normals", (".png",)),
                ("edge", (".png",)),
                ("depth", (".npy",)),
            ):
                if _find(source / folder, example_id, suffixes) is None:
                    problems.append(f"{folder}/{example_id}{suffixes[0]}")
    if problems:
        raise FileNotFoundError(f"{len(problems)} files are missing from {source}: {problems[:10]}")
    counts = {}
    columns = ["semseg", "depth", "normals", "edge"]
    for split, ids in splits.items():
        rows = (_nyud_row(source, example_id) for example_id in ids)
        counts[split] = write_split(rows, columns, output_dir, split, len(ids), rows_per_shard, max_row_group_size)
        if counts[split] != len(ids):
            raise RuntimeError(f"{split}: wrote {counts[split]} rows for {len(ids)} ids")
        if counts[split] != NYUD_EXPECTED[split]:
            print(f"note: {split} has {counts[split]} images (the NYUD-v2 protocol has {NYUD_EXPECTED[split]})")
    write_card(
        output_dir,
        "NYUD-v2 multi-task (SAK schema)",
        counts,
        columns,
        "NYUD-v2 with 40-class semantic segmentation, depth, surface normals and boundaries (795 train / 654 test), "
        "converted from the multi-task reference folder layout.",
        NYUD_CITATION,
        provenance=NYUD_PROVENANCE,
        class_names=NYUD_V2_CLASSES,
    )
    return counts


PASCAL_SPLITS = {"train": "train.txt", "test": "val.txt"}
PASCAL_EXPECTED = {"train": 4998, "test": 5105}
PASCAL_HUMAN_CLASS = 15  # "person" in PASCAL-Part's object classes
# PASCAL-Part part names of a person -> the 6 human parts of the multi-task protocol (0 = background):
# 1 head, 2 torso, 3 upper arms, 4 lower arms and hands, 5 upper legs, 6 lower legs and feet.
HUMAN_PARTS = {
    **dict.fromkeys(("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
PASCAL_CITATION = """@inproceedings{mottaghi2014role,
  title={The Role of Context for Object Detection and Semantic Segmentation in the Wild},
  author={Mottaghi, Roozbeh and Chen, Xianjie and Liu, Xiaobai and Cho, Nam-Gyu and Lee, Seong-Whan and Fidler, Sanja
          and Urtasun, Raquel and Yuille, Alan},
  booktitle={CVPR}, year={2014}
}
@inproceedings{chen2014detect,
  title={Detect What You Can: Detecting and Representing Objects using Holistic Models and Body Parts},
  author={Chen, Xianjie and Mottaghi, Roozbeh and Liu, Xiaobai and Fidler, Sanja and Urtasun, Raquel and Yuille, Alan},
  booktitle={CVPR}, year={2014}
}"""
PASCAL_PROVENANCE = """Each label is derived exactly as the multi-task reference loader derives it on the fly:
- `semseg`: `semseg/VOC12/ID.png` if it exists, otherwise `semseg/pascal-context/ID.png`, as stored (21 classes).
- `human_parts`: from the PASCAL-Part annotation `human_parts/ID.mat`: every person (class 15) with part annotations
  paints its parts with ids 1 head (hair, ears, eyes, eyebrows, mouth, nose), 2 torso (and neck), 3 upper arms,
  4 lower arms and hands, 5 upper legs, 6 lower legs and feet; everything else, and images without people, is 0.
- `normals`: the distilled normals `normals_distill/ID.png`, kept only on pixels whose PASCAL-Context class
  (`pascal-context/trainval/ID.mat`) also exists in NYUD-v2 (`json/nyu_classes.json`), plus tvmonitor; zero elsewhere
  (ignored in training and evaluation).
- `edge`: the pixels where the 4-neighbour Laplacian of the PASCAL-Context label map is non-zero, thinned.
- `sal`: the distilled saliency `sal_distill/ID.png` binarised at 0.5."""


def context_edges(label_map: np.ndarray) -> np.ndarray:
    """Boundaries of a PASCAL-Context label map as the reference derives them: the pixels where the 4-neighbour
    Laplacian of the label values (borders mirrored without repeating the edge pixel) is non-zero, thinned."""
    from skimage.morphology import thin

    labels = np.pad(np.asarray(label_map, dtype=np.float64), 1, mode="reflect")
    laplacian = labels[:-2, 1:-1] + labels[2:, 1:-1] + labels[1:-1, :-2] + labels[1:-1, 2:] - 4 * labels[1:-1, 1:-1]
    return thin(laplacian != 0).astype(np.float32)


def human_parts_label(annotation: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """Human-part ids (0 background, 1..6 parts) from a PASCAL-Part annotation (`scipy.io.loadmat` of its .mat):
    every person with annotated parts paints its parts; images without a person are all background, as in the
    reference."""
    objects = annotation["anno"][0][0][1][0]
    has_person = any(int(obj[1][0][0]) == PASCAL_HUMAN_CLASS and obj[2].sum() > 0 for obj in objects)
    target = np.zeros(objects[0][2].shape if len(objects) else shape, dtype=np.int64)
    if not has_person:
        return target
    for obj in objects:
        if int(obj[1][0][0]) != PASCAL_HUMAN_CLASS or len(obj[3]) == 0:
            continue
        for part in obj[3][0]:
            name = str(part[0][0])
            if name not in HUMAN_PARTS:
                raise ValueError(f"unknown human part {name!r}; known: {sorted(HUMAN_PARTS)}")
            target[part[1].astype(bool)] = HUMAN_PARTS[name]
    return target


def normals_valid_classes(source: Path) -> set[int]:
    """PASCAL-Context class ids whose distilled normals are kept: the classes NYUD-v2 also has, plus tvmonitor."""
    import json

    paths = [source / "json" / "nyu_classes.json", source / "json" / "context_classes.json"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; the reference PASCAL-Context layout has json/ with both files"
            )
    nyu, context = (json.loads(path.read_text()) for path in paths)
    return {int(context[name]) for name in nyu if name in context and name != "unknown"} | {int(context["tvmonitor"])}


PASCAL_FILES = {
    "image": "JPEGImages/{id}.jpg",
    "semseg": "semseg/VOC12/{id}.png or semseg/pascal-context/{id}.png",
    "human_parts": "human_parts/{id}.mat",
    "normals": "normals_distill/{id}.png",
    "sal": "sal_distill/{id}.png",
    "context": "pascal-context/trainval/{id}.mat",
}


def _pascal_paths(source: Path, example_id: str) -> dict[str, Path | None]:
    return {
        "image": _find(source / "JPEGImages", example_id, (".jpg", ".png")),
        "semseg": _find(source / "semseg" / "VOC12", example_id, (".png",))
        or _find(source / "semseg" / "pascal-context", example_id, (".png",)),
        "human_parts": _find(source / "human_parts", example_id, (".mat",)),
        "normals": _find(source / "normals_distill", example_id, (".png",)),
        "sal": _find(source / "sal_distill", example_id, (".png",)),
        "context": _find(source / "pascal-context" / "trainval", example_id, (".mat",)),
    }


def _pascal_row(source: Path, example_id: str, valid_classes: set[int], num_classes: int) -> dict[str, Any]:
    from scipy.io import loadmat

    paths = _pascal_paths(source, example_id)
    image = _read_photo(paths["image"], example_id)
    try:
        semseg = np.asarray(Image.open(paths["semseg"]), dtype=np.int64)
        label_map = np.asarray(loadmat(paths["context"])["LabelMap"])
        parts = human_parts_label(loadmat(paths["human_parts"]), image.shape[:2])
        stored_normals = np.asarray(Image.open(paths["normals"]).convert("RGB"), dtype=np.float32) * (2 / 255) - 1
        sal = (np.asarray(Image.open(paths["sal"]).convert("L"), dtype=np.float32) / 255 > 0.5).astype(np.float32)
    except Exception as error:
        raise ValueError(f"{example_id}: unreadable file ({type(error).__name__}: {error})") from error
    for name, value in (
        ("semseg", semseg),
        ("context label map", label_map),
        ("human_parts", parts),
        ("normals", stored_normals),
        ("sal", sal),
    ):
        if value.shape[:2] != image.shape[:2]:
            raise ValueError(f"{example_id}: {name} is {value.shape[:2]} but the image is {image.shape[:2]}")
    bad = np.setdiff1d(np.unique(semseg), [*range(num_classes), 255])
    if bad.size:
        raise ValueError(f"{example_id}: semseg has ids {bad.tolist()} outside 0..{num_classes - 1} and 255")
    # Distilled normals are kept only on classes NYUD-v2 also has; elsewhere zero (ignored in training).
    normals = np.where(np.isin(label_map, list(valid_classes))[..., None], stored_normals, 0.0)
    return encode_example(
        example_id, image, semseg=semseg, human_parts=parts, normals=normals, edge=context_edges(label_map), sal=sal
    )


def convert_pascal_context(
    source: str | Path,
    output_dir: str | Path,
    rows_per_shard: int = 200,
    num_classes: int = 21,
    class_names: Sequence[str] | None = None,
    max_row_group_size: int | str | None = None,
) -> dict[str, int]:
    """Convert the reference PASCAL-Context folder; every file is checked before anything is written.

    `class_names` name the semseg ids 0..num_classes-1 (default: the 21 classes of `tasks_sak.PASCAL_CONTEXT_CLASSES`,
    so another `num_classes` needs them)."""
    source, output_dir = Path(source), Path(output_dir)
    class_names = list(class_names or (PASCAL_CONTEXT_CLASSES if num_classes == len(PASCAL_CONTEXT_CLASSES) else []))
    if len(class_names) != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but {len(class_names)} class names are given; pass one name per class "
            "(--class_names FILE: a JSON list, or an id2label JSON object)"
        )
    if not source.is_dir():
        raise FileNotFoundError(f"PASCAL-Context source folder {source} does not exist")
    splits = {split: _read_ids(source / "ImageSets" / "Context" / name) for split, name in PASCAL_SPLITS.items()}
    valid_classes = normals_valid_classes(source)
    problems = []
    for ids in splits.values():
        for example_id in ids:
            missing = [name for name, path in _pascal_paths(source, example_id).items() if path is None]
            problems += [PASCAL_FILES[name].format(id=example_id) for name in missing]
    if problems:
        raise FileNotFoundError(f"{len(problems)} files are missing from {source}: {problems[:10]}")
    counts = {}
    columns = ["semseg", "human_parts", "normals", "edge", "sal"]
    for split, ids in splits.items():
        rows = (_pascal_row(source, example_id, valid_classes, num_classes) for example_id in ids)
        counts[split] = write_split(rows, columns, output_dir, split, len(ids), rows_per_shard, max_row_group_size)
        if counts[split] != len(ids):
            raise RuntimeError(f"{split}: wrote {counts[split]} rows for {len(ids)} ids")
        if counts[split] != PASCAL_EXPECTED[split]:
            print(
                f"note: {split} has {counts[split]} images (the PASCAL-Context protocol has {PASCAL_EXPECTED[split]})"
            )
    write_card(
        output_dir,
        "PASCAL-Context multi-task (SAK schema)",
        counts,
        columns,
        "PASCAL-Context in the multi-task protocol (4998 train / 5105 test): 21-class semantic segmentation, 6 human "
        "parts, distilled surface normals and saliency, and boundaries derived from the 459-class context labels. "
        "Converted from the multi-task reference folder layout.",
        PASCAL_CITATION,
        provenance=PASCAL_PROVENANCE,
        class_names=class_names,
    )
    return counts


def make_toyrooms(
    output_dir: str | Path,
    num_train: int = 2000,
    num_test: int = 200,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    rows_per_shard: int = 500,
    max_row_group_size: int | str | None = None,
) -> dict[str, int]:
    """Render ToyRooms train (scenes 0..num_train-1) and test (scenes 10**6..) splits into the schema."""
    output_dir = Path(output_dir)
    columns = ["semseg", "depth", "normals", "edge"]

    def rows(start: int, count: int) -> Iterator[dict[str, Any]]:
        for scene in toyrooms.generate(seed, start, count, *size):
            yield encode_example(scene.pop("id"), scene.pop("image"), **scene)

    counts = {
        split: write_split(rows(start, n), columns, output_dir, split, n, rows_per_shard, max_row_group_size)
        for split, start, n in (("train", 0, num_train), ("test", 10**6, num_test))
    }
    write_card(
        output_dir,
        "ToyRooms",
        counts,
        columns,
        f"Procedurally ray-cast indoor rooms ({size[0]}x{size[1]}, seed {seed}) with exact depth, camera-frame "
        f"normals, {len(toyrooms.CLASSES)} semantic classes ({', '.join(toyrooms.CLASSES)}) and boundaries.",
        license="apache-2.0",
        class_names=toyrooms.CLASSES,
    )
    return counts


def push_folder(output_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a written folder as a dataset repo; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="dataset", commit_message="Add data")
    return f"https://huggingface.co/datasets/{repo_id}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sak-prepare-dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    nyud = sub.add_parser("nyud", help="convert the reference NYUD-v2 folder layout")
    nyud.add_argument(
        "--source", required=True, help="folder with images/ segmentation/ normals/ edge/ depth/ gt_sets/"
    )
    pascal = sub.add_parser("pascal_context", help="convert the reference PASCAL-Context folder layout")
    pascal.add_argument(
        "--source",
        required=True,
        help="folder with JPEGImages/ semseg/ human_parts/ normals_distill/ sal_distill/ "
        "pascal-context/trainval/ json/ ImageSets/Context/",
    )
    pascal.add_argument("--num_classes", type=int, default=21, help="semantic classes (ids 0..N-1, 255 ignored)")
    pascal.add_argument(
        "--class_names",
        help="JSON file naming the classes (a list, or an id2label object); needed when --num_classes is not 21",
    )
    toy = sub.add_parser("toyrooms", help="render ToyRooms")
    toy.add_argument("--num_train", type=int, default=2000, help="training scenes")
    toy.add_argument("--num_test", type=int, default=200, help="test scenes")
    toy.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"), help="image size")
    toy.add_argument("--seed", type=int, default=0, help="scene seed: the same seed gives the same dataset")
    for command in (nyud, pascal, toy):
        command.add_argument("--output_dir", required=True, help="folder to write data/*.parquet and README.md into")
        command.add_argument("--rows_per_shard", type=int, default=200, help="rows per parquet shard")
        command.add_argument(
            "--max_row_group_size",
            default=datasets_config.MAX_ROW_GROUP_SIZE,
            help="largest parquet row group, in uncompressed bytes (e.g. 100MB, the `datasets` default)",
        )
        command.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder as this dataset repo")
        command.add_argument("--private", action="store_true", help="with --push_to_hub: create a private repo")
    return parser.parse_args(argv)


def _read_class_names(path: str) -> list[str]:
    """Class names from a JSON list or an id2label object (`{"0": "background", ...}`)."""
    names = json.loads(Path(path).read_text())
    if isinstance(names, dict):
        names = [names[key] for key in sorted(names, key=int)]
    if not isinstance(names, list):
        raise ValueError(f"{path} must hold a JSON list of class names or an id2label object")
    return names


def main(argv: list[str] | None = None) -> None:
    """The command; a bad input ends in one `error:` line and exit status 2 (`modeling_sak.cli`)."""
    with bad_input_exits("sak-prepare-dataset"):
        return _main(argv)


def _main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dataset == "nyud":
        counts = convert_nyud(args.source, args.output_dir, args.rows_per_shard, args.max_row_group_size)
    elif args.dataset == "pascal_context":
        counts = convert_pascal_context(
            args.source,
            args.output_dir,
            args.rows_per_shard,
            args.num_classes,
            _read_class_names(args.class_names) if args.class_names else None,
            args.max_row_group_size,
        )
    else:
        counts = make_toyrooms(
            args.output_dir,
            args.num_train,
            args.num_test,
            tuple(args.size),
            args.seed,
            args.rows_per_shard,
            args.max_row_group_size,
        )
    print(f"wrote {', '.join(f'{s}: {n}' for s, n in counts.items())} to {args.output_dir}")
    if args.push_to_hub:
        print(f"uploaded to {push_folder(args.output_dir, args.push_to_hub, args.private)}")


if __name__ == "__main__":
    main()
