"""export_onnx: a trained run's checkpoint and a converted reference checkpoint export to ONNX graphs that ONNX
Runtime runs like PyTorch (fp32, relative 1e-4) at two sizes, one not a patch multiple; the docs' torch-free
snippet runs in a fresh process without torch; bad inputs are refused and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exits_with_error
from test_convert_original_sak import convert_args, write_reference_run
from test_train_accelerate import run, tiny_args
from transformers import AutoImageProcessor

from modeling_sak import SAKForMultiTask
from modeling_sak.commands.convert_original_sak import main as convert
from modeling_sak.commands.export_onnx import main


pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(assets):
    """final/ of a real train_accelerate.py run (stage 2, ToyRooms at 32 x 48, patch 8) and its ONNX export."""
    output = assets["root"] / "onnx-run"
    run(tiny_args(assets, output, "--max_steps", "2", "--eval_split", ""))
    exported = output / "onnx"
    main([str(output / "final"), "--output", str(exported)])
    return output / "final", exported


def check_report(exported: Path, patch: int) -> dict:
    report = json.loads((exported / "onnx_export.json").read_text())
    assert (exported / "model.onnx").is_file()
    assert len(report["checks"]) == 2
    batch_sizes = [check["batch_size"] for check in report["checks"]]
    assert batch_sizes == [2, 1]
    odd = report["checks"][1]
    assert odd["height"] % patch and odd["width"] % patch  # not a multiple of the patch size
    for check in report["checks"]:
        assert set(check["errors"]) == set(report["outputs"])
        assert max(check["errors"].values()) <= 1e-4, check
    return report


def test_a_trained_run_exports_and_matches_pytorch(trained_run):
    final, exported = trained_run
    report = check_report(exported, patch=8)
    assert report["outputs"][:4] == ["semseg", "normals", "edge", "depth"]
    assert report["outputs"][-1] == "last_hidden_state"
    assert report["id2label"] == {str(k): v for k, v in SAKForMultiTask.from_pretrained(final).config.id2label.items()}
    processor = AutoImageProcessor.from_pretrained(exported, trust_remote_code=True)
    assert processor.to_dict() == AutoImageProcessor.from_pretrained(final, trust_remote_code=True).to_dict()


def test_a_converted_reference_checkpoint_exports_and_matches_pytorch(tmp_path, tiny_vit_stems):
    write_reference_run(tmp_path, "base", aligner=True, stage=2)
    convert(convert_args(tmp_path))
    main([str(tmp_path / "converted"), "--output", str(tmp_path / "onnx"), "--check_sizes", "64x96", "70x101"])
    report = check_report(tmp_path / "onnx", patch=16)
    assert [(c["height"], c["width"]) for c in report["checks"]] == [(64, 96), (70, 101)]
    assert report["teachers"] == ["dinov2", "clip", "sam"]


def docs_onnx_snippet() -> str:
    page = (ROOT / "docs" / "export_and_demo.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    (snippet,) = [block for block in blocks if "onnxruntime.InferenceSession" in block]
    return snippet


def test_the_docs_snippet_runs_the_export_without_torch(trained_run, tmp_path):
    final, exported = trained_run
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((61, 45))  # a real photo, not a patch multiple
    photo.save(tmp_path / "room.jpg", quality=95)
    snippet = docs_onnx_snippet().replace("outputs/sak-toyrooms/onnx", str(exported))
    # Torch cannot be imported in this process: the snippet needs onnxruntime, numpy and PIL only.
    script = (
        "import sys\nsys.modules['torch'] = None\n"
        + snippet
        + "\nnp.savez(sys.argv[1], pixel_values=pixel_values, semseg=semseg, depth=depth, normals=normals, edge=edge,"
        " routers=outputs['router_weights_depth'][0])\nassert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out.npz")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    got = np.load(tmp_path / "out.npz")
    model = SAKForMultiTask.from_pretrained(final).eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(got["pixel_values"]))
    task = outputs.task_outputs
    assert got["semseg"].shape == (45, 61)
    np.testing.assert_array_equal(got["semseg"], task["semseg"][0].argmax(0).numpy())
    np.testing.assert_allclose(got["depth"], task["depth"][0, 0].clamp(min=0).numpy(), rtol=1e-4, atol=1e-5)
    normals = torch.nn.functional.normalize(task["normals"][0], dim=0).numpy()
    np.testing.assert_allclose(got["normals"], normals, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["edge"], task["edge"][0, 0].sigmoid().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["routers"], outputs.router_weights["depth"][0].numpy(), rtol=1e-4, atol=1e-6)


def test_an_existing_export_is_not_replaced_without_overwrite(trained_run, capsys):
    final, exported = trained_run
    before = (exported / "model.onnx").stat().st_mtime_ns
    with exits_with_error(capsys, r"already holds model.onnx; pass --overwrite"):
        main([str(final), "--output", str(exported)])
    assert (exported / "model.onnx").stat().st_mtime_ns == before


def test_bad_inputs_are_named_before_any_export(tmp_path, capsys):
    with exits_with_error(capsys, r"CHECKPOINT .*missing: no such folder"):
        main([str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    with exits_with_error(capsys, r"--tolerance -1.0: must be positive"):
        main([str(tmp_path), "--output", str(tmp_path / "out"), "--tolerance", "-1"])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--output", str(tmp_path / "out"), "--check_sizes", "64by96"])
    assert "give HEIGHTxWIDTH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_export_above_the_tolerance_is_refused_and_leaves_nothing(trained_run, tmp_path, capsys):
    final, _ = trained_run
    with exits_with_error(capsys, r"differs from PyTorch's by .* above the tolerance 1e-15; nothing was written"):
        main([str(final), "--output", str(tmp_path / "refused"), "--tolerance", "1e-15"])
    assert not (tmp_path / "refused").exists()


def test_check_sizes_outside_the_graph_bounds_are_named(trained_run, tmp_path, capsys):
    final, _ = trained_run
    for size in ("8x64", "5000x64"):
        with exits_with_error(capsys, rf"check size {size}: the export takes images of 9x9 to 4096x4096 pixels"):
            main([str(final), "--output", str(tmp_path / "out"), "--check_sizes", size])
    assert not (tmp_path / "out").exists()
