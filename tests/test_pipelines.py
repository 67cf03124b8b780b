"""transformers pipelines on SAK checkpoints: the stock image-segmentation, depth-estimation and
image-feature-extraction pipelines and the carried "sak-multi-task" one, loaded the way users load them (by path, with
trust_remote_code, in a fresh process without this package), give exactly the image processor's post-processing of
the model's own outputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_SIZE, tiny_config
from PIL import Image
from transformers import pipeline
from transformers.modeling_outputs import DepthEstimatorOutput, SemanticSegmenterOutput

from modeling_sak import (
    SAKForDepthEstimation,
    SAKForMultiTask,
    SAKForSemanticSegmentation,
    SAKImageProcessor,
    SAKMultiTaskPipeline,
)


def write_checkpoint(folder, **overrides) -> SAKForMultiTask:
    """A tiny SAK saved as training and the converter save it: the model, then its image processor."""
    model = SAKForMultiTask(tiny_config(**overrides)).eval()
    model.save_pretrained(folder)
    SAKImageProcessor(pad_size=TINY_IMAGE_SIZE).save_pretrained(folder)
    return model


def photo(height: int = 50, width: int = 70, seed: int = 0) -> Image.Image:
    """A photo smaller than the 64 x 96 canvas, so that it is padded on every side (not a canvas size)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_a_checkpoint_names_its_auto_classes_and_pipeline(tmp_path):
    write_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_sak.SAKConfig",
        "AutoModel": "modeling_sak.SAKForMultiTask",
        "AutoModelForSemanticSegmentation": "modeling_sak.SAKForSemanticSegmentation",
        "AutoModelForDepthEstimation": "modeling_sak.SAKForDepthEstimation",
    }
    assert config["custom_pipelines"] == {
        "sak-multi-task": {"impl": "pipeline_sak.SAKMultiTaskPipeline", "pt": ["AutoModel"], "type": "image"}
    }
    assert (tmp_path / "pipeline_sak.py").is_file()


def test_the_task_heads_load_a_multi_task_checkpoint_with_the_same_weights(tmp_path):
    model = write_checkpoint(tmp_path)
    x = torch.randn(2, 3, 50, 70, generator=torch.Generator().manual_seed(0))
    labels = {"semseg": torch.randint(0, 40, (2, 50, 70)), "depth": torch.rand(2, 1, 50, 70) * 5}
    with torch.no_grad():
        expected = model(x, labels={**labels, "normals": None, "edge": None})
    for head, task in ((SAKForSemanticSegmentation, "semseg"), (SAKForDepthEstimation, "depth")):
        loaded, info = head.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        label = labels[task] if task == "semseg" else labels[task][:, 0]
        with torch.no_grad():
            out = loaded.eval()(x, labels=label)
        if task == "semseg":
            assert isinstance(out, SemanticSegmenterOutput)
            torch.testing.assert_close(out.logits, expected.task_outputs["semseg"], rtol=0, atol=0)
        else:
            assert isinstance(out, DepthEstimatorOutput) and out.predicted_depth.shape == (2, 50, 70)
            torch.testing.assert_close(out.predicted_depth, expected.task_outputs["depth"][:, 0], rtol=0, atol=0)
        torch.testing.assert_close(out.loss, expected.task_losses[task], rtol=0, atol=0)


def test_a_head_without_its_task_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"SAKForSemanticSegmentation needs a 'semseg' task, but this SAK's tasks"):
        SAKForSemanticSegmentation(tiny_config(tasks={"depth": 1}))
    with pytest.raises(ValueError, match=r"SAKForDepthEstimation needs a 'depth' task.*stage-1"):
        SAKForDepthEstimation(tiny_config(tasks={}))


def test_post_processing_reads_the_head_outputs_as_the_multi_task_outputs(tmp_path):
    model = write_checkpoint(tmp_path)
    processor = SAKImageProcessor(pad_size=TINY_IMAGE_SIZE)
    inputs = processor([photo(), photo(40, 90, seed=1)])
    with torch.no_grad():
        outputs = model(**inputs)
        logits = SAKForSemanticSegmentation.from_pretrained(tmp_path).eval()(**inputs)
        depth = SAKForDepthEstimation.from_pretrained(tmp_path).eval()(**inputs)
    sizes, boxes = inputs["original_sizes"], inputs["content_boxes"]
    for a, b in zip(
        processor.post_process_semantic_segmentation(logits, sizes),
        processor.post_process_semantic_segmentation(outputs, sizes, boxes),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    results = processor.post_process_depth_estimation(depth, sizes)
    assert [sorted(r) for r in results] == [["predicted_depth"]] * 2
    for a, b in zip(results, processor.post_process_multi_task(outputs, sizes, boxes)):
        torch.testing.assert_close(a["predicted_depth"], b["depth"], rtol=0, atol=0)
        assert a["predicted_depth"].shape == b["semseg"].shape
    with pytest.raises(ValueError, match="cannot read task 'depth' from a SemanticSegmenterOutput"):
        processor.post_process_depth_estimation(logits, sizes)


# Run where the package cannot be imported: everything comes from the checkpoints. For each pipeline, the reference
# is the model loaded with AutoModel on the processor's output, post-processed with content_boxes, or cropped by hand.
REMOTE_SCRIPT = """
import sys
sys.modules["modeling_sak"] = None  # make the package unimportable: the code must come from the checkpoint
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

checkpoint, stage1, image_path = sys.argv[1:4]
image = Image.open(image_path)
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=True)
inputs = processor(image)
with torch.no_grad():
    outputs = model(**inputs)
sizes, boxes = inputs["original_sizes"], inputs["content_boxes"]
top, left, height, width = boxes[0].tolist()
assert (height, width) == image.size[::-1] and (top, left) != (0, 0), boxes  # padded on every side
crop = {task: value[0, :, top : top + height, left : left + width] for task, value in outputs.task_outputs.items()}
semseg = processor.post_process_semantic_segmentation(outputs, sizes, boxes)[0]
assert torch.equal(semseg, crop["semseg"].argmax(0))  # every pixel, by hand
expected = processor.post_process_multi_task(outputs, sizes, boxes)[0]


def class_map(segments):
    ids = torch.full(image.size[::-1], -1)
    for segment in segments:
        mask = torch.from_numpy(np.array(segment["mask"])) == 255
        assert segment["score"] is None and not (ids[mask] >= 0).any()
        ids[mask] = model.config.label2id[segment["label"]]
    return ids


def check(name, result):
    print(name, "ok")


segments = pipeline("image-segmentation", model=checkpoint, trust_remote_code=True)(image_path)
assert type(segments[0]["mask"]) is Image.Image and segments[0]["mask"].size == image.size
assert torch.equal(class_map(segments), semseg)
check("image-segmentation", segments)

depth_pipe = pipeline("depth-estimation", model=checkpoint, trust_remote_code=True)
assert type(depth_pipe.model).__name__ == "SAKForDepthEstimation"
depth = depth_pipe(image_path)
assert torch.equal(depth["predicted_depth"], expected["depth"])
assert torch.equal(depth["predicted_depth"], crop["depth"][0].clamp(min=0)) and depth["depth"].size == image.size
check("depth-estimation", depth)

features = pipeline("image-feature-extraction", model=checkpoint, trust_remote_code=True)(image_path)
torch.testing.assert_close(torch.tensor(features), outputs.last_hidden_state, rtol=0, atol=0)
check("image-feature-extraction", features)

for sak in (
    pipeline("sak-multi-task", model=checkpoint, trust_remote_code=True),
    pipeline(model=checkpoint, trust_remote_code=True),  # the checkpoint's only custom pipeline
):
    assert type(sak).__name__ == "SAKMultiTaskPipeline" and type(sak).__module__.startswith("transformers_modules")
    result = sak(image_path)
    assert sorted(result) == sorted(model.config.tasks)
    assert torch.equal(class_map(result["semseg"]), semseg)
    assert torch.equal(result["depth"]["predicted_depth"], expected["depth"])
    assert torch.equal(result["normals"]["predicted_normals"], expected["normals"])
    assert torch.equal(result["edge"]["predicted_boundaries"], expected["edge"])
    assert result["normals"]["normals"].mode == "RGB" and result["edge"]["boundaries"].size == image.size
    only_depth = sak(image_path, tasks=["depth"])
    assert sorted(only_depth) == ["depth"]
    check("sak-multi-task", result)

features = pipeline("image-feature-extraction", model=stage1, trust_remote_code=True)(image_path)
assert np.array(features).shape[-1] == 32
check("image-feature-extraction of a stage-1 student", features)
for task, message in (
    ("image-segmentation", "SAKForSemanticSegmentation needs a 'semseg' task"),
    ("sak-multi-task", "needs a SAK model with task heads"),
):
    try:
        pipeline(task, model=stage1, trust_remote_code=True)
    except ValueError as error:
        assert message in str(error), str(error)[-2000:]
    else:
        raise AssertionError(task)
print("OK")
"""


def test_every_pipeline_gives_the_post_processing_of_the_model_outputs_without_the_package(tmp_path):
    write_checkpoint(tmp_path / "checkpoint")
    write_checkpoint(tmp_path / "stage1", tasks={})
    photo().save(tmp_path / "room.png")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / name) for name in ("checkpoint", "stage1", "room.png")]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK"), result.stdout


def test_the_multi_task_pipeline_in_process_and_its_arguments(tmp_path):
    model = write_checkpoint(tmp_path)
    processor = SAKImageProcessor(pad_size=TINY_IMAGE_SIZE)
    sak = SAKMultiTaskPipeline(model=model, image_processor=processor)
    results = sak([photo(), photo(30, 40, seed=2)])
    inputs = processor(photo(30, 40, seed=2))
    with torch.no_grad():
        expected = processor.post_process_multi_task(model(**inputs), inputs["original_sizes"])[0]
    torch.testing.assert_close(results[1]["depth"]["predicted_depth"], expected["depth"], rtol=0, atol=0)
    assert results[0]["semseg"][0]["mask"].size == (70, 50)
    batched = sak([photo(), photo(30, 40, seed=2)], batch_size=2)  # one padded canvas, split back per image
    for single, together in zip(results, batched):
        for task, name in (
            ("depth", "predicted_depth"),
            ("normals", "predicted_normals"),
            ("edge", "predicted_boundaries"),
        ):
            torch.testing.assert_close(together[task][name], single[task][name], rtol=0, atol=1e-5)
    with_routers = sak(photo(), return_router_weights=True)
    with torch.no_grad():
        routers = model(**processor(photo())).router_weights
    assert set(with_routers["router_weights"]) == set(model.config.tasks)
    for task, weights in with_routers["router_weights"].items():
        assert weights.shape == (len(model.config.out_indices), 1 + len(model.config.teachers))
        torch.testing.assert_close(weights, routers[task][0], rtol=0, atol=0)
    assert "router_weights" not in results[0]
    # The processor's photo rules, not transformers' load_image (which makes everything RGB), see the image.
    depth_map = Image.fromarray(np.full((40, 60), 2500, dtype=np.uint16))
    depth_map.save(tmp_path / "sync_depth.png")
    for given in (depth_map, str(tmp_path / "sync_depth.png")):
        with pytest.raises(ValueError, match=r"I;16"):
            sak(given)
    photo().save(tmp_path / "photo.png")
    torch.testing.assert_close(
        sak(str(tmp_path / "photo.png"))["depth"]["predicted_depth"], results[0]["depth"]["predicted_depth"]
    )
    with pytest.raises(ValueError, match=r"tasks \['sal'\] are not tasks of this model"):
        sak(photo(), tasks=["sal"])
    with pytest.raises(
        ValueError,
        match=r"unknown sak-multi-task pipeline arguments \['threshold'\]; it takes tasks, timeout, return_",
    ):
        sak(photo(), threshold=0.5)
    segmenter = pipeline(
        "image-segmentation", model=SAKForSemanticSegmentation.from_pretrained(tmp_path), image_processor=processor
    )
    assert segmenter(photo())[0]["mask"].size == (70, 50)


def test_the_readme_usage_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    """The README's "Use a SAK checkpoint" snippet and docs/usage.md's by-hand one, with the Hub id replaced by a local
    checkpoint."""
    root = Path(__file__).parents[1]
    section = (root / "README.md").read_text().split("## Use a SAK checkpoint\n")[1].split("\n## ")[0]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    snippets += re.findall(r"```python\n(.*?)```", (root / "docs" / "usage.md").read_text(), flags=re.S)
    assert len(snippets) == 2 and snippets[0].lstrip().startswith("from transformers import pipeline")
    write_checkpoint(tmp_path / "checkpoint")
    photo().save(tmp_path / "room.jpg")
    monkeypatch.chdir(tmp_path)
    runs = []
    for snippet in snippets:
        runs.append({})
        exec(snippet.replace('"org/sak-vitb-nyud"', repr(str(tmp_path / "checkpoint"))), runs[-1])
    piped, by_hand = runs[0]["result"], runs[1]["result"]
    assert by_hand["semseg"].shape == (50, 70) and by_hand["normals"].shape == (3, 50, 70)
    torch.testing.assert_close(piped["depth"]["predicted_depth"], by_hand["depth"], rtol=0, atol=0)
    torch.testing.assert_close(runs[1]["depth"], by_hand["depth"], rtol=0, atol=0)  # target_sizes alone
