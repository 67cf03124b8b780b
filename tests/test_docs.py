"""The README and the docs pages name only what exists: links that resolve (files and their headings), commands on
the PATH with the flags they pass, files of the repository, and importable `modeling_sak` names."""

from __future__ import annotations

import configparser
import importlib
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest


ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Paths a page may name that a run writes (they do not exist in a fresh clone).
WRITTEN = ("outputs/", "nyud-v2-multitask", "sak-vitb-nyud", "lora_adapter/", "final/", "stage1/")
# `sak-` names that are not commands: the pipeline's, and the variants the benchmarks compare.
NOT_COMMANDS = {
    "sak-multi-task",
    "sak-plain",
    "sak-plain-loop",
    "sak-plain-fp32",
    "sak-fp32",
    "sak-deployed",
    "sak-default-allocator",
}
REPOSITORY_FOLDERS = (
    "modeling_sak/",
    "tests/",
    "bench/",
    "docs/",
    "configs/",
    "hub_cards/",
    "hub_spaces/",
    "examples/",
)


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation but '-' and '_' dropped, spaces to
    '-'."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@cache
def console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


@cache
def help_text(command: str) -> str:
    """`--help` of a console script as the PATH runs it (`pip install -e .` puts it there), or of
    train_accelerate.py."""
    if command == "train_accelerate.py":
        argv = [sys.executable, str(ROOT / "train_accelerate.py"), "--help"]
    else:
        assert shutil.which(command), f"{command} is not on the PATH: pip install -e ."
        argv = [command, "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\]\((docs/[\w.]+\.md)", readme))
    assert {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")} <= linked, "a docs page the README omits"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_resolves(page):
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif anchor and anchor not in heading_anchors(path):
            problems.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_repository_file_a_page_names_exists(page):
    text = page.read_text()
    folders = "|".join(map(re.escape, REPOSITORY_FOLDERS))
    paths = re.findall(rf"(?<![\w/.-])((?:{folders})[\w./-]*\w)(?![\w<{{*-])", text)
    named = {path for path in paths if re.search(r"\.\w+$", path) or (ROOT / path).is_dir()}
    named |= set(re.findall(r"(?<![\w/.-])([\w-]+\.(?:py|yaml|cfg|toml))\b", text)) & {
        path.name for path in ROOT.glob("*") if path.is_file()
    }
    named |= {name for name in re.findall(r"`((?:bench|examples|configs)/[\w./-]+)`", text)}
    missing = [name for name in sorted(named) if not (ROOT / name).exists() and not name.startswith(WRITTEN)]
    assert not missing, f"{page_id(page)} names files that do not exist: {missing}"


def unimportable_names(text: str) -> list[str]:
    """`modeling_sak.a.b.c` names in `text` that do not resolve: the longest importable module prefix, then
    attributes for the rest (file names such as `modeling_sak.py` and placeholders such as `NAME` are skipped)."""
    problems = []
    names = set(re.findall(r"\bmodeling_sak(?:\.\w+)+", text))
    for dotted in sorted(name for name in names if not name.endswith(".py") and not name.split(".")[-1].isupper()):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                value = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attribute in parts[cut:]:
                    value = getattr(value, attribute)
            except AttributeError:
                problems.append(dotted)
            break
        else:
            problems.append(dotted)
    return problems


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_modeling_sak_name_a_page_gives_imports(page):
    problems = unimportable_names(page.read_text())
    assert not problems, f"{page_id(page)} names what does not exist: {problems}"


def test_every_modeling_sak_name_in_the_code_configs_and_cards_imports():
    """Docstrings, comments and messages name modules too (`modeling_sak.training.sharding`): after a move they must
    follow."""
    files = [*ROOT.glob("modeling_sak/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("examples/*.py")]
    files += [ROOT / "train_accelerate.py", *ROOT.glob("configs/*.yaml"), *ROOT.glob("hub_cards/*.md")]
    files += [path for path in ROOT.glob("tests/*.py") if path.name != "test_docs.py"]
    problems = {str(path.relative_to(ROOT)): unimportable_names(path.read_text()) for path in files}
    assert not {path: names for path, names in problems.items() if names}


def commands_in(page: Path) -> list[tuple[str, list[str]]]:
    """(command, its flags) for every line of a page's bash blocks that runs a console script or train_accelerate.py,
    backslash continuations joined."""
    found = []
    for block in code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split(" # ")[0].split()
            if not words or words[0].startswith("#"):
                continue
            for index, word in enumerate(words):
                if word.startswith("sak-") or word == "train_accelerate.py":
                    found.append((word, [w.split("=")[0] for w in words[index + 1 :] if w.startswith("--")]))
                    break
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_a_page_runs_exists_with_the_flags_it_passes(page):
    scripts = set(console_scripts())
    text = page.read_text()
    named = set(re.findall(r"`(sak-[a-z-]*[a-z])(?=[` ])", text)) - NOT_COMMANDS
    commands = named | {command for command, _ in commands_in(page) if command != "train_accelerate.py"}
    assert commands <= scripts, f"{page_id(page)} names commands that setup.cfg does not define: {commands - scripts}"
    problems = []
    for command, flags in commands_in(page):
        if command not in scripts:
            continue
        text = help_text(command)
        problems += [f"{command} {flag}" for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}\b", text)]
    assert not problems, f"{page_id(page)} passes flags the commands do not take: {problems}"


def test_the_console_scripts_are_on_the_path_and_run_their_modules():
    """`pip install -e .` (CI does it) puts every command on the PATH; each one's `--help` names itself."""
    for command in console_scripts():
        assert help_text(command).startswith(f"usage: {command} "), command
