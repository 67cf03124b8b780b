"""Publish a SAK checkpoint folder to the Hub, but only after it has been proven to load.

    sak-publish --checkpoint DIR --repo_id ORG/NAME [--private] [--revision BRANCH]

Checks: config.json (a SAK config with auto_map), the weights (`model.safetensors`, or the
`model.safetensors.index.json` + `model-0000x-of-0000y.safetensors` shards that `save_pretrained(max_shard_size=...)`
writes: every shard the index names must exist and hold the tensors the index puts in it), every code file auto_map
names and its relative imports, preprocessor_config.json, README.md. Then the folder is loaded in a fresh Python process with
`AutoModel.from_pretrained(..., trust_remote_code=True)` (the package itself made unimportable) and runs one forward
pass. Only then `create_repo` + `upload_folder` run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path


def weight_problems(folder: Path) -> list[str]:
    """What is wrong with a folder's safetensors weights: one `model.safetensors`, or a sharded checkpoint whose
    `model.safetensors.index.json` (transformers' `SAFE_WEIGHTS_INDEX_NAME`) maps every tensor to a shard that exists
    and holds it (only the shards' headers are read)."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        if (folder / SAFE_WEIGHTS_NAME).is_file():
            return []
        return [f"missing {SAFE_WEIGHTS_NAME} (or the {SAFE_WEIGHTS_INDEX_NAME} of a sharded checkpoint)"]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return [f"{SAFE_WEIGHTS_INDEX_NAME} has no readable weight_map ({type(error).__name__}: {error})"]
    if not weight_map:
        return [f"{SAFE_WEIGHTS_INDEX_NAME} names no tensors"]
    problems = []
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.is_file():
            problems.append(f"missing shard {shard} (named by {SAFE_WEIGHTS_INDEX_NAME})")
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = set(handle.keys())
        except Exception as error:  # truncated or not a safetensors file
            problems.append(f"shard {shard} is unreadable ({type(error).__name__}: {error})")
            continue
        absent = sorted(name for name, where in weight_map.items() if where == shard and name not in stored)
        if absent:
            problems.append(f"shard {shard} lacks {len(absent)} tensors the index puts in it: {absent[:5]}")
    return problems


def check_folder(folder: str | Path) -> None:
    """Raise ValueError naming every problem of a checkpoint folder."""
    folder = Path(folder)
    problems = [] if (folder / "config.json").is_file() else ["missing config.json"]
    problems += weight_problems(folder)
    problems += [
        f"missing {name}" for name in ("preprocessor_config.json", "README.md") if not (folder / name).is_file()
    ]
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder}/config.json is not valid JSON: {error}") from error
        if config.get("model_type") != "sak":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, not 'sak'")
        modules = {entry.split(".")[0] for entry in (config.get("auto_map") or {}).values()}
        if not modules:
            problems.append("config.json has no auto_map: save with the modeling_sak package imported")
        pending = list(modules)
        while pending:
            module = pending.pop()
            path = folder / f"{module}.py"
            if not path.is_file():
                problems.append(f"missing code file {path.name} (named by auto_map or imported by another file)")
                continue
            for imported in re.findall(r"^\s*from\s+\.(\w+)\s+import", path.read_text(), flags=re.MULTILINE):
                if imported not in modules:
                    modules.add(imported)
                    pending.append(imported)
    if problems:
        raise ValueError(f"{folder} cannot be published: " + "; ".join(problems))


def check_loads(folder: str | Path, timeout: int = 600) -> str:
    """Load the folder in a fresh process through remote code and run one forward pass; returns its report."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["modeling_sak"] = None
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        size = model.config.image_size
        inputs = processor(torch.randint(0, 256, (size[0], size[1], 3), dtype=torch.uint8).numpy())
        with torch.no_grad():
            outputs = model(**inputs)
        print("forward ok:", {{k: tuple(v.shape) for k, v in outputs.task_outputs.items()}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ValueError(f"{folder} does not load with trust_remote_code:\n{result.stderr[-2000:]}")
    return result.stdout.strip()


def publish(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """Check, prove loadable, upload; returns the repo URL."""
    from huggingface_hub import HfApi

    check_folder(folder)
    check_loads(folder)
    api = HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message="Upload SAK model")
    return str(getattr(repo, "url", f"https://huggingface.co/{repo_id}"))


def main(argv: list[str] | None = None) -> None:
    """The command; a bad input ends in one `error:` line and exit status 2 (`modeling_sak.cli`)."""
    from ..cli import bad_input_exits

    with bad_input_exits("sak-publish"):
        return _main(argv)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sak-publish",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a folder written by save_pretrained (+ processor, card)")
    parser.add_argument("--repo_id", required=True, help="ORG/NAME of the model repo")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="upload to this branch (created if needed)")
    args = parser.parse_args(argv)
    print(f"published: {publish(args.checkpoint, args.repo_id, args.private, args.revision)}")


if __name__ == "__main__":
    main()
