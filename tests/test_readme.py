"""The README stays true: CI runs its two commands, the options it lists exist, and the backend in
"Writing a backend" is real code that passes the suite."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_starts_with_two_commands_and_ci_runs_both_verbatim():
    main_job, tests = readme_commands()
    assert "pytest_attn.suite" in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    assert main_job in ci and tests in ci


def test_every_option_the_readme_names_is_registered(pytestconfig):
    named = set(re.findall(r"`(--attn-[a-z0-9-]+)", README))
    registered = {opt for group in pytestconfig._parser._groups for o in group.options for opt in o.names()}
    assert named and named <= registered, named - registered


@pytest.mark.attn_long
def test_the_backend_in_writing_a_backend_passes_the_suite(tmp_path):
    """The README's toml and Python, as a user would install them, then `pytest --attn-backend=mykernel`
    from a project of the user's own: the suite runs against it and nothing fails."""
    text = section("Writing a backend")
    toml = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    name, target = re.search(r'^(\w+) = "([\w.:]+)"', toml, re.M).groups()
    module, attr = target.split(":")
    site = tmp_path / "site"
    package = site / module.split(".")[0]
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (site / (module.replace(".", "/") + ".py")).write_text(code)
    info = site / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[pytest_attn.backends]\n{name} = {target}\n")
    project = tmp_path / "project"
    project.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTEST_ADDOPTS", None)
    # every case up to 600 tokens (the einsum loop is slow on the long ViT sequences, and this runs
    # inside the project's own parallel run)
    done = subprocess.run([sys.executable, "-m", "pytest", f"--attn-backend={name}", "-p", "no:cacheprovider",
                           "--attn-max-tokens=600"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = re.search(rf"^{name}: (\d+) passed, (\d+) skipped$", done.stdout, re.M)
    assert summary and int(summary.group(1)) > 50, done.stdout[-3000:]
    assert "attn suite: the bundled validation suite" in done.stdout
