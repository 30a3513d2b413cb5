#!/usr/bin/env bash
# What the tests need beyond Python packages: Debian's Chromium, in which tests/integration/test_report.py renders
# the HTML report headless (~100 s to install once; skipped when already there).
set -euo pipefail
if ! command -v chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
