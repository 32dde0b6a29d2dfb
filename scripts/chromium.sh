#!/usr/bin/env bash
# Install Debian's chromium (once) for the HTML report's browser test (tests/html.rs), which
# drives it headless over the DevTools protocol. Needs root (CI runs as root); elsewhere it says
# what to run. About 300 MB installed; a minute or two.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "peft-compat: chromium is not installed; run: sudo apt-get install chromium" >&2
  exit 1
fi
echo "peft-compat: installing Debian's chromium for the browser test (once)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
chromium --version >&2
