"""The README stays true: CI runs its test command, and the options it lists exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    main_job, tests = readme_commands()
    assert "pytest_attn.suite" in main_job
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_every_option_the_readme_names_is_registered(pytestconfig):
    named = set(re.findall(r"`(--attn-[a-z0-9-]+)", (ROOT / "README.md").read_text()))
    registered = {opt for group in pytestconfig._parser._groups for o in group.options for opt in o.names()}
    assert named and named <= registered, named - registered
