#!/usr/bin/env bash
# System packages the tests and `make run` need: PostgreSQL server binaries, promtool
# (Debian's prometheus package) for tests/deploy's `promtool check rules`, and ffmpeg. This machine kind
# ships PostgreSQL; install from Debian's packages what is missing. (Docker is installed by
# `make compose-up`/`compose-test` themselves, only when they run.)
set -euo pipefail
missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# ffmpeg: the analysis tests and `make bench-analysis` generate their clips with its lavfi sources.
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian's ${missing[*]} (for the tests)" >&2
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
# policy-rc.d-less machines would start Prometheus on 0.0.0.0:9090 from the package's postinst:
# refuse service starts for the duration of the install.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
