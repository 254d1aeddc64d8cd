#!/usr/bin/env bash
# System packages the tests and `make run` need: PostgreSQL server binaries, and ffmpeg (the
# analysis tests and `make bench-analysis` generate their clips with its lavfi sources). This
# machine kind ships PostgreSQL; install from Debian's packages whatever is missing.
set -euo pipefail
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
updated=""
install_pkg() {
  [ -n "$updated" ] || { $SUDO apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$1" >/dev/null
}
if ! command -v ffmpeg >/dev/null 2>&1; then
  echo "ffmpeg not found; installing Debian's ffmpeg package" >&2
  install_pkg ffmpeg
fi
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
echo "PostgreSQL server binaries not found; installing Debian's postgresql package" >&2
install_pkg postgresql
