#!/usr/bin/env bash
# Verify the systemd units (any warning fails) and print their security exposure.
# The units run mendd from /opt/mendd; here that path is this checkout (after `make install`), so
# verify also checks that the commands exist and are executable.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for unit in deploy/*.service; do
    name="$(basename "$unit")"
    sed "s#/opt/mendd#${repo}#g" "$unit" > "$work/$name"
    output="$(cd "$work" && systemd-analyze verify "$work/$name" 2>&1 || true)"
    if [ -n "$output" ]; then
        echo "systemd-analyze verify $name:"; echo "$output"; status=1
    else
        echo "systemd-analyze verify $name: clean"
    fi
    systemd-analyze security --offline=yes "$work/$name" 2>&1 | tail -1
done
exit $status
