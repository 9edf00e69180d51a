#!/usr/bin/env bash
# bench/fetch_wheels.sh [PYTHON_VERSION] [PLATFORM]
# Downloads into bench/wheels/ the wheels bench/gpu.sh installs on an offline GPU machine: pyarrow and duckdb
# (about 80 MB together), built for PYTHON_VERSION (default: this python's) on PLATFORM (default x86_64 Linux).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="${1:-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
platform="${2:-manylinux_2_28_x86_64}"
python3 -m pip download --only-binary=:all: --no-deps --python-version "$version" --platform "$platform" \
    --dest "$here/wheels" pyarrow duckdb
ls -l "$here/wheels"
