"""prepare_dataset + loading: a fake reference NYUD folder is converted, streamed, transformed and batched."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import exits_with_error
from datasets import Array2D, Array3D, Dataset, Features, Value, load_dataset
from PIL import Image

from modeling_sak.commands.prepare_dataset import main, make_toyrooms
from modeling_sak.data import toyrooms
from modeling_sak.data.loading import MultiTaskStream, load_multitask_split
from modeling_sak.data.schema import decode_example, read_id2label
from modeling_sak.data.transforms import MultiTaskTransform
from modeling_sak.remote_code.tasks_sak import NYUD_V2_CLASSES


NYUD_TASKS = ["semseg", "normals", "edge", "depth"]
SIZE = (24, 32)


def write_fake_nyud(root, train=("0003", "0007", "0011"), test=("0001", "0005"), seed=0):
    rng = np.random.default_rng(seed)
    files = {}
    for folder in ("images", "segmentation", "normals", "edge", "depth", "gt_sets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for example_id in (*train, *test):
        image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        segmentation = rng.integers(0, 41, SIZE).astype(np.uint8)  # 1..40, 0 = unlabeled
        normals = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        edge = (rng.random(SIZE) > 0.9).astype(np.uint8) * 255
        depth = rng.uniform(0.5, 9.0, SIZE).astype(np.float32)
        Image.fromarray(image).save(root / "images" / f"{example_id}.png")
        Image.fromarray(segmentation).save(root / "segmentation" / f"{example_id}.png")
        Image.fromarray(normals).save(root / "normals" / f"{example_id}.png")
        Image.fromarray(edge).save(root / "edge" / f"{example_id}.png")
        np.save(root / "depth" / f"{example_id}.npy", depth)
        files[example_id] = {
            "image": image,
            "segmentation": segmentation,
            "normals": normals,
            "edge": edge,
            "depth": depth,
        }
    (root / "gt_sets" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "gt_sets" / "val.txt").write_text("\n".join(test) + "\n")
    return files


def test_nyud_folder_converts_streams_and_batches_with_the_reference_label_values(tmp_path):
    files = write_fake_nyud(tmp_path / "NYUD")
    main(["nyud", "--source", str(tmp_path / "NYUD"), "--output_dir", str(tmp_path / "out"), "--rows_per_shard", "2"])
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert {s["name"]: s["num_examples"] for s in metadata["dataset_info"]["splits"]} == {"train": 3, "test": 2}
    assert "silberman2012indoor" in card
    # The class names ship with the data (id2label.json, also tabled in the card) ...
    assert read_id2label(tmp_path / "out") == dict(enumerate(NYUD_V2_CLASSES)) and "| 39 | otherprop |" in card

    stream = load_multitask_split(str(tmp_path / "out"), "test", streaming=True)
    eval_stream = MultiTaskStream(stream, MultiTaskTransform(train=False, size=(32, 32)), NYUD_TASKS, train=False)
    loader = torch.utils.data.DataLoader(eval_stream, batch_size=2, collate_fn=eval_stream.collate)
    batch = next(iter(loader))
    assert batch["ids"] == ["0001", "0005"] and batch["pixel_values"].shape == (2, 3, 32, 32)
    labels, reference = batch["labels"], files["0001"]
    rows = slice(4, 28)  # 24 rows centred in 32
    expected_semseg = np.where(reference["segmentation"] == 0, 255, reference["segmentation"].astype(np.int64) - 1)
    np.testing.assert_array_equal(labels["semseg"][0, rows].numpy(), expected_semseg)
    assert (labels["semseg"][0, :4] == 255).all()
    np.testing.assert_array_equal(labels["depth"][0, 0, rows].numpy(), reference["depth"])  # lossless metres
    np.testing.assert_allclose(
        labels["normals"][0, :, rows].numpy(), reference["normals"].transpose(2, 0, 1) * (2 / 255) - 1, atol=1e-6
    )
    np.testing.assert_array_equal(labels["edge"][0, 0, rows].numpy(), reference["edge"] / 255.0)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(
        batch["pixel_values"][0, :, 4, 0].numpy(), (reference["image"][0, 0] / 255 - mean) / std, rtol=1e-5
    )

    # The same folder without streaming, and a training stream with augmentation, give model-ready batches.
    train = load_multitask_split(str(tmp_path / "out"), "train", streaming=False, shuffle_buffer=10)
    assert len(train) == 3
    train_stream = MultiTaskStream(train, MultiTaskTransform(train=True, size=(16, 16)), NYUD_TASKS, train=True)
    batch = next(iter(torch.utils.data.DataLoader(train_stream, batch_size=3, collate_fn=train_stream.collate)))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["skipped"] == []


def test_missing_files_are_all_listed_before_anything_is_written(tmp_path, capsys):
    write_fake_nyud(tmp_path / "NYUD")
    (tmp_path / "NYUD" / "depth" / "0007.npy").unlink()
    (tmp_path / "NYUD" / "edge" / "0001.png").unlink()
    with exits_with_error(capsys, r"2 files are missing.*depth/0007.npy.*edge/0001.png"):
        main(["nyud", "--source", str(tmp_path / "NYUD"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unreadable_and_mismatched_files_name_the_example(tmp_path, capsys):
    write_fake_nyud(tmp_path / "NYUD")
    (tmp_path / "NYUD" / "images" / "0011.png").write_bytes(b"not a png")
    with exits_with_error(capsys, r"0011: .*images/0011.png: cannot read the image \(UnidentifiedImageError"):
        main(["nyud", "--source", str(tmp_path / "NYUD"), "--output_dir", str(tmp_path / "out")])
    write_fake_nyud(tmp_path / "NYUD2")
    np.save(tmp_path / "NYUD2" / "depth" / "0003.npy", np.ones((10, 10), np.float32))
    with exits_with_error(capsys, r"0003: depth is \(10, 10\) but the image is \(24, 32\)"):
        main(["nyud", "--source", str(tmp_path / "NYUD2"), "--output_dir", str(tmp_path / "out2")])


def test_an_image_that_is_not_a_photo_names_the_file_and_its_mode(tmp_path, capsys):
    write_fake_nyud(tmp_path / "NYUD")
    depth_mm = np.full(SIZE, 1500, np.uint16)
    depth_mm[0, 0], depth_mm[1, 1] = 0, 6625  # a NYU sync depth PNG put among the images
    Image.fromarray(depth_mm).save(tmp_path / "NYUD" / "images" / "0007.png")
    path = tmp_path / "NYUD" / "images" / "0007.png"
    with exits_with_error(
        capsys,
        rf"^0007: {path}: mode I;16 \(16-bit single channel, values 0..6625\) is "
        "not a photo; SAK expects an 8-bit RGB or grayscale photo",
    ):
        main(["nyud", "--source", str(tmp_path / "NYUD"), "--output_dir", str(tmp_path / "out")])
    # A photo in another mode is converted by the documented rule: RGBA composited onto white.
    files = write_fake_nyud(tmp_path / "NYUD2")
    alpha = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([files["0001"]["image"], alpha]), "RGBA")
    rgba.save(tmp_path / "NYUD2" / "images" / "0001.png")
    main(["nyud", "--source", str(tmp_path / "NYUD2"), "--output_dir", str(tmp_path / "out2")])
    row = load_dataset(str(tmp_path / "out2"), split="test")[0]
    a = alpha[..., None] / 255
    expected = np.round(files["0001"]["image"] * a + 255 * (1 - a)).astype(np.uint8)
    assert row["id"] == "0001" and row["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(row["image"]), expected)


def test_push_to_hub_uploads_the_dataset_folder(tmp_path, monkeypatch):
    import huggingface_hub

    write_fake_nyud(tmp_path / "NYUD")
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append((repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(kw))
    main(
        [
            "nyud",
            "--source",
            str(tmp_path / "NYUD"),
            "--output_dir",
            str(tmp_path / "out"),
            "--push_to_hub",
            "org/nyud",
        ]
    )
    assert calls[0] == ("org/nyud", {"repo_type": "dataset", "private": False, "exist_ok": True})
    assert calls[1]["repo_type"] == "dataset" and calls[1]["folder_path"] == str(tmp_path / "out")


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def write_with_a_bad_row(tmp_path):
    main(
        [
            "toyrooms",
            "--output_dir",
            str(tmp_path / "toy"),
            "--num_train",
            "6",
            "--num_test",
            "2",
            "--size",
            "32",
            "48",
        ]
    )
    path = next((tmp_path / "toy" / "data").glob("train-*.parquet"))
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[1]["image"] = {"bytes": b"corrupt", "path": None}  # undecodable image
    rows[2]["depth"] = {"bytes": png_bytes(Image.new("F", (5, 5)), "TIFF"), "path": None}  # label of the wrong size
    depth_mm = np.full((32, 48), 6625, np.uint16)
    rows[3]["image"] = {"bytes": png_bytes(Image.fromarray(depth_mm)), "path": None}  # a 16-bit depth map as image
    rows[4]["depth"] = {"bytes": png_bytes(Image.fromarray(depth_mm)), "path": None}  # millimetres, not metres
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return tmp_path / "toy"


def test_bad_rows_are_skipped_and_counted_in_training_and_fatal_in_evaluation(tmp_path):
    folder = write_with_a_bad_row(tmp_path)
    split = load_multitask_split(str(folder), "train", streaming=True)
    stream = MultiTaskStream(split, MultiTaskTransform(train=True, size=(32, 48)), NYUD_TASKS, train=True)
    batches = list(torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=stream.collate))
    skipped = [entry for batch in batches for entry in batch["skipped"]]
    assert len(skipped) == 4 and sum(len(b["ids"]) for b in batches) == 2
    assert "row 'toyrooms-0-000001': cannot decode image (UnidentifiedImageError" in skipped[0]
    assert "toyrooms-0-000002" in skipped[1] and "depth is (5, 5)" in skipped[1]
    assert "row 'toyrooms-0-000003': image: mode I;16 (16-bit single channel, values 6625..6625)" in skipped[2]
    assert "row 'toyrooms-0-000004': depth is stored in mode I;16; the schema stores it in mode F" in skipped[3]
    evaluation = MultiTaskStream(split, MultiTaskTransform(train=False, size=(32, 48)), NYUD_TASKS, train=False)
    with pytest.raises(ValueError, match="bad evaluation row 'toyrooms-0-000001'"):
        list(evaluation)


def test_each_process_sees_its_own_examples_once(tmp_path):
    main(
        [
            "toyrooms",
            "--output_dir",
            str(tmp_path / "toy"),
            "--num_train",
            "10",
            "--num_test",
            "1",
            "--size",
            "32",
            "48",
            "--rows_per_shard",
            "3",
        ]
    )
    seen = []
    for rank in range(2):
        split = load_multitask_split(str(tmp_path / "toy"), "train", streaming=True, shuffle_buffer=4, seed=1)
        stream = MultiTaskStream(
            split, MultiTaskTransform(train=False, size=(32, 48)), NYUD_TASKS, train=False, rank=rank, world_size=2
        )
        stream.set_epoch(3)
        seen.append([example["id"] for example in stream])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"toyrooms-0-{i:06d}" for i in range(10)]


def test_tanganke_nyuv2_layout_through_the_column_mapping(tmp_path):
    rng = np.random.default_rng(0)
    features = Features(
        {
            "image": Array3D((3, 8, 12), "float32"),
            "segmentation": Array2D((8, 12), "int64"),
            "depth": Array3D((1, 8, 12), "float32"),
            "normal": Array3D((3, 8, 12), "float32"),
            "id": Value("string"),
        }
    )
    segmentation = rng.integers(-1, 13, (8, 12))
    Dataset.from_dict(
        {
            "image": [rng.random((3, 8, 12)).astype(np.float32)],
            "segmentation": [segmentation],
            "depth": [rng.random((1, 8, 12)).astype(np.float32) + 1],
            "normal": [rng.uniform(-1, 1, (3, 8, 12))],
            "id": ["a"],
        },
        features=features,
    ).to_parquet(str(tmp_path / "nyuv2" / "train.parquet"))
    split = load_dataset("parquet", data_files={"train": str(tmp_path / "nyuv2" / "train.parquet")}, split="train")
    stream = MultiTaskStream(
        split, MultiTaskTransform(train=False, size=(8, 12)), NYUD_TASKS, train=False, dataset_name="tanganke/nyuv2"
    )
    batch = stream.collate(list(stream))
    np.testing.assert_array_equal(batch["labels"]["semseg"][0].numpy(), np.where(segmentation < 0, 255, segmentation))
    assert batch["labels"]["edge"] is None and batch["labels"]["normals"].shape == (1, 3, 8, 12)


def row_group_sizes(path) -> list[tuple[int, int]]:
    """(rows, uncompressed Arrow bytes) of every row group of a parquet file."""
    parquet = pq.ParquetFile(path)
    return [(group.num_rows, group.nbytes) for group in map(parquet.read_row_group, range(parquet.num_row_groups))]


def test_row_groups_are_bounded_in_bytes_and_every_row_reads_back_identical(tmp_path):
    size, bound = (24, 32), 12_000  # a ToyRooms row of 24 x 32 is about 6 kB: two rows a group
    make_toyrooms(tmp_path / "small", num_train=9, num_test=1, size=size, rows_per_shard=5, max_row_group_size=bound)
    make_toyrooms(tmp_path / "whole", num_train=9, num_test=1, size=size, rows_per_shard=5)  # default: 100MB
    shards = sorted((tmp_path / "small" / "data").glob("train-*.parquet"))
    assert [p.name for p in shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    for shard in shards:
        groups = row_group_sizes(shard)
        whole = pq.read_table(tmp_path / "whole" / "data" / shard.name)
        assert row_group_sizes(tmp_path / "whole" / "data" / shard.name) == [(whole.num_rows, whole.nbytes)]
        assert len(groups) >= 2 and all(nbytes <= bound for _, nbytes in groups)
        row_bytes = [pq.read_table(shard).slice(i, 1).nbytes for i in range(whole.num_rows)]
        starts = np.cumsum([0] + [rows for rows, _ in groups])
        for (rows, _), start in zip(groups[:-1], starts):  # packed: the next row would not have fitted
            assert sum(row_bytes[start : start + rows + 1]) > bound
        assert pq.read_table(shard).equals(whole)  # the same rows, bytes and schema, only grouped differently

    # Every row, read back through `datasets`, is the scene it was rendered from.
    files = [str(p) for p in shards]
    split = load_dataset("parquet", data_files={"train": files}, split="train")
    assert split.features == load_dataset(str(tmp_path / "whole"), split="train").features
    scenes = list(toyrooms.generate(0, 0, 9, *size))
    assert split["id"] == [scene["id"] for scene in scenes]
    for row, scene in zip(split, scenes):
        example = decode_example(row)
        np.testing.assert_array_equal(example["image"], scene["image"])
        np.testing.assert_array_equal(example["semseg"], scene["semseg"])
        np.testing.assert_array_equal(example["depth"], scene["depth"].astype(np.float32))
        np.testing.assert_array_equal(example["edge"], np.round(scene["edge"] * 255) / 255)

    with pytest.raises(ValueError, match="max_row_group_size='0B' must be a positive number of bytes"):
        make_toyrooms(tmp_path / "bad", num_train=1, num_test=1, size=size, max_row_group_size="0B")


def test_the_class_names_ship_with_the_data_locally_and_from_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    main(
        [
            "toyrooms",
            "--output_dir",
            str(tmp_path / "toy"),
            "--num_train",
            "2",
            "--num_test",
            "1",
            "--size",
            "16",
            "24",
        ]
    )
    expected = dict(enumerate(toyrooms.CLASSES))
    assert read_id2label(tmp_path / "toy") == expected
    assert json.loads((tmp_path / "toy" / "id2label.json").read_text())["6"] == "picture"
    # The file beside the data changes nothing for `datasets` or the project's loader.
    assert set(load_dataset(str(tmp_path / "toy"))) == {"train", "test"}
    assert len(load_multitask_split(str(tmp_path / "toy"), "train", streaming=False)) == 2

    # A dataset repo's copy is read through hf_hub_download (here from a cache laid out as a download leaves it).
    snapshot = tmp_path / "hub" / "datasets--org--toyrooms" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "id2label.json").write_bytes((tmp_path / "toy" / "id2label.json").read_bytes())
    (tmp_path / "hub" / "datasets--org--toyrooms" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--org--toyrooms" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert read_id2label("org/toyrooms") == expected

    # Training names the model's semseg classes by the data (the saved config's id2label), when the count matches.
    from modeling_sak.training.recipe import Recipe
    from modeling_sak.training.student import build_config

    assert build_config(Recipe(), {}, str(tmp_path / "toy")).id2label == expected
    assert build_config(Recipe(), {}, "org/toyrooms").label2id["picture"] == 6
    five = Recipe(tasks={"semseg": 5}, task_loss_weights={"semseg": 1.0})
    assert "floor" not in build_config(five, {}, str(tmp_path / "toy")).id2label.values()  # 7 names, 5 classes

    # A folder without names reads as None; a file with gaps in its ids is refused by name.
    assert read_id2label(tmp_path / "toy" / "data") is None
    (tmp_path / "toy" / "id2label.json").write_text(json.dumps({"0": "floor", "2": "ceiling"}))
    with pytest.raises(ValueError, match=r"id2label.json has class ids \[0, 2\]; expected 0..1"):
        read_id2label(tmp_path / "toy")
