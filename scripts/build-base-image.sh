#!/usr/bin/env bash
# Builds the service image's base, promptfolio-base:bookworm-py311 (bentofile.yaml: docker.base_image),
# from Debian packages alone: Debian bookworm (minbase) + Python 3.11 with venv + CA certificates.
# No registry is needed (mmdebstrap fetches .deb files from the configured Debian mirror), and the
# base carries no compilers and no git. Run as root (mmdebstrap's root mode); needs mmdebstrap
# (`apt-get install mmdebstrap`) and a running Docker daemon.
#   scripts/build-base-image.sh [IMAGE_NAME]
set -euo pipefail

IMAGE="${1:-promptfolio-base:bookworm-py311}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

command -v mmdebstrap >/dev/null || { echo "build-base-image: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 2; }
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    bookworm "$WORK/rootfs.tar"
docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$WORK/rootfs.tar" "$IMAGE"
docker run --rm --network none "$IMAGE" python3 -c 'import sys, venv, ensurepip; print(sys.version)'
