"""torch_build: what the installed torch is, read off torch/version.py so that a process that only
reports (an xdist controller, a CPU run's header) never imports torch."""
import subprocess
import sys

import pytest

from pytest_attn.env import torch_build
from pytest_attn.env.torch_build import TorchBuild

CPU_BUILD = """from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '2.13.0+cpu'
debug = False
cuda: Optional[str] = None
git_version = 'cf30153c4c131c8164ee7798e5022d810682e2cb'
hip: Optional[str] = None
"""


@pytest.mark.parametrize("text, expected", [
    (CPU_BUILD, TorchBuild("2.13.0+cpu", None, None)),
    (CPU_BUILD.replace("cuda: Optional[str] = None", "cuda: Optional[str] = '13.0'"), TorchBuild("2.13.0+cpu", "13.0", None)),
    ("__version__ = '2.4.0+rocm6.1'\ncuda = None\nhip = '6.1.40091'\n", TorchBuild("2.4.0+rocm6.1", None, "6.1.40091")),
    ("__version__ = '2.4.0'\ncuda = None\n", None),  # no hip: not a file we know, let torch answer
    ("__version__ = get_version()\ncuda = None\nhip = None\n", None),
    ("this is not python(", None),
])
def test_version_file_is_read_without_importing_it(tmp_path, text, expected):
    (tmp_path / "version.py").write_text(text)
    assert torch_build._read_version_file(tmp_path / "version.py") == expected


def test_only_cuda_and_rocm_builds_have_a_gpu_runtime():
    assert not TorchBuild("2.13.0+cpu", None, None).has_gpu_runtime
    assert TorchBuild("2.11.0+cu130", "13.0", None).has_gpu_runtime
    assert TorchBuild("2.4.0+rocm6.1", None, "6.1").has_gpu_runtime


def test_the_installed_build_is_what_torch_itself_says():
    import torch

    code = ("import sys; from pytest_attn.env import torch_build; b = torch_build.installed_build(); "
            "print(b.version, b.cuda, torch_build.cuda_available(), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    version, cuda, available, imported = done.stdout.split()
    assert (version, cuda) == (torch.__version__, str(torch.version.cuda))
    assert available == str(torch.cuda.is_available())
    # a CPU build answers from disk; a CUDA build has to ask torch whether it sees a GPU
    assert imported == str(torch.version.cuda is not None)


def test_a_cpu_run_reports_its_device_without_importing_torch(pytester):
    if torch_build.installed_build().has_gpu_runtime:
        pytest.skip("this torch can reach a GPU: only torch itself can say whether one is there")
    pytester.makeconftest("""
import sys

def pytest_unconfigure(config):
    print("torch imported:", "torch" in sys.modules)
""")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["attn device: cpu, torch *", "*torch imported: False"])
