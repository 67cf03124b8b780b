"""Convert a checkpoint of the reference SAK implementation into a `from_pretrained`-loadable folder.

    # the authors' released checkpoints on the Hub (downloaded and cached by huggingface_hub):
    sak-convert --repo_id yxlu0/SAK --filename PATH/checkpoint.pth \
        --output_dir sak-vitb-nyud [--revision REV] [--image_size 448 576] [--push_to_hub ORG/NAME]
    sak-convert --repo_id yxlu0/SAK --output_dir x  # lists the checkpoints
    # or local files:
    sak-convert --original_config config.yml --checkpoint checkpoint.pth \
        --output_dir sak-vitb-nyud

The reference saves `{"model": state_dict, "optimizer", ...}` with timm ViT names (`backbone.vit.blocks.0.attn.qkv`)
and a `config.yml` beside it (`results_dir/EXP/checkpoint.pth` and `results_dir/EXP/config.yml`); from a Hub repo
the `config.yml` in the folder of `--filename` is downloaded with it unless `--config_filename` names another.
Stage-2 (multi-task) checkpoints carry the `backbone.` prefix and task heads; stage-1 (distillation) checkpoints carry
the backbone alone and convert into a SAK without tasks. Every key must map and every weight of the converted model
must be filled, otherwise the conversion stops and names the keys.
"""

from __future__ import annotations

import argparse
import posixpath
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, constants, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import CacheNotFound, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from transformers.utils import logging

from ..cli import bad_input_exits
from ..remote_code.configuration_sak import TASK_PRESETS, SAKConfig
from ..remote_code.image_processing_sak import SAKImageProcessor
from ..remote_code.modeling_sak import SAKForMultiTask


logger = logging.get_logger(__name__)

# Reference `vit_name` -> the timm ViT it builds (AugReg ImageNet-21k -> 1k, 384 px, LayerNorm eps 1e-6).
REFERENCE_STEMS = {
    "vit_small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "vit_base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "vit_large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}
# Reference teacher `backbone_type` -> (width, closest transformers checkpoint for training with this package).
REFERENCE_TEACHERS = {
    "dinov2_small": (384, "facebook/dinov2-small"),
    "dinov2_base": (768, "facebook/dinov2-base"),
    "dinov2_large": (1024, "facebook/dinov2-large"),
    "timmclip_base": (768, "openai/clip-vit-base-patch16"),
    "timmclip_large": (1024, "openai/clip-vit-large-patch14"),
    "sam_base": (768, "facebook/sam-vit-base"),
    "sam_large": (1024, "facebook/sam-vit-large"),
}
REFERENCE_DATASETS = {"nyud": ("nyud_v2", (448, 576)), "pascalcontext": ("pascal_context", (512, 512))}
REFERENCE_IMAGE_SIZES = {"imagenet": (384, 384)}


def load_reference_config(path: str | Path) -> dict[str, Any]:
    """Read the reference `config.yml`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"original config {path} does not exist; pass the config.yml saved beside checkpoint.pth"
        )
    with path.open() as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict) or "student" not in config:
        raise ValueError(f"{path} is not a reference SAK config: it has no 'student' section")
    return config


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the student weights of a reference checkpoint with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unsafe or corrupt pickles
        raise ValueError(f"cannot load {path} with weights_only=True: {error}") from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds no state dict under 'model'")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


# Files the reference's training scripts save a student in (torch.save), for listing a repo's checkpoints.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def repo_files(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[list[str], str]:
    """The files of the Hub model repo `repo_id` at `revision` (default main), and where the list comes from: the Hub,
    or, offline (HF_HUB_OFFLINE=1) or without a network, the local huggingface_hub cache.

    Raises huggingface_hub's `RepositoryNotFoundError` / `RevisionNotFoundError` when the Hub says so."""
    try:
        return sorted(HfApi().list_repo_files(repo_id, revision=revision)), "the Hub"
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as error:  # offline mode or no network: the cache is all there is (the reason is reported)
        reason = f"{type(error).__name__}: {error}".split("\n")[0]
    files: set[str] = set()
    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        cache = None
    for repo in cache.repos if cache else ():
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        for cached in repo.revisions:
            if (revision or "main") in cached.refs or cached.commit_hash == revision:
                files |= {path.file_path.relative_to(cached.snapshot_path).as_posix() for path in cached.files}
    return sorted(files), f"the local cache, since the Hub could not be listed ({reason})"


def describe_reference_checkpoints(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> str:
    """Which reference checkpoints `repo_id` holds (each with its config.yml or not), for the user to pick one."""
    files, source = repo_files(repo_id, revision, cache_dir)
    at = f"{repo_id}@{revision}" if revision else repo_id
    checkpoints = [name for name in files if name.endswith(CHECKPOINT_SUFFIXES)]
    if not checkpoints:
        held = f"only {files[:20]}" if files else "nothing"
        hint = ""
        if "cache" in source:
            hint = (
                f" (listing the repo needs the network{': unset HF_HUB_OFFLINE' if constants.HF_HUB_OFFLINE else ''})"
            )
        return f"{at} holds no checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)}) according to {source}: {held}{hint}"
    lines = []
    for name in checkpoints:
        config = posixpath.join(posixpath.dirname(name), "config.yml")
        lines.append(f"  {name}" + (f"  (with {config})" if config in files else "  (no config.yml beside it)"))
    return (
        f"{at} holds these checkpoints according to {source}:\n"
        + "\n".join(lines)
        + "\npass one with --filename PATH (its config.yml is downloaded with it; --config_filename names another)"
    )


def download_reference_run(
    repo_id: str,
    filename: str,
    config_filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Path, Path]:
    """Download (or take from the huggingface_hub cache) a reference checkpoint and its config.yml from the Hub.

    `filename` is the checkpoint's path in the repo (e.g. `EXP/checkpoint.pth`); `config_filename` defaults to
    `config.yml` in the same folder. `hf_hub_download` honours `revision`, `cache_dir`, HF_HUB_CACHE and
    HF_HUB_OFFLINE. Returns the local (config, checkpoint) paths. Raises `FileNotFoundError` naming what the repo
    (or, offline, the cache) holds when either file is not there."""
    config_filename = config_filename or posixpath.join(posixpath.dirname(filename), "config.yml")
    paths = []
    for name in (config_filename, filename):
        try:
            paths.append(Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir)))
        except EntryNotFoundError as error:
            raise FileNotFoundError(
                f"{name!r} is not in {repo_id}{f'@{revision}' if revision else ''} ({type(error).__name__}). "
                + describe_reference_checkpoints(repo_id, revision, cache_dir)
            ) from error
    config_path, checkpoint_path = paths
    return config_path, checkpoint_path


def sak_config_from_reference(
    original: dict[str, Any], state_dict: dict[str, torch.Tensor], image_size: tuple[int, int] | None = None
) -> SAKConfig:
    """Build the `SAKConfig` a reference config + state dict describe (teacher widths from aligners when present)."""
    backbone = original["student"].get("backbone", original["student"])
    vit_name = backbone.get("vit_name")
    if vit_name not in REFERENCE_STEMS:
        raise ValueError(f"student.backbone.vit_name={vit_name!r} is not one of {sorted(REFERENCE_STEMS)}")
    stem = {"model_type": "vit", "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "patch_size": 16}
    stem.update(REFERENCE_STEMS[vit_name])
    stem["image_size"] = 384
    prefix = "backbone." if any(k.startswith("backbone.") for k in state_dict) else ""

    dataset = original.get("dataset")
    task_dict = original.get("task_dict") or {}
    if task_dict:
        if dataset not in REFERENCE_DATASETS:
            raise ValueError(f"dataset={dataset!r} is not one of {sorted(REFERENCE_DATASETS)}")
        preset = TASK_PRESETS[REFERENCE_DATASETS[dataset][0]]
        unknown = sorted(set(task_dict) - set(preset["tasks"]))
        if unknown:
            raise ValueError(f"task_dict names tasks {unknown} that {dataset} does not have")
        tasks = {task: preset["tasks"][task] for task in task_dict}
        weights = {task: preset["task_loss_weights"][task] for task in task_dict}
        id2label = dict(enumerate(preset["classes"])) if "semseg" in tasks else None
    else:
        tasks, weights, id2label = {}, {}, None
    if image_size is None:
        default = REFERENCE_DATASETS.get(dataset, (None, REFERENCE_IMAGE_SIZES.get(dataset)))[1]
        if default is None:
            raise ValueError(f"no default input size for dataset={dataset!r}; pass --image_size H W")
        image_size = default
    positions = state_dict.get(f"{prefix}vit.pos_embed")
    if positions is not None and positions.shape[1] - 1 != (image_size[0] // 16) * (image_size[1] // 16):
        raise ValueError(
            f"vit.pos_embed has {positions.shape[1] - 1} patch positions, which does not fit image_size {image_size}; "
            "pass the training size with --image_size H W"
        )

    use_aligners = bool(backbone.get("aligner", False))
    teachers = {}
    for name, spec in (original.get("teachers") or {}).items():
        backbone_type = (spec or {}).get("backbone_type")
        width, model_id = REFERENCE_TEACHERS.get(backbone_type, (None, None))
        aligner_key = next(
            (
                k
                for k in state_dict
                if re.fullmatch(rf"{re.escape(prefix)}ts_aligners\.\d+_{re.escape(name)}\.weight", k)
            ),
            None,
        )
        if aligner_key is not None:
            width, use_aligners = state_dict[aligner_key].shape[0], True
        elif width is None:
            width = stem["hidden_size"]
        teachers[name] = {"hidden_size": width, "model_id": model_id, "reference_backbone_type": backbone_type}
        if width != stem["hidden_size"]:
            use_aligners = True
    return SAKConfig(
        stem_config=stem,
        image_size=list(image_size),
        teachers=teachers,
        down_ratio=int(backbone.get("down_ratio", 4)),
        use_aligners=use_aligners,
        router_type=backbone.get("router_type", "mor"),
        noisy_gating=bool(backbone.get("noisy_gating", True)),
        tasks=tasks,
        task_loss_weights=weights,
        id2label=id2label,
        distill_loss_type=original.get("loss_type", "cos+l1"),
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: SAKConfig) -> dict[str, torch.Tensor]:
    """Rename every reference key to its `SAKForMultiTask` name; raise on any key that has no counterpart."""
    level_of = {block: level for level, block in enumerate(config.out_indices)}
    teachers, tasks = (
        "|".join(map(re.escape, config.teachers)) or "(?!)",
        "|".join(map(re.escape, config.tasks)) or "(?!)",
    )

    def level(match: re.Match, group: int = 1) -> str:
        block = int(match.group(group))
        if block not in level_of:
            raise ValueError(f"{match.string}: block {block} is not an output level {config.out_indices}")
        return str(level_of[block])

    rules = [
        (r"vit\.cls_token", lambda m: "stem.embeddings.cls_token"),
        (r"vit\.pos_embed", lambda m: "stem.embeddings.position_embeddings"),
        (r"vit\.patch_embed\.proj\.(weight|bias)", lambda m: f"stem.embeddings.patch_embeddings.projection.{m[1]}"),
        (r"vit\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", lambda m: f"stem.layers.{m[1]}.{m[2]}.{m[3]}"),
        (
            r"vit\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)",
            lambda m: f"stem.layers.{m[1]}.attention.{m[2]}.{m[3]}",
        ),
        (r"vit\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", lambda m: f"stem.layers.{m[1]}.mlp.{m[2]}.{m[3]}"),
        (
            rf"tsap\.({teachers})\.(\d+)\.(down|up)\.(weight|bias)",
            lambda m: f"teacher_paths.{m[1]}.adapters.{m[2]}.{m[3]}.{m[4]}",
        ),
        (rf"tsap\.({teachers})\.(\d+)\.scale", lambda m: f"teacher_paths.{m[1]}.adapters.{m[2]}.scale"),
        (
            rf"out_norms\.(\d+)_({teachers})\.(weight|bias)",
            lambda m: f"teacher_paths.{m[2]}.output_norms.{level(m)}.{m[3]}",
        ),
        (rf"ts_aligners\.(\d+)_({teachers})\.(weight|bias)", lambda m: f"aligners.{m[2]}.{level(m)}.{m[3]}"),
        (
            rf"mor\.(\d+)_({tasks})\.router\.module\.([013])\.(weight|bias)",
            lambda m: f"routers.{m[2]}.{level(m)}.gate.{m[3]}.{m[4]}",
        ),
        (
            rf"heads\.({tasks})\.linears\.(\d+)\.(weight|bias)",
            lambda m: f"heads.{m[1]}.level_projections.{m[2]}.{m[3]}",
        ),
        (rf"heads\.({tasks})\.linear_fuse\.0\.(weight|bias)", lambda m: f"heads.{m[1]}.fuse_conv.{m[2]}"),
        (
            rf"heads\.({tasks})\.linear_fuse\.1\.(weight|bias|running_mean|running_var|num_batches_tracked)",
            lambda m: f"heads.{m[1]}.fuse_norm.{m[2]}",
        ),
        (rf"heads\.({tasks})\.last_conv\.(weight|bias)", lambda m: f"heads.{m[1]}.classifier.{m[2]}"),
    ]
    converted, unmapped = {}, []
    for key, value in state_dict.items():
        name = key.removeprefix("backbone.")
        for pattern, target in rules:
            match = re.fullmatch(pattern, name)
            if match:
                new_key = target(match)
                converted[new_key] = value.reshape(1) if new_key.endswith(".scale") else value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} reference keys have no SAK counterpart: {unmapped[:8]}"
            + (
                " (LoRA weights: merge them into the ViT before converting)"
                if any("lora" in k for k in unmapped)
                else ""
            )
        )
    return converted


def convert(
    original_config: str | Path,
    checkpoint: str | Path,
    output_dir: str | Path,
    image_size: tuple[int, int] | None = None,
    keep_aligners: bool = False,
) -> SAKForMultiTask:
    """Convert, save model + image processor to `output_dir`, reload and check every tensor; return the model."""
    original = load_reference_config(original_config)
    state_dict = load_reference_state_dict(checkpoint)
    config = sak_config_from_reference(original, state_dict, image_size)
    converted = convert_state_dict(state_dict, config)
    model = SAKForMultiTask(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(converted))
    if model.aligners is not None and not any(k.startswith("aligners.") for k in converted):
        missing = [k for k in missing if not k.startswith("aligners.")]  # inference checkpoints drop them
        logger.info("the checkpoint has no aligners (training-only); the converted model keeps fresh ones unsaved")
    if missing:
        raise ValueError(f"{len(missing)} SAK weights are missing from the checkpoint: {missing[:8]}")
    for key, value in converted.items():
        target = model.state_dict()[key]
        if target.shape != value.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != SAK shape {tuple(target.shape)}")
    model.load_state_dict(converted, strict=False)
    model.eval()

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, include_aligners=keep_aligners)
    patch = config.patch_size[0]
    SAKImageProcessor(
        pad_size={"height": config.image_size[0], "width": config.image_size[1]}, size_divisor=patch
    ).save_pretrained(output_dir)

    reloaded = SAKForMultiTask.from_pretrained(output_dir)
    saved_state = reloaded.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("aligners.") and not keep_aligners:
            continue
        if not torch.equal(saved_state[key], value):
            raise RuntimeError(f"{key} differs after saving and reloading {output_dir}")
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sak-convert",
        description="Convert a reference SAK checkpoint (checkpoint.pth + config.yml, local or in a Hub repo such as "
        "the authors' yxlu0/SAK) into a from_pretrained folder.",
    )
    hub = parser.add_argument_group("from the Hub (downloaded and cached by huggingface_hub)")
    hub.add_argument("--repo_id", help="Hub model repo of reference checkpoints, e.g. the authors' yxlu0/SAK")
    hub.add_argument(
        "--filename", help="the checkpoint's path in the repo (EXP/checkpoint.pth); without it the repo is listed"
    )
    hub.add_argument("--config_filename", help="the config's path in the repo (default: config.yml beside --filename)")
    hub.add_argument("--revision", help="branch, tag or commit of the repo (default: main)")
    hub.add_argument("--cache_dir", help="huggingface_hub cache folder (default: HF_HUB_CACHE)")
    local = parser.add_argument_group("from local files")
    local.add_argument("--original_config", help="the reference config.yml saved with the run")
    local.add_argument("--checkpoint", help="the reference checkpoint.pth (loaded with weights_only)")
    parser.add_argument("--output_dir", required=True, help="folder to write config, safetensors, code and processor")
    parser.add_argument(
        "--image_size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="training resolution of the checkpoint (default: 448 576 for nyud, 512 512 for pascalcontext, "
        "384 384 for imagenet stage 1)",
    )
    parser.add_argument(
        "--keep_aligners", action="store_true", help="also save the training-only aligners (to continue distillation)"
    )
    parser.add_argument("--push_to_hub", metavar="REPO", help="upload the converted folder to this Hub repo id")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo as private")
    args = parser.parse_args(argv)
    if args.repo_id and (args.checkpoint or args.original_config):
        parser.error("pass either --repo_id [--filename] or --checkpoint and --original_config, not both")
    if not args.repo_id and not (args.checkpoint and args.original_config):
        parser.error("pass --repo_id (e.g. yxlu0/SAK) [--filename PATH], or --checkpoint and --original_config")
    if not args.repo_id and (args.filename or args.config_filename or args.revision or args.cache_dir):
        parser.error("--filename, --config_filename, --revision and --cache_dir need --repo_id")
    return args


def write_provenance_card(output_dir: str | Path, config: SAKConfig, source: str, repo_id: str | None) -> bool:
    """Write `output_dir/README.md` naming where the weights came from (`base_model`: the authors' Hub repo when they
    were downloaded from one; a local file is named in the text only), unless a card is already there. Results are
    added by `evaluate_model --write_card`, which keeps this `base_model`. Returns whether a card was written."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..model_card import pipeline_tag_for

    path = Path(output_dir) / "README.md"
    if path.exists():
        return False
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag_for(config.tasks),
        base_model=repo_id,
        tags=["sak", "converted"],
    )
    text = (
        f"# {Path(output_dir).name}\n\nA SAK model converted with `sak-convert` from "
        f"the authors' checkpoint `{source}`; outputs match the reference implementation. Not evaluated yet: run "
        "`sak-evaluate --model THIS_FOLDER --dataset ... --write_card ORG/NAME`.\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").save(path)
    return True


def main(argv: list[str] | None = None) -> None:
    """The command; a bad input ends in one `error:` line and exit status 2 (`modeling_sak.cli`)."""
    with bad_input_exits("sak-convert"):
        return _main(argv)


def _main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.set_verbosity_info()
    original_config, checkpoint = args.original_config, args.checkpoint
    if args.repo_id and not args.filename:
        raise SystemExit(describe_reference_checkpoints(args.repo_id, args.revision, args.cache_dir))
    if args.repo_id:
        original_config, checkpoint = download_reference_run(
            args.repo_id, args.filename, args.config_filename, args.revision, args.cache_dir
        )
        print(f"reference run {args.repo_id}/{args.filename}: {checkpoint}")
    model = convert(
        original_config,
        checkpoint,
        args.output_dir,
        tuple(args.image_size) if args.image_size else None,
        args.keep_aligners,
    )
    parameters = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aligners."))
    print(f"converted {parameters / 1e6:.2f}M parameters to {args.output_dir}")
    source = f"{args.repo_id}/{args.filename}" if args.repo_id else str(checkpoint)
    if write_provenance_card(args.output_dir, model.config, source, args.repo_id):
        print(f"wrote {Path(args.output_dir) / 'README.md'} (sak-evaluate --write_card adds the results)")
    if args.push_to_hub:
        api = HfApi()
        api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
        commit = api.upload_folder(folder_path=args.output_dir, repo_id=args.push_to_hub, commit_message="Convert SAK")
        print(f"uploaded to {getattr(commit, 'repo_url', args.push_to_hub)}")


if __name__ == "__main__":
    main()
