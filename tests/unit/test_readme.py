"""The README's set-up commands are the ones CI runs, so CI tests what a new user types."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_STEP = "python3 -m venv .venv && . .venv/bin/activate && "


def readme_commands():
    """The indented command lines of the README's opening set-up section."""
    text = (REPO / "README.md").read_text()
    opening = text[:text.index("\n## ")]
    return [line.strip() for line in opening.splitlines() if line.startswith("    ")]


def test_readme_starts_with_two_set_up_commands_in_a_fresh_venv():
    train, tests = readme_commands()
    assert train.startswith(VENV_STEP) and "python -m elastic.run" in train
    assert tests.startswith(VENV_STEP) and tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    ci = (REPO / ".ci" / "run").read_text()
    _, tests = readme_commands()
    after_venv = tests[len(VENV_STEP):]
    lines = [line.strip() for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert after_venv in lines, f".ci/run does not run the README's test command: {after_venv}"
    assert re.search(r"python3 -m venv --clear ", ci), "CI must build a new virtual environment"
    assert "--system-site-packages" not in ci
