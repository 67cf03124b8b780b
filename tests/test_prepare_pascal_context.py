"""prepare_dataset pascal_context: a fake reference PASCAL-Context folder is converted, streamed, transformed and
batched, and every label is checked against the files it came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import exits_with_error
from PIL import Image
from scipy.io import loadmat, savemat
from scipy.ndimage import convolve
from skimage.morphology import thin

from modeling_sak.commands.prepare_dataset import context_edges, human_parts_label, main
from modeling_sak.data.loading import MultiTaskStream, load_multitask_split
from modeling_sak.data.schema import read_id2label
from modeling_sak.data.transforms import MultiTaskTransform
from modeling_sak.remote_code.tasks_sak import PASCAL_CONTEXT_CLASSES


PASCAL_TASKS = ["semseg", "human_parts", "normals", "edge", "sal"]
SIZE = (20, 28)
NYU_CLASSES = ["unknown", "wall", "floor", "chair", "table"]
CONTEXT_CLASSES = {"aeroplane": 1, "wall": 5, "floor": 7, "chair": 9, "sky": 11, "tvmonitor": 13, "person": 15}


def part_annotation(objects):
    """A PASCAL-Part style `anno` struct: objects = [(class_ind, mask, [(part_name, mask), ...]), ...]."""
    object_array = np.zeros(
        (1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    )
    for j, (class_ind, mask, parts) in enumerate(objects):
        part_array = (
            np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")]) if parts else np.zeros((0, 0))
        )
        for k, (name, part_mask) in enumerate(parts):
            part_array[0, k] = (name, part_mask.astype(np.uint8))
        object_array[0, j] = ("obj", np.array([[class_ind]]), mask.astype(np.uint8), part_array)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("image", object_array)
    return {"anno": anno}


def write_fake_pascal(root, train=("2008_000002", "2008_000003"), test=("2008_000007",), seed=0):
    rng = np.random.default_rng(seed)
    for folder in (
        "JPEGImages",
        "semseg/pascal-context",
        "semseg/VOC12",
        "human_parts",
        "normals_distill",
        "sal_distill",
        "pascal-context/trainval",
        "json",
        "ImageSets/Context",
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "json" / "nyu_classes.json").write_text(json.dumps(NYU_CLASSES))
    (root / "json" / "context_classes.json").write_text(json.dumps(CONTEXT_CLASSES))
    files = {}
    for n, example_id in enumerate((*train, *test)):
        image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        semseg = rng.integers(0, 21, SIZE).astype(np.uint8)
        semseg[0, :3] = 255
        label_map = np.full(SIZE, 5, dtype=np.uint16)  # wall
        label_map[4:12, 6:14] = 9  # chair: normals kept
        label_map[12:18, 16:26] = 11  # sky: normals dropped
        normals = rng.integers(1, 256, (*SIZE, 3), dtype=np.uint8)
        sal = rng.integers(0, 256, SIZE, dtype=np.uint8)
        person = np.zeros(SIZE, bool)
        person[2:18, 2:10] = True
        head, arm, foot = np.zeros(SIZE, bool), np.zeros(SIZE, bool), np.zeros(SIZE, bool)
        head[2:5, 3:7], arm[6:9, 2:4], foot[16:18, 5:8] = True, True, True
        objects = [(1, ~person, [])]  # an aeroplane without parts
        if n == 0:  # a person with parts
            objects.append((15, person, [("head", head), ("luarm", arm), ("rfoot", foot)]))
        Image.fromarray(image).save(root / "JPEGImages" / f"{example_id}.jpg", quality=95)
        # VOC12 labels win over pascal-context ones when both exist, as in the reference.
        seg_folder = "VOC12" if n == 1 else "pascal-context"
        Image.fromarray(semseg).save(root / "semseg" / seg_folder / f"{example_id}.png")
        savemat(root / "human_parts" / f"{example_id}.mat", part_annotation(objects))
        Image.fromarray(normals).save(root / "normals_distill" / f"{example_id}.png")
        Image.fromarray(sal).save(root / "sal_distill" / f"{example_id}.png")
        savemat(root / "pascal-context" / "trainval" / f"{example_id}.mat", {"LabelMap": label_map})
        files[example_id] = {
            "image": np.asarray(Image.open(root / "JPEGImages" / f"{example_id}.jpg")),
            "semseg": semseg,
            "label_map": label_map,
            "normals": normals,
            "sal": sal,
            "parts": (head, arm, foot) if n == 0 else None,
        }
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text("\n".join(test) + "\n")
    return files


def test_context_edges_are_the_thinned_nonzero_laplacian_of_the_label_map():
    rng = np.random.default_rng(1)
    label_map = np.repeat(np.repeat(rng.integers(0, 5, (6, 8)), 5, axis=0), 4, axis=1)
    laplacian = convolve(label_map.astype(np.float64), np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]]), mode="mirror")
    expected = thin(laplacian != 0)
    np.testing.assert_array_equal(context_edges(label_map), expected.astype(np.float32))
    assert context_edges(np.full((9, 9), 3)).sum() == 0


def test_human_parts_follow_the_part_table_and_images_without_people_are_background():
    person = np.zeros((6, 6), bool)
    person[1:5, 1:5] = True
    head, leg = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    head[1, 1:3], leg[4, 2:4] = True, True

    def label(objects):
        return human_parts_label(loadmat_roundtrip(part_annotation(objects)), (6, 6))

    expected = np.zeros((6, 6), np.int64)
    expected[head], expected[leg] = 1, 6
    np.testing.assert_array_equal(label([(1, ~person, []), (15, person, [("hair", head), ("rlleg", leg)])]), expected)
    np.testing.assert_array_equal(label([(1, person, [])]), np.zeros((6, 6)))  # no person
    np.testing.assert_array_equal(label([(15, person, [])]), np.zeros((6, 6)))  # a person without parts
    with pytest.raises(ValueError, match="unknown human part 'tail'"):
        label([(15, person, [("tail", head)])])


def loadmat_roundtrip(struct):
    import io

    buffer = io.BytesIO()
    savemat(buffer, struct)
    buffer.seek(0)
    return loadmat(buffer)


def test_pascal_folder_converts_streams_and_batches_with_the_reference_label_values(tmp_path):
    files = write_fake_pascal(tmp_path / "PASCAL")
    main(["pascal_context", "--source", str(tmp_path / "PASCAL"), "--output_dir", str(tmp_path / "out")])
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert {s["name"]: s["num_examples"] for s in metadata["dataset_info"]["splits"]} == {"train": 2, "test": 1}
    assert {f["name"] for f in metadata["dataset_info"]["features"]} == {"id", "image", *PASCAL_TASKS}
    assert metadata["task_categories"] == ["image-segmentation"] and "saliency" in metadata["tags"]
    assert "mottaghi2014role" in card and "`human_parts`" in card and "| `depth`" not in card
    assert "## How the labels were made" in card and "Laplacian" in card
    assert read_id2label(tmp_path / "out") == dict(enumerate(PASCAL_CONTEXT_CLASSES)) and "| 20 | tvmonitor |" in card

    split = load_multitask_split(str(tmp_path / "out"), "train", streaming=True)
    stream = MultiTaskStream(split, MultiTaskTransform(train=False, size=SIZE), PASCAL_TASKS, train=False)
    batch = stream.collate(list(stream))
    assert batch["ids"] == ["2008_000002", "2008_000003"]
    labels = batch["labels"]
    for i, example_id in enumerate(batch["ids"]):
        reference = files[example_id]
        np.testing.assert_array_equal(labels["semseg"][i].numpy(), reference["semseg"])
        np.testing.assert_array_equal(labels["sal"][i].numpy(), (reference["sal"] / 255 > 0.5).astype(np.int64))
        np.testing.assert_array_equal(labels["edge"][i, 0].numpy(), context_edges(reference["label_map"]))
        # Normals are kept on NYUD classes (wall, chair) and tvmonitor; elsewhere (sky) they are ignored.
        normals = labels["normals"][i].permute(1, 2, 0).numpy()
        sky = reference["label_map"] == 11
        assert (normals[sky] == 255).all()
        np.testing.assert_allclose(normals[~sky], reference["normals"][~sky] * (2 / 255) - 1, atol=1e-6)
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        np.testing.assert_allclose(
            batch["pixel_values"][i, :, 3, 5].numpy(), (reference["image"][3, 5] / 255 - mean) / std, rtol=1e-5
        )
    head, arm, foot = files["2008_000002"]["parts"]
    expected_parts = np.zeros(SIZE, np.int64)
    expected_parts[head], expected_parts[arm], expected_parts[foot] = 1, 3, 6
    np.testing.assert_array_equal(labels["human_parts"][0].numpy(), expected_parts)
    assert (labels["human_parts"][1] == 0).all()  # no person: background, as in the reference

    # Training batches with augmentation are model-ready for the five PASCAL tasks.
    train = MultiTaskStream(split, MultiTaskTransform(train=True, size=(16, 16)), PASCAL_TASKS, train=True)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2, collate_fn=train.collate)))
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and set(batch["labels"]) >= set(PASCAL_TASKS)


def test_missing_and_bad_pascal_files_are_named(tmp_path, capsys):
    write_fake_pascal(tmp_path / "P")
    (tmp_path / "P" / "human_parts" / "2008_000003.mat").unlink()
    (tmp_path / "P" / "pascal-context" / "trainval" / "2008_000007.mat").unlink()
    with exits_with_error(
        capsys,
        r"2 files are missing.*human_parts/2008_000003.mat.*pascal-context/trainval/2008_000007.mat",
    ):
        main(["pascal_context", "--source", str(tmp_path / "P"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()

    write_fake_pascal(tmp_path / "Q")
    (tmp_path / "Q" / "sal_distill" / "2008_000003.png").write_bytes(b"not a png")
    with exits_with_error(capsys, "2008_000003: unreadable file"):
        main(["pascal_context", "--source", str(tmp_path / "Q"), "--output_dir", str(tmp_path / "out")])

    write_fake_pascal(tmp_path / "R")
    Image.fromarray(np.full(SIZE, 30, np.uint8)).save(tmp_path / "R" / "semseg" / "pascal-context" / "2008_000007.png")
    with exits_with_error(capsys, r"2008_000007: semseg has ids \[30\] outside 0..20 and 255"):
        main(["pascal_context", "--source", str(tmp_path / "R"), "--output_dir", str(tmp_path / "out")])

    write_fake_pascal(tmp_path / "T")  # a 16-bit single-channel map where the photo should be
    (tmp_path / "T" / "JPEGImages" / "2008_000002.jpg").unlink()
    path = tmp_path / "T" / "JPEGImages" / "2008_000002.png"
    Image.fromarray(np.arange(SIZE[0] * SIZE[1], dtype=np.uint16).reshape(SIZE) * 10).save(path)
    with exits_with_error(
        capsys,
        rf"^2008_000002: {path}: mode I;16 \(16-bit single channel, values 0..5590\) "
        "is not a photo; SAK expects an 8-bit RGB or grayscale photo",
    ):
        main(["pascal_context", "--source", str(tmp_path / "T"), "--output_dir", str(tmp_path / "out")])

    write_fake_pascal(tmp_path / "S")
    (tmp_path / "S" / "json" / "nyu_classes.json").unlink()
    with exits_with_error(capsys, "nyu_classes.json is missing"):
        main(["pascal_context", "--source", str(tmp_path / "S"), "--output_dir", str(tmp_path / "out")])


def test_another_class_count_needs_its_class_names(tmp_path, capsys):
    write_fake_pascal(tmp_path / "P")
    arguments = ["pascal_context", "--source", str(tmp_path / "P"), "--output_dir", str(tmp_path / "out")]
    with exits_with_error(capsys, "num_classes=25 but 0 class names are given; pass one name per class"):
        main([*arguments, "--num_classes", "25"])
    assert not (tmp_path / "out").exists()
    names = [f"class {i}" for i in range(25)]
    (tmp_path / "names.json").write_text(json.dumps({str(i): name for i, name in enumerate(names)}))
    main([*arguments, "--num_classes", "25", "--class_names", str(tmp_path / "names.json")])
    assert read_id2label(tmp_path / "out") == dict(enumerate(names))
