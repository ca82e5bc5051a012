#!/usr/bin/env bash
# Build the CPU image offline: a local Debian base (docker/base_image.sh), a wheelhouse built on this host, and
# `docker build --network none` that installs only from the wheelhouse (pip inside a container may not reach an
# index, or may fail its TLS checks behind a proxy; the host's pip configuration is what works).
#   bash docker/build_cpu_image.sh [tag]      (default tag: local/dpmot:cpu; needs a reachable Docker engine)
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-local/dpmot:cpu}"
base="${DPMOT_BASE_IMAGE:-local/debian-py:bookworm}"
torch_pin="${DPMOT_TORCH:-torch==2.13.0}"  # the CPU build (an unpinned torch pulls a CUDA build)

docker image inspect "$base" >/dev/null 2>&1 || bash docker/base_image.sh "$base"
py="$(docker run --rm --network none --entrypoint python3 "$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
host_py="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [ "$py" != "$host_py" ]; then
    echo "build_cpu_image: the base image has Python $py but this host $host_py: the wheelhouse would not match" >&2
    exit 1
fi
# Wheels for the package's dependencies (pip wheel skips what the folder already has).
python3 -m pip wheel -q -w wheelhouse "$torch_pin" ".[text]" setuptools wheel  # + the build backend
rm -f wheelhouse/lightning_dpmot-*.whl  # the image installs the package from its source, not a stale wheel
echo "wheelhouse: $(ls wheelhouse | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"
docker build --network none --build-arg BASE="$base" --build-arg EXTRAS=text --build-arg PIP_ARGS=--no-index \
    -t "$tag" .
docker run --rm --network none "$tag" --help >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}'))"
