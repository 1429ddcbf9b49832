"""The device a run names: ``cpu``, ``cuda`` or ``cuda:N``, parsed and resolved in one place for
the plugin (``--attn-device``) and the command (``--device``)."""
from __future__ import annotations

from typing import Any, Optional

from pytest_attn.core.errors import AttnInputError

KINDS = ("cpu", "cuda")


def parse(text: str, option: str = "--attn-device") -> str:
    """``text`` checked for form (cpu, cuda or cuda:N) without asking torch what exists."""
    kind, colon, index = text.strip().partition(":")
    if kind not in KINDS or (colon and (kind == "cpu" or not index.isdigit())):
        raise AttnInputError(f"{option}={text}: use cpu, cuda or cuda:N")
    return text.strip()


def kind(device: Any) -> str:
    """``"cpu"`` or ``"cuda"`` of a device string or ``torch.device``."""
    return str(device).split(":")[0]


def is_cuda(device: Any) -> bool:
    return kind(device) == "cuda"


def resolve(wanted: Optional[str], option: str = "--attn-device") -> str:
    """The device to run on: ``wanted`` (checked by :func:`parse`) if torch has it, else an
    AttnInputError naming the fix; by default ``cuda:<current>`` where torch sees a GPU, else cpu."""
    from pytest_attn.env import torch_build

    wanted = parse(wanted, option) if wanted else ("cuda" if torch_build.cuda_available() else "cpu")
    if not is_cuda(wanted):
        return wanted
    if not torch_build.cuda_available():
        raise AttnInputError(f"{option}={wanted} but torch {torch_build.version()} sees no CUDA device; use "
                             f"{option}=cpu, or install a CUDA build of torch on a GPU machine")
    import torch

    count = torch.cuda.device_count()
    _, _, index = wanted.partition(":")
    if index and int(index) >= count:
        raise AttnInputError(f"{option}={wanted} but torch sees {count} GPU(s): use cuda:0 to cuda:{count - 1}")
    return wanted if index else f"cuda:{torch.cuda.current_device()}"
