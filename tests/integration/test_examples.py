"""examples/train_elastic.py runs as the README shows it, and resumes from its checkpoint."""
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def run_launcher(args, tmpdir, timeout=TIMEOUT_S):
    """(exit code, output) of `python -m elastic.run ARGS`; its whole process tree is killed
    when it fails to finish in time, or when the test is interrupted. TMPDIR is `tmpdir`, so
    the embedded etcd's data dir of a killed run stays under the test's own directory."""
    env = dict(os.environ, TMPDIR=str(tmpdir))
    proc = subprocess.Popen([sys.executable, "-m", "elastic.run", *map(str, args)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate()
        raise


def kill_tree(pid):
    try:
        root = psutil.Process(pid)
        tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


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
