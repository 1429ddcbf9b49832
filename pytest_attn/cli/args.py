"""What the ``pytest-attn`` subcommands share: exit statuses, the usage error, argument types
(counts, lengths, names, devices, plot paths) and resolving backend names. The subcommands and
``main`` import this module; it imports none of them."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pytest_attn.core.errors import AttnInputError

USAGE = 4  # a bad argument: the exit status pytest gives a bad option, with one line saying what to do
FAILED = 1  # the command ran and found a failure: a backend broke, disagrees, or was named and did not run
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


class UsageError(Exception):
    """A bad argument found after parsing (an unknown case, no CUDA device, ...): main prints it as
    one line, ``pytest-attn COMMAND: what was wrong; what to do``, and exits 4."""


def one_line(text: str) -> str:
    """``text`` with its line breaks written out (\\n), so that an error about a value holding
    one is still one line."""
    return "".join(repr(c)[1:-1] if len(f"a{c}b".splitlines()) > 1 else c for c in text)


def count_at_least(minimum: int, what: str):
    """An argparse type: an int >= minimum, else one line saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: give {what}")
        return value

    return parse


def seq_lengths(text: str) -> list[int]:
    parse = count_at_least(1, "sequence lengths >= 1, comma-separated (e.g. 128,1024)")
    values = [parse(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("is empty; give sequence lengths, comma-separated (e.g. 128,1024)")
    return values


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("is empty (an unset variable?); name backends, e.g. torch,flex, or all")
    return names


def device_name(text: str) -> str:
    """An argparse type: cpu, cuda or cuda:N (whether that device exists is asked of torch later)."""
    from pytest_attn.env import devices

    try:
        return devices.parse(text, "--device")
    except AttnInputError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda or cuda:N") from exc


def plot_path(text: str) -> str:
    """An argparse type: a .png, .svg or .pdf file that can be written, checked before any timing."""
    from pathlib import Path

    if Path(text).suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: the suffix picks the format; end it in "
                                         f"{', '.join(PLOT_SUFFIXES)}")
    return writable_file(text, "plot.png")


def json_path(text: str) -> str:
    """An argparse type: a file that can be written, checked before any timing."""
    return writable_file(text, "result.json")


def writable_file(text: str, example: str) -> str:
    """``text`` when a file can be written there (the missing folders made by the writer), else
    an ArgumentTypeError saying why. The nearest existing folder is tried with a temporary file
    (permissions alone pass root, and /proc)."""
    import tempfile
    from pathlib import Path

    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError(f"is empty (an unset variable?); give a file name, e.g. {example}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name in it, e.g. {path / example}")
    folder = path.parent.absolute()
    while not folder.exists():  # the writer makes the missing folders: the nearest existing one must be writable
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pytest-attn-"):
            pass
    except OSError:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write under {folder}; give a path in a folder you can "
                                         "write to") from None
    return text


def failed_status(command: str, problems: Sequence[str]) -> int:
    """Each problem as one line on stderr; FAILED when there is any, else 0."""
    for problem in problems:
        print(f"pytest-attn {command}: FAILED: {one_line(problem)}", file=sys.stderr)
    return FAILED if problems else 0


def chosen_device(option: Optional[str]) -> str:
    """The device to run on (``--device``), or a UsageError naming the fix."""
    from pytest_attn.env import devices

    try:
        return devices.resolve(option, "--device")
    except AttnInputError as exc:
        raise UsageError(str(exc)) from None


def resolve_backends(names: Sequence[str], registry) -> list:
    """Backends by name (comma lists, 'all'), or a UsageError naming the registered ones."""
    from pytest_attn.core.errors import UnknownBackendError

    try:
        return registry.resolve(list(names))
    except UnknownBackendError as exc:
        raise UsageError(str(exc)) from None


def check_device_options(args, device: str) -> None:
    if device == "cpu" and args.graph == "on":
        raise UsageError("--graph on times CUDA-graph replays and a CPU has none; leave it out, or use --device cuda")
    if device == "cpu" and args.cold_l2:
        raise UsageError("--cold-l2 flushes a GPU's L2 cache, which a CPU run cannot; leave it out, or use "
                         "--device cuda")
