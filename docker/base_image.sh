#!/usr/bin/env bash
# A local Debian base image with Python, for building the CPU image where Docker Hub is unreachable.
#   bash docker/base_image.sh [tag]        (default tag: local/debian-py:bookworm; needs root and debootstrap)
# debootstrap --variant=minbase bookworm + python3, venv and pip, imported with `docker import`.
set -euo pipefail
tag="${1:-local/debian-py:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag exists"
    exit 0
fi
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
rootfs="$(mktemp -d /tmp/dpmot-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag"
echo "built base image $tag"
