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


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``pytest-attn SUBCOMMAND ...`` line in a code block of the README
    and docs/, its comment and ``|| true`` left off."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S):
            for line in block.splitlines():
                command = line.strip().removeprefix("run: ").split(" || ")[0]
                if re.match(r"pytest-attn [a-z-]+(\s|$)", command):  # not output such as "pytest-attn capture: ..."
                    found.append((path.name, command))
    return found


def test_every_documented_command_parses(tmp_path, monkeypatch):
    """Each pytest-attn command the README and docs show is one the CLI accepts as written (parsed,
    not run: most want a GPU or files of their own)."""
    import shlex

    from pytest_attn.cli.main import _build_parser

    monkeypatch.chdir(tmp_path)  # the commands' output paths must be writable
    commands = documented_commands()
    assert any("pytest-attn ab " in c and "--json" in c for _, c in commands), commands
    parser = _build_parser()
    for name, command in commands:
        try:
            parser.parse_args(shlex.split(command, comments=True)[1:])
        except SystemExit as exc:  # argparse's error: the usage line was printed above
            pytest.fail(f"{name}: {command!r} does not parse (exit {exc.code})")


def writing_a_backend_package(folder: Path) -> tuple[str, Path]:
    """The two files of "Writing a backend", laid out as the README says: (backend name, folder)."""
    text = section("Writing a backend")
    toml = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    name = re.search(r'^(\w+) = "mypkg\.attn:\w+"', toml, re.M).group(1)
    (folder / "mypkg").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(toml)
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "attn.py").write_text(code)
    return name, folder


@pytest.mark.attn_long
def test_the_backend_in_writing_a_backend_is_a_package_that_passes_the_whole_catalog(tmp_path):
    """The README's pyproject.toml and module, built and installed by pip as a user would, then
    `pytest --attn-backend=mykernel` from a project of the user's own: the bundled suite runs every
    catalog case this CPU runs (the default 2048-token limit) against it, each passing or skipped with
    the reason its capabilities give, and nothing fails."""
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.plugin.session import CPU_MAX_TOKENS

    name, package = writing_a_backend_package(tmp_path / "mykernel")
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(package)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    project = tmp_path / "project"
    project.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run([sys.executable, "-m", "pytest", f"--attn-backend={name}", "-p", "no:cacheprovider",
                           "-m", "not attn_bench", "-v"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = re.search(rf"^{name}: (\d+) passed, (\d+) skipped$", done.stdout, re.M)
    assert summary and int(summary.group(1)) > 100, done.stdout[-3000:]
    # every case a CPU run selects went through the output check (a count alone would not notice a
    # case dropped from the run): passed, or skipped for what the capabilities leave out
    checked = dict(re.findall(rf"test_output_matches_reference\[{name}-([\w.-]+)\] (PASSED|SKIPPED)", done.stdout))
    whole = {case for case, c in CATALOG.items() if c.max_tokens <= CPU_MAX_TOKENS}
    assert set(checked) == whole, (sorted(whole ^ set(checked)), done.stdout[-3000:])
    assert list(checked.values()).count("PASSED") > 50, done.stdout[-3000:]
    assert "attn suite: the bundled validation suite" in done.stdout


def test_your_own_tests_on_the_catalog_run_as_written(pytester):
    code = re.search(r"```python\n(from pytest_attn import assert_case_passes.*?)```", README, re.S).group(1)
    pytester.makepyfile(test_mine=code)
    result = pytester.runpytest("--attn-backend=torch", "--attn-cases=vit-1img-224,llm-decode-gqa-nhd")
    result.assert_outcomes(passed=2)


def test_the_fallback_without_installing_runs_from_a_checkout():
    """`PYTHONPATH=. python3 -m pytest -p pytest_attn.plugin.hooks pytest_attn/suite`, as the README gives it
    for an image without a package index (the plugin was loaded twice under two names, or not at
    all, before it was loaded by module name in this project's addopts)."""
    command = re.search(r"`(PYTHONPATH=\. python3 -m pytest -p pytest_attn\.plugin\.hooks pytest_attn/suite)`", README).group(1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTEST_ADDOPTS", None)
    args = command.split()[1:]
    args[0] = sys.executable
    done = subprocess.run([*args, "--attn-cases=vit-1img-224", "-p", "no:cacheprovider", "-n0"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"^torch: \d+ passed", done.stdout, re.M), done.stdout[-2000:]
