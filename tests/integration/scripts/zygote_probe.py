"""Prints what a worker sees of how it was started, then exits with --code (for the zygote's
contract test: a forked worker must see what a new process would)."""
import argparse
import atexit
import os
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--code", type=int, default=0)
parser.add_argument("--atexit-file", default=None)
parser.add_argument("--raise", dest="raise_", action="store_true")
args = parser.parse_args()

if args.atexit_file:
    atexit.register(lambda: open(args.atexit_file, "w").write("ran"))
later = threading.Thread(target=lambda: (time.sleep(0.3), print("THREAD done")))
later.start()  # not a daemon: the exit waits for it
print(f"NAME {__name__}")
print(f"ARGV {sys.argv[1:]}")
print(f"ARGV0 {os.path.basename(sys.argv[0])}")
print(f"PATH0 {sys.path[0]}")
print(f"CWD {os.getcwd()}")
print(f"ENV {os.environ.get('ZYGOTE_PROBE')}")
print(f"STDIN {sys.stdin.read()!r}")
print(f"SESSION {os.getsid(0) == os.getpid()}")
print("TO STDERR", file=sys.stderr)
if args.raise_:
    raise ValueError("boom")
sys.exit(args.code)
