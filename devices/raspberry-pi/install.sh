#!/usr/bin/env bash
# Install the edgefl agent as a systemd service on a board of profile `raspberry-pi`:
#   Raspberry Pi 4/5, aarch64, CPU only
# Run as root: sudo ./install.sh   (from the folder `edgefl flash` copied or unpacked)
# Idempotent: re-running upgrades edgefl and keeps the existing agent.env unless a new one is here.
# No torch: a board only runs exported backbones (onnxruntime, ai-edge-litert) and numpy heads.
# Written by edgefl from devices/install.sh.template and the profile's [install] table: change
# those, not this file.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PREFIX="${EDGEFL_PREFIX:-/opt/edgefl}"
CONFIG_DIR="${EDGEFL_CONFIG_DIR:-/etc/edgefl}"
STATE_DIR="/var/lib/edgefl"
SERVICE_USER="edgefl"
PYTHON="${PYTHON:-python3}"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo ./install.sh)" >&2
    exit 1
fi

if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq python3-venv python3-pip
fi

if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
# The agent's state, models and data are its user's alone (0700); re-running tightens an older
# install's modes too. The unit's UMask=0077 keeps what the agent writes there 0600.
install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$STATE_DIR/state" \
    "$STATE_DIR/models" "$STATE_DIR/data"
chmod 0700 "$STATE_DIR" "$STATE_DIR/state" "$STATE_DIR/models" "$STATE_DIR/data"
install -d -m 0755 "$CONFIG_DIR" "$PREFIX"

PIP=("$PREFIX/venv/bin/python" -m pip)
if [ -d "$HERE/wheels" ]; then
    # An offline bundle: `edgefl flash` downloaded every wheel this board needs (its CPU and
    # Python) into wheels/, so pip never touches the network and builds nothing from source.
    # pip runs from its shipped wheel with the venv's Python, so it installs into the venv
    # without being installed there: no ensurepip (an older pip and setuptools, slowly on a
    # small board) and no pip in the venv the agent runs from (a re-flash installs again).
    "$PYTHON" -m venv --without-pip "$PREFIX/venv"
    PIP_WHEEL="$(ls "$HERE"/wheels/pip-*.whl | head -n 1)"
    PIP=("$PREFIX/venv/bin/python" "$PIP_WHEEL/pip")
    PIP_INSTALL=("${PIP[@]}" install --quiet --no-index --find-links "$HERE/wheels" \
        --only-binary=:all:)
else
    "$PYTHON" -m venv "$PREFIX/venv"
    PIP_INSTALL=("${PIP[@]}" install --quiet)
    "${PIP_INSTALL[@]}" --upgrade pip
fi
# A wheel shipped beside this script (offline bundle) wins over the package index.
WHEEL="$(ls "$HERE"/edgefl-*.whl 2>/dev/null | head -n 1 || true)"
if [ -n "$WHEEL" ]; then
    "${PIP_INSTALL[@]}" "${WHEEL}[agent]"
else
    "${PIP_INSTALL[@]}" "edgefl[agent]"
fi
# The runtime is what edgefl[agent] brings: onnxruntime and ai-edge-litert.

if "$PREFIX/venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    echo "install.sh: warning: torch ended up in $PREFIX/venv; boards do not need it" >&2
fi

if [ -f "$HERE/agent.env" ]; then
    if [ -f "$CONFIG_DIR/agent.env" ] && ! cmp -s "$HERE/agent.env" "$CONFIG_DIR/agent.env"; then
        cp "$CONFIG_DIR/agent.env" "$CONFIG_DIR/agent.env.bak"
    fi
    # It may hold broker credentials: root's alone (systemd reads it as root).
    install -m 0600 "$HERE/agent.env" "$CONFIG_DIR/agent.env"
fi
if [ -f "$CONFIG_DIR/agent.env.bak" ]; then
    chmod 0600 "$CONFIG_DIR/agent.env.bak"
fi
if [ -f "$HERE/signing.pub" ]; then
    install -m 0644 "$HERE/signing.pub" "$CONFIG_DIR/signing.pub"
fi
# TLS files for an mqtts:// broker (edgefl flash --cafile/--cert/--key); agent.env's
# EDGEFL_TLS_ARGS names them. The agent runs as $SERVICE_USER: the key is that user's, 0600.
if [ -f "$HERE/ca.crt" ] || [ -f "$HERE/device.crt" ]; then
    install -d -m 0755 "$CONFIG_DIR/tls"
fi
if [ -f "$HERE/ca.crt" ]; then
    install -m 0644 "$HERE/ca.crt" "$CONFIG_DIR/tls/ca.crt"
fi
if [ -f "$HERE/device.crt" ]; then
    install -m 0644 "$HERE/device.crt" "$CONFIG_DIR/tls/device.crt"
    install -m 0600 -o "$SERVICE_USER" -g "$SERVICE_USER" "$HERE/device.key" \
        "$CONFIG_DIR/tls/device.key"
fi
# The board's signing key (edgefl flash made it; the host recorded its public half to enroll).
# A board that already has one keeps it: that key is its identity in the fleet.
if [ -f "$HERE/board-signing.key" ]; then
    if [ -f "$STATE_DIR/state/device.key" ]; then
        echo "install.sh: keeping this board's signing key $STATE_DIR/state/device.key;" \
            "enroll $STATE_DIR/state/device.pub, not the one edgefl flash made" >&2
    else
        install -m 0600 -o "$SERVICE_USER" -g "$SERVICE_USER" "$HERE/board-signing.key" \
            "$STATE_DIR/state/device.key"
        install -m 0644 -o "$SERVICE_USER" -g "$SERVICE_USER" "$HERE/board-signing.pub" \
            "$STATE_DIR/state/device.pub"
    fi
fi

install -d -m 0755 /etc/systemd/system
install -m 0644 "$HERE/edgefl-agent.service" /etc/systemd/system/edgefl-agent.service
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable edgefl-agent.service
    systemctl restart edgefl-agent.service
    echo "edgefl agent installed; follow it with: journalctl -u edgefl-agent -f"
else
    # A container or chroot: the unit is in place for the next boot with systemd.
    echo "edgefl agent installed in $PREFIX/venv; systemd is not running here, so start it with"
    echo "the unit's ExecStart (/etc/systemd/system/edgefl-agent.service, settings in agent.env)"
fi
