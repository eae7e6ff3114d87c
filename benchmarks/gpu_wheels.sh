#!/usr/bin/env bash
# Fill the ignored .whl/ folder with the wheels benchmarks/gpu_session.sh installs on the GPU machine: the
# packages detaudit needs that the device image lacks (or has too old), at the versions installed in this checkout's
# .venv, for CPython 3.12 on x86_64 (the image's Python). Run here, where pip reaches the package index:
#
#   bash benchmarks/gpu_wheels.sh && du -sh .whl     # about 7 MB; name .whl in the device call's carry
#
# The image already holds torch, triton, transformers, numpy, pandas, pyarrow, jinja2, matplotlib, pyyaml and the
# scientific stack; what it lacks is the HTTP client (openai and its httpx2 stack), pydantic, orjson and the server
# (fastapi, which now needs opentelemetry-api and annotated-doc, starlette, uvicorn). typer, rich, click, anyio,
# httpx and h11 travel too because the image's versions are older than ours.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="openai jiter sniffio httpx2 httpcore2 truststore orjson pydantic pydantic_core annotated-types
typing-inspection typing_extensions fastapi starlette uvicorn opentelemetry-api annotated-doc typer rich click anyio
httpx httpcore h11"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv here: install the project first (README, Set up and test)" >&2; exit 2; }
rm -rf .whl && mkdir -p .whl
for name in $PACKAGES; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$version" ] || { echo "$name is not installed in .venv" >&2; exit 2; }
    if ! log=$("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version" 2>&1); then
        echo "$log" | grep -v "^WARNING: Location" >&2
        echo "could not download $name==$version for the GPU image" >&2
        exit 1
    fi
done
ls .whl
