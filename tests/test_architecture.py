"""The package's layering, enforced: what a checkpoint carries, and what those files may import."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import TINY_IMAGE_SIZE, carried_files, tiny_config

import modeling_sak
from modeling_sak import SAKForMultiTask, SAKImageProcessor


PACKAGE = Path(modeling_sak.__file__).parent
REMOTE_CODE = PACKAGE / "remote_code"
# The files `save_pretrained` copies into a checkpoint: the modules of `remote_code/`, flat, which are the model's and
# the processor's modules and every file they reach by single-level relative imports (DESIGN.md section 5), the
# "sak-multi-task" pipeline included. Nothing of teachers, data, evaluation or training.
CARRIED = carried_files()
# The carried files that hold no model code and import no torch (the task table and IGNORE_INDEX; the photo rules):
# the only files of the model the data package may import.
PLAIN_CARRIED = {"tasks_sak.py", "image_io_sak.py"}
# What a carried file may import besides the standard library and the other carried files: torch and transformers,
# numpy and PIL for the image processor.
ALLOWED_PACKAGES = {"torch", "transformers", "numpy", "PIL"}


def test_a_checkpoint_carries_exactly_the_model_files_and_loads_without_the_package(tmp_path):
    model = SAKForMultiTask(tiny_config(use_aligners=True, teachers={"dinov2": 48, "clip": 32, "sam": 32})).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    SAKImageProcessor(pad_size=TINY_IMAGE_SIZE).save_pretrained(checkpoint)
    assert CARRIED == {
        "configuration_sak.py",
        "modeling_sak.py",
        "losses.py",
        "fast_path_sak.py",
        "image_processing_sak.py",
        "tasks_sak.py",
        "image_io_sak.py",
        "pipeline_sak.py",
    }
    assert {path.name for path in checkpoint.glob("*.py")} == CARRIED
    assert not [path for path in checkpoint.rglob("*") if path.is_dir()]

    x = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).task_outputs
        deployed = model.optimize_for_inference(dtype=None)(x).task_outputs
    torch.save({"x": x, "expected": expected, "deployed": deployed}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, numpy, torch
        sys.modules["modeling_sak"] = None  # make the package unimportable: the code must come from the checkpoint
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            out = model(io["x"]).task_outputs
            deployed = model.optimize_for_inference(dtype=None)(io["x"]).task_outputs
        for task, value in io["expected"].items():
            torch.testing.assert_close(out[task], value, atol=1e-6, rtol=0)
            torch.testing.assert_close(deployed[task], io["deployed"][task], atol=1e-6, rtol=0)
        inputs = processor(numpy.zeros((50, 70, 3), dtype=numpy.uint8), return_tensors="pt")
        assert inputs["pixel_values"].shape[-2:] == {tuple(TINY_IMAGE_SIZE)!r}
        words = ("teacher", "data", "evaluation", "training", "recipe")
        loaded = sorted(name for name in sys.modules if name.startswith("transformers_modules"))
        assert not [name for name in loaded if any(word in name.rsplit(".", 1)[-1] for word in words)], loaded
        print("OK", sorted(name.rsplit(".", 1)[-1] for name in loaded))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout, result.stdout


def _imports(path: Path) -> list[tuple[int, str | None, list[str]]]:
    """Every import of a file, nested ones included, as `(level, module, names)`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((0, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, [alias.name for alias in node.names]))
    return found


def test_carried_files_import_only_torch_transformers_the_standard_library_and_each_other():
    carried_modules = {name.removesuffix(".py") for name in CARRIED}
    allowed = ALLOWED_PACKAGES | set(sys.stdlib_module_names)
    problems = []
    for name in sorted(CARRIED):
        for level, module, names in _imports(REMOTE_CODE / name):
            if level == 0 and module.split(".")[0] not in allowed:
                problems.append(f"{name}: import {module} (only {sorted(ALLOWED_PACKAGES)} and the standard library)")
            elif level == 1 and module is None:
                problems.append(f"{name}: from . import {names} (transformers carries only `from .file import x`)")
            elif level == 1 and module not in carried_modules:
                problems.append(f"{name}: from .{module} import ... (not a carried file: {sorted(carried_modules)})")
            elif level > 1:
                problems.append(f"{name}: a {level}-level relative import of {module}")
    assert not problems, "\n".join(problems)


def test_the_carried_set_is_what_transformers_copies():
    """transformers copies a module's file and, recursively, every file its relative imports name (even imports inside
    functions): from the model and the processor that closure is exactly `CARRIED`."""
    from transformers.dynamic_module_utils import get_relative_import_files

    copied = set()
    for entry in ("modeling_sak.py", "image_processing_sak.py"):
        copied |= {entry, *(Path(path).name for path in get_relative_import_files(str(REMOTE_CODE / entry)))}
    assert copied == CARRIED


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (nested imports included: a lazy import still makes a circle)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for level, module, names in _imports(path):
            base = (
                module if level == 0 else ".".join(package[: len(package) - level + 1] + ([module] if module else []))
            )
            for imported in names or [None]:
                full = f"{base}.{imported}" if imported else base
                if full in files:
                    targets.add(full)
                elif base in files:
                    targets.add(base)
        graph[name] = targets - {name}
    return graph


def test_the_package_has_no_import_circle():
    try:
        order = list(graphlib.TopologicalSorter(_import_graph()).static_order())
    except graphlib.CycleError as error:
        raise AssertionError(f"import circle: {' -> '.join(error.args[1])}") from None
    assert "modeling_sak.remote_code.tasks_sak" in order


def test_the_never_imports_of_the_layers():
    """data imports nothing of the model but the plain carried files (never the model, the image processor,
    teachers, evaluation or training); evaluation never imports training, teachers or commands, and of the model
    only its config; no library module imports a command, but for the ToyRooms renderer the specialist teachers
    call (`commands.prepare_dataset.make_toyrooms`, which writes the same folders as the command)."""
    plain = {f"modeling_sak.remote_code.{name.removesuffix('.py')}" for name in PLAIN_CARRIED}
    layers = ("modeling_sak.training", "modeling_sak.teachers", "modeling_sak.commands")
    problems = []
    for module, targets in sorted(_import_graph().items()):
        if module.startswith("modeling_sak.data"):
            allowed = {t for t in targets if t.startswith("modeling_sak.data") or t in plain}
            problems += [f"{module} imports {t}" for t in sorted(targets - allowed)]
        if module.startswith("modeling_sak.evaluation"):
            model = {t for t in targets if t.startswith("modeling_sak.remote_code")}
            bad = {t for t in targets if t.startswith(layers)} | (
                model - {"modeling_sak.remote_code.configuration_sak"}
            )
            problems += [f"{module} imports {t}" for t in sorted(bad)]
        if not module.startswith("modeling_sak.commands"):
            commands = {t for t in targets if t.startswith("modeling_sak.commands")}
            if module == "modeling_sak.teachers.specialists":
                commands -= {"modeling_sak.commands.prepare_dataset"}
            problems += [f"{module} imports the command {t}" for t in sorted(commands)]
    assert not problems, "\n".join(problems)


def test_the_evaluation_task_table_is_the_carried_one_byte_for_byte():
    """`evaluation/tasks_sak.py` exists for the stand-alone `evaluate` module (evaluate copies only the files beside
    it); it must be the carried table exactly: edit `remote_code/tasks_sak.py` and copy it over."""
    assert not (PACKAGE / "evaluation" / "tasks_sak.py").is_symlink()
    assert (PACKAGE / "evaluation" / "tasks_sak.py").read_bytes() == (REMOTE_CODE / "tasks_sak.py").read_bytes()


def test_the_layout_is_one_folder_per_concept():
    """The package's top holds only the registrations and two shared helpers; everything else lives in its concept's
    sub-package."""
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "model_card.py"], top
    folders = sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__")
    assert folders == ["commands", "data", "evaluation", "remote_code", "teachers", "training"], folders


def test_the_schema_columns_are_the_task_table():
    from modeling_sak.data.schema import TASK_COLUMNS
    from modeling_sak.remote_code.tasks_sak import TASKS

    assert sorted(TASK_COLUMNS) == sorted(TASKS)
