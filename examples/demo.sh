#!/usr/bin/env bash
# `make demo`: the walking-skeleton story on the virtual board.
# An app built for system 1.1.0 lands on a device running 1.0.0: safe mode.
# The device gets system 1.1.0: the app runs.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-/tmp/keel-demo}
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "Build two system versions and an app that needs the newer one"
show keel build system --platform virtual --version 1.0.0 -o "$DEMO_DIR/s100"
show keel build system --platform virtual --version 1.1.0 -o "$DEMO_DIR/s110"
show keel build app examples/hello --platform virtual --target 1.1.0 -o "$DEMO_DIR/app.bin"
show keel inspect "$DEMO_DIR/app.bin"

step "A virtual device with system 1.0.0, and the app flashed onto it"
show keel vdev create "$DEMO_DIR/device" --system "$DEMO_DIR/s100"
show keel vdev flash "$DEMO_DIR/device" "$DEMO_DIR/app.bin"

step "Boot it on the MicroPython VM: the system is too old, so safe mode"
show keel vdev run "$DEMO_DIR/device" --seconds 3
show keel vdev status "$DEMO_DIR/device"

step "Update the system to 1.1.0 (as a USB bootloader would) and boot again"
show keel vdev flash "$DEMO_DIR/device" "$DEMO_DIR"/s110/*.bin
show keel vdev run "$DEMO_DIR/device" --seconds 3
show keel vdev status "$DEMO_DIR/device"

step "The sensor example: drive and watch the running board from the host"
show keel build app examples/sensor --platform virtual --target 1.1.0 -o "$DEMO_DIR/sensor.bin"
show keel vdev flash "$DEMO_DIR/device" "$DEMO_DIR/sensor.bin"
keel vdev run "$DEMO_DIR/device" --seconds 6 > "$DEMO_DIR/sensor-console.txt" &
runner=$!
sleep 2.5
show keel vdev io "$DEMO_DIR/device" --get temperature
show keel vdev io "$DEMO_DIR/device" --sensor tmp102=28.5
sleep 1.2
show keel vdev io "$DEMO_DIR/device" --get temperature
show keel vdev io "$DEMO_DIR/device" --call led=on
show keel vdev io "$DEMO_DIR/device"
wait "$runner"

step "Done: the app runs once its dependencies are met. Files are in $DEMO_DIR"
