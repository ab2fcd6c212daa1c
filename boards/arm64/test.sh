#!/usr/bin/env bash
# `make test-arm64`: edgefl on an emulated Raspberry Pi (Debian bookworm arm64 under qemu-user).
# Needs root (debootstrap, chroot, mounts, binfmt_misc) and the Debian packages debootstrap,
# qemu-user-static and binfmt-support (.ci/run installs them). The root file system is cached in
# ${EDGEFL_ARM64_CACHE:-$HOME/.cache/edgefl/arm64}; what the run writes goes to build/arm64/.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" -ne 0 ]; then
    echo "boards/arm64/test.sh: run as root (debootstrap, chroot and mounts need it)" >&2
    exit 2
fi
for tool in debootstrap qemu-aarch64-static unshare chroot mosquitto; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "boards/arm64/test.sh: $tool is missing (apt-get install debootstrap" \
            "qemu-user-static binfmt-support mosquitto)" >&2
        exit 2
    fi
done
# A private mount namespace: every mount the check makes goes away with it.
exec unshare --mount --propagation private "${PYTHON:-.venv/bin/python}" boards/arm64/check.py "$@"
