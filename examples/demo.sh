#!/usr/bin/env bash
# `make demo`: the walking-skeleton story on the virtual board.
# An app built for system 1.1.0 lands on a device running 1.0.0: safe mode.
# The device gets system 1.1.0: the app runs. A board that trusts a signing key takes
# only signed modules. Keel Cloud heals a device over the air.
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

step "Signed modules: a board that trusts a key takes only what that key signed"
show keel keys generate "$DEMO_DIR/release-key"
show keel build system --platform virtual --version 1.1.0 -o "$DEMO_DIR/signed" --sign "$DEMO_DIR/release-key"
show keel vdev create "$DEMO_DIR/locked" --system "$DEMO_DIR/signed" --trust "$DEMO_DIR/release-key.pub"
echo "# the unsigned app is refused before anything is written:"
show keel vdev flash "$DEMO_DIR/locked" "$DEMO_DIR/app.bin" || true
show keel sign "$DEMO_DIR/app.bin" --key "$DEMO_DIR/release-key" -o "$DEMO_DIR/app-signed.bin"
show keel inspect "$DEMO_DIR/app-signed.bin" --trust "$DEMO_DIR/release-key.pub"
show keel vdev flash "$DEMO_DIR/locked" "$DEMO_DIR/app-signed.bin"
show keel vdev run "$DEMO_DIR/locked" --seconds 3
show keel vdev status "$DEMO_DIR/locked"

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

step "Keel Cloud heals a device over the air"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export KEEL_CLOUD="$DEMO_DIR/cloud"
keel cloud serve --mqtt "127.0.0.1:$(free_port)" --http "127.0.0.1:$(free_port)" > "$DEMO_DIR/cloud.log" 2>&1 &
cloud=$!
trap 'kill $cloud 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -f "$KEEL_CLOUD/token" ] && keel list >/dev/null 2>&1 && break; sleep 0.2; done
show keel release system "$DEMO_DIR/s100"
show keel release system "$DEMO_DIR/s110"
show keel build app examples/hello --platform virtual --target 1.0.0 -o "$DEMO_DIR/hello-100.bin"
show keel vdev create "$DEMO_DIR/field" --system "$DEMO_DIR/s100"
show keel vdev flash "$DEMO_DIR/field" "$DEMO_DIR/hello-100.bin"
show keel device provision "$DEMO_DIR/field" --name field1
keel vdev run "$DEMO_DIR/field" --seconds 60 > "$DEMO_DIR/field-console.txt" &
device=$!
for _ in $(seq 50); do keel list 2>/dev/null | grep -q "online" && break; sleep 0.2; done
show keel list
echo "# an app built for system 1.1.0 goes to a device on 1.0.0:"
show keel flash field1 "$DEMO_DIR/app.bin"
for _ in $(seq 150); do
  keel device show field1 --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["heal"]["state"]=="healed" and d["mode"]=="normal" else 1)' && break
  sleep 0.4
done
show keel device show field1
echo "# the device's console while it was healed:"
grep -E "SAFE MODE|missing|pending install|installing the update|on trial|it stays|system 1|hello from keel|vdev: boot" "$DEMO_DIR/field-console.txt" | sed 's/^/  /'
kill $device 2>/dev/null || true
wait $device 2>/dev/null || true

step "Done: the app runs once its dependencies are met. Files are in $DEMO_DIR"
