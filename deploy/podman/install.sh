#!/usr/bin/env bash
# Installs and configures rootful podman from Debian's packages so that the compose smoke
# test (tests/test_compose_smoke.py) can run `docker-compose.yml` on a machine with no
# Docker engine and no Docker Hub. Idempotent: packages already installed are kept, the
# configuration file is rewritten with the same content. Exits non-zero (and says why) when
# podman cannot run a container here; .ci/run then lets the smoke test skip.
set -euo pipefail

PACKAGES=(podman runc conmon containernetworking-plugins
          golang-github-containernetworking-plugin-dnsname catatonit iptables
          debootstrap docker-compose)
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
fi

# runc: crun stops with "cgroups in hybrid mode not supported" on these machines.
# default_ulimits = []: podman's default nofile ulimit makes setrlimit fail (EPERM) here.
# cgroupfs + file events: no systemd runs as PID 1 in the CI container.
$SUDO mkdir -p /etc/containers
$SUDO tee /etc/containers/containers.conf >/dev/null <<'CONF'
# Written by pairfarm deploy/podman/install.sh
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF

$SUDO podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.NetworkBackend}}'
