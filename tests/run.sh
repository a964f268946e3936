#!/usr/bin/env bash
# The one test command (README.md; .ci/run calls it): installs what the tests need on a fresh Debian machine,
# then runs the whole suite. Safe to run again: installed pieces are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in espeak-ng:espeak-ng sox:sox ffmpeg:ffmpeg ip:iproute2 curl:curl; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
