"""What the installed torch is and whether it can reach a GPU, without importing it where the answer
is already on disk.

Importing torch costs about a second of CPU per process, plus its teardown at exit, and every
pytest process with this plugin used to pay that in pytest_configure: an xdist controller that runs
no test, the workers of a run whose tests need no tensor, the parent of --attn-isolate children.
A CPU-only build says so in ``torch/version.py`` (``cuda = None`` and ``hip = None``), which is
read here as text. For any other build, or once torch is imported anyway, torch itself answers.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class TorchBuild:
    version: str
    cuda: Optional[str]  # CUDA version it was built with; None for CPU (and ROCm) builds
    hip: Optional[str]  # ROCm version; torch.cuda drives ROCm GPUs too

    @property
    def has_gpu_runtime(self) -> bool:
        return self.cuda is not None or self.hip is not None


def _read_version_file(path: Path) -> Optional[TorchBuild]:
    """torch/version.py's plain assignments (version, cuda, hip), or None if they are not there."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign):  # cuda: Optional[str] = None
            target = node.target
        else:
            continue
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
            values[target.id] = node.value.value
    if not isinstance(values.get("__version__"), str) or "cuda" not in values or "hip" not in values:
        return None
    return TorchBuild(values["__version__"], values["cuda"], values["hip"])


def installed_build() -> Optional[TorchBuild]:
    """The installed torch's version and GPU runtime; None when torch is not installed (or its
    version file cannot be read, in which case callers import torch and let it tell)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "version"):
        return TorchBuild(torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None))
    for location in package_dirs():
        build = _read_version_file(location / "version.py")
        if build is not None:
            return build
    return None


def package_dirs() -> list[Path]:
    """The folders of the installed torch package, found without importing it; [] if none."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def is_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def version() -> str:
    build = installed_build()
    if build is not None:
        return build.version
    import torch

    return torch.__version__


def cuda_available() -> bool:
    """torch.cuda.is_available(), answered False without importing torch for a CPU-only build."""
    if "torch" not in sys.modules:
        build = installed_build()
        if build is not None and not build.has_gpu_runtime:
            return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
