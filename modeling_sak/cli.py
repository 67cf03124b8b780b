"""How the package's commands end on a bad input: one `PROG: error: MESSAGE` line on stderr and exit status 2, as
argparse does for a bad flag, instead of a traceback. Library functions raise ValueError, FileNotFoundError (any
OSError) or ImportError (a missing extra) with the message; the command's `main` runs inside `bad_input_exits`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn


def _bad_input_types() -> tuple[type[BaseException], ...]:
    kinds: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
    try:  # a truncated or foreign model.safetensors
        from safetensors import SafetensorError

        kinds += (SafetensorError,)
    except ImportError:
        pass
    return kinds


BAD_INPUT = _bad_input_types()


def exit_with_error(prog: str, message: object) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextmanager
def bad_input_exits(prog: str) -> Iterator[None]:
    """Turn a `BAD_INPUT` exception raised inside into `exit_with_error(prog, it)`; anything else (a bug, a
    non-finite loss, Ctrl-C) keeps its traceback."""
    try:
        yield
    except BAD_INPUT as error:
        kind = type(error).__name__
        exit_with_error(prog, f"a damaged safetensors file ({error})" if kind == "SafetensorError" else error)


def looks_like_path(name: str) -> bool:
    """True when `name` is meant as a local path rather than a Hub id (`NAME` or `ORG/NAME`): it exists, starts with
    '.', '/' or '~', or has more than one '/' or a backslash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).expanduser().exists()


def check_model_argument(name: str, flag: str = "--model") -> None:
    """A `--model` value that names a local path must be a folder holding a `config.json`; a Hub id is left to
    `from_pretrained` (offline: the cache). Raises FileNotFoundError naming the value."""
    path = Path(name).expanduser()
    if not looks_like_path(name):
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {name}: no such folder; give a SAK checkpoint folder or a Hub id (ORG/NAME)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{flag} {name}: the folder has no config.json, so it is not a from_pretrained folder (e.g. the final/ "
            "folder of a training run, or what save_pretrained wrote)"
        )


def progress_bar(**kwargs: Any):
    """`tqdm.auto.tqdm(**kwargs)` that keeps a redirected log readable: on a terminal it redraws as usual; when
    stderr is a file or a pipe it writes one line at most every 30 s (tqdm's `mininterval`) instead of a carriage
    return per update. `TQDM_DISABLE=1` switches it off, as every tqdm bar."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(**kwargs)


def advance(progress, **postfix: str) -> None:
    """One step of a `progress_bar` with its postfix (e.g. `loss="0.123"`): the postfix is stored without a redraw
    (tqdm's `set_postfix` redraws by default, which would defeat `mininterval`) and shown by the update's own
    redraw."""
    progress.set_postfix(postfix, refresh=False)
    progress.update()
