#!/usr/bin/env bash
# Builds Horovod 0.28.1 (PyTorch + gloo, CPU, no MPI) from its PyPI sdist against the torch that
# is installed, caches the wheel, and installs it.
#
# Horovod's last release predates torch 2.x's C++17 headers and CMake 4, so the sdist needs two
# fixes to build: C++17 instead of C++14 (top-level and horovod/torch CMakeLists.txt) and
# CMAKE_POLICY_VERSION_MINIMUM=3.5 (its gloo/third-party CMake files ask for policies CMake 4
# removed). A third fixes multi-host jobs: the gloo contexts Horovod builds for process sets
# (every hvd.init() makes one) ignore HOROVOD_GLOO_IFACE and take the address the host name
# resolves to, a loopback one on Debian and Ubuntu, so peers on other hosts are refused; the fix
# gives them the global context's interface. The build takes ~8 minutes on 2 cores, so the wheel
# is cached, keyed by the Horovod version, our patch level, and the torch and Python versions; a
# cache hit installs in seconds.
#
# Settings (environment):
#   PYTHON               interpreter to build and install for (default: python3)
#   ELASTIC_WHEEL_CACHE  wheel cache dir (default: $HOME/.cache/elastic-run/wheels)
#   MAKEFLAGS            passed to make (default: -j<number of cores>; Horovod's own default is -j8)
#   HOROVOD_REBUILD=1    ignore a cached wheel and build again
set -euo pipefail

readonly HOROVOD_VERSION=0.28.1
readonly PATCH_LEVEL=2  # bump when the fixes below change, so cached wheels are rebuilt
PYTHON=${PYTHON:-python3}
CACHE_ROOT=${ELASTIC_WHEEL_CACHE:-$HOME/.cache/elastic-run/wheels}

say() { echo "[install-horovod] $*"; }
die() { echo "[install-horovod] error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "no interpreter '$PYTHON'; set PYTHON=/path/to/python"
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null) \
    || die "torch is not importable by $PYTHON; install torch first (pip install torch==2.13.0)"
py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

cache_dir="$CACHE_ROOT/horovod-$HOROVOD_VERSION-patch$PATCH_LEVEL-torch-$torch_version-py$py_version"
say "horovod $HOROVOD_VERSION for torch $torch_version, python $py_version ($PYTHON)"
say "wheel cache: $cache_dir"

find_cached_wheel() {
    compgen -G "$cache_dir/horovod-$HOROVOD_VERSION-*.whl" | head -n 1 || true
}

# pip records the wheel an install came from in direct_url.json; matching it against the cached
# wheel tells whether the installed Horovod was built for this torch (an import can succeed
# against a torch it was not built for and crash later).
installed_from() {
    "$PYTHON" - <<'EOF' 2>/dev/null || true
import json, os, urllib.parse, importlib.metadata as md
try:
    url = json.loads(md.distribution("horovod").read_text("direct_url.json") or "{}").get("url", "")
except md.PackageNotFoundError:
    url = ""
if url.startswith("file://"):
    print(os.path.realpath(urllib.parse.unquote(url[len("file://"):])))
EOF
}

build_wheel() {
    local cmake_bin
    cmake_bin=$(command -v cmake || true)
    if [[ -z "$cmake_bin" ]]; then
        say "cmake not found; installing it with pip"
        "$PYTHON" -m pip install cmake
    fi
    for tool in make g++; do
        command -v "$tool" >/dev/null || die "'$tool' not found; install a C++ toolchain (apt-get install build-essential)"
    done
    "$PYTHON" -c 'import setuptools, wheel' 2>/dev/null || "$PYTHON" -m pip install setuptools wheel

    build_root=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
    trap 'say "removing $build_root"; rm -rf "$build_root"' EXIT

    say "downloading the horovod $HOROVOD_VERSION sdist into $build_root"
    "$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build_root"
    tar -xzf "$build_root/horovod-$HOROVOD_VERSION.tar.gz" -C "$build_root"
    local src="$build_root/horovod-$HOROVOD_VERSION"

    say "patching CMAKE_CXX_STANDARD 14 -> 17 (torch 2.x headers need C++17)"
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
        grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "$f has no 'set(CMAKE_CXX_STANDARD 14)'; the sdist changed"
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    done

    say "patching the process-set gloo contexts to use HOROVOD_GLOO_IFACE (multi-host jobs)"
    "$PYTHON" - "$src/horovod/common/gloo/gloo_context.cc" <<'EOF' || die "the sdist's gloo_context.cc changed"
import sys
path = sys.argv[1]
text = open(path).read()
head, sep, tail = text.partition("void GlooContext::InitializeForProcessSet(")
old = "device_attr.iface = gloo_iface_;"
assert sep and old in tail, "InitializeForProcessSet or its device attribute not found"
open(path, "w").write(head + sep + tail.replace(old, "device_attr.iface = global_context.gloo_iface_;", 1))
EOF

    say "building the wheel (about 8 minutes on 2 cores)"
    mkdir -p "$build_root/wheelhouse"
    CMAKE_POLICY_VERSION_MINIMUM=3.5 \
    MAKEFLAGS=${MAKEFLAGS:--j$(nproc)} \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$build_root/wheelhouse" "$src"

    local built
    built=$(compgen -G "$build_root/wheelhouse/horovod-$HOROVOD_VERSION-*.whl" | head -n 1) \
        || die "pip wheel finished but left no horovod wheel in $build_root/wheelhouse"
    mkdir -p "$cache_dir"
    # Copy then rename, so a concurrent run never sees a half-written wheel.
    cp "$built" "$cache_dir/.$(basename "$built").partial"
    mv "$cache_dir/.$(basename "$built").partial" "$cache_dir/$(basename "$built")"
    say "cached $cache_dir/$(basename "$built")"
}

wheel=$(find_cached_wheel)
if [[ -n "$wheel" && "${HOROVOD_REBUILD:-0}" != 1 ]]; then
    say "using cached wheel $wheel"
else
    build_wheel
    wheel=$(find_cached_wheel)
fi

if [[ "$(installed_from)" == "$(realpath "$wheel")" ]]; then
    say "already installed from $wheel; nothing to do"
else
    say "installing $wheel"
    # --force-reinstall: a horovod 0.28.1 built for another torch counts as "already satisfied".
    "$PYTHON" -m pip install --no-deps --force-reinstall "$wheel"
    "$PYTHON" -m pip install "$wheel"   # its runtime dependencies (cloudpickle, psutil, ...)
fi

# horovod.torch has no __version__; the package version lives on horovod itself.
"$PYTHON" -c 'import horovod, horovod.torch as hvd; assert hvd.gloo_built(), "built without gloo"; print("[install-horovod] ok: horovod", horovod.__version__, "with gloo")'
