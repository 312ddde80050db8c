#!/bin/sh
# A base image for deploy/Dockerfile made on this machine, with no image registry: a minimal
# Debian (debootstrap, from Debian's package mirror) with python3 and its venv module, imported
# into the local docker engine.
#   sudo deploy/base/make-local-base.sh [TAG] [SUITE] [MIRROR]
#   docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=fedtune-base:bookworm ...
set -eu
tag=${1:-fedtune-base:bookworm}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root/rootfs" "$mirror"
rm -rf "$root/rootfs/var/cache/apt/archives/"*.deb "$root/rootfs/var/lib/apt/lists/"*
tar -C "$root/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$tag"
echo "$tag"
