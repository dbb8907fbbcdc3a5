"""The README's example commands run as a user types them, in the environment the tests run in
(a fresh virtual environment under `.ci/run`), and examples/train_elastic.py resumes from its
checkpoint."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from .agents import REPO, kill_tree

pytestmark = pytest.mark.integration

TIMEOUT_S = 120


def run_launcher(args, tmpdir, timeout=TIMEOUT_S, cwd=REPO):
    """(exit code, output) of `python -m elastic.run ARGS`; its whole process tree is killed
    when it fails to finish in time, or when the test is interrupted. TMPDIR is `tmpdir`, so
    the embedded etcd's data dir of a killed run stays under the test's own directory."""
    env = dict(os.environ, TMPDIR=str(tmpdir))
    proc = subprocess.Popen([sys.executable, "-m", "elastic.run", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except BaseException:
        kill_tree(proc)
        raise


def readme_command(contains):
    """The README's `python -m elastic.run ...` command whose text contains `contains`, as the
    argument list after `python -m elastic.run` (continuation lines joined)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("python -m elastic.run ") and contains in part:
                return shlex.split(part)[3:]
    raise AssertionError(f"no `python -m elastic.run` command with {contains!r} in the README")


def run_readme_command(contains, tmp_path):
    """Run the README's command from a directory of its own that has the repository's
    examples/, so relative paths in the command resolve and ./checkpoints lands there."""
    workdir = tmp_path / "user"
    workdir.mkdir()
    (workdir / "examples").symlink_to(REPO / "examples")
    return run_launcher(readme_command(contains), tmp_path, cwd=workdir)


def test_readme_first_command_trains_on_the_embedded_etcd(tmp_path):
    code, out = run_readme_command("examples/train.py", tmp_path)
    assert code == 0, out[-3000:]
    assert "DONE world=2" in out, out[-3000:]


def test_readme_worker_api_example_trains_and_checkpoints(tmp_path):
    code, out = run_readme_command("examples/train_elastic.py", tmp_path)
    assert code == 0, out[-3000:]
    assert "DONE" in out and steps(out)[-1] == 64, out[-3000:]
    assert (tmp_path / "user" / "checkpoints" / "train_elastic.ckpt").is_file()


def steps(out):
    return [int(n) for n in re.findall(r"^\[rank0\]: STEP \S+ step=(\d+) world=2 loss=", out,
                                       re.MULTILINE)]


def test_train_elastic_trains_then_resumes_from_its_checkpoint(tmp_path):
    checkpoint = tmp_path / "ckpt" / "train_elastic.ckpt"

    def run(log_dir):
        return run_launcher(["--nproc-per-node", 2, "--global-batch-size", 32,
                             "--max-micro-batch", 8, "--log-dir", tmp_path / log_dir,
                             "examples/train_elastic.py", "--epochs", 1,
                             "--checkpoint", checkpoint], tmp_path)

    code, out = run("logs1")
    assert code == 0, out[-3000:]
    assert "DONE" in out
    trained = steps(out)
    # 2048 samples in global batches of 32: one epoch is 64 steps.
    assert trained == list(range(1, 65)), out[-3000:]
    assert "RESUMED" not in out
    assert checkpoint.is_file()

    code, out = run("logs2")
    assert code == 0, out[-3000:]
    assert "DONE" in out
    resumed = re.search(r"RESUMED at step (\d+)", out)
    assert resumed, out[-3000:]
    assert int(resumed.group(1)) == trained[-1] > 0
    assert steps(out) == [], "the finished epoch was trained again"
