#!/usr/bin/env bash
# Installs what the browser tests need (Debian's chromium). Without it they are skipped, loudly.
set -u
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q chromium fonts-nanum >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium fonts-nanum >/dev/null 2>&1; }) \
      || echo "WARNING: could not install chromium; browser tests will be skipped" >&2
  else
    echo "WARNING: chromium is not installed and cannot be installed here; browser tests will be skipped" >&2
  fi
fi
exit 0
