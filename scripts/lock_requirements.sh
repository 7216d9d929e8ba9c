#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's dependencies in the image's base
# (python:3.11-slim) and pin what pip picked. Needs a Docker engine; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'rm -f requirements.lock.new' EXIT
# pip's own output goes to stderr, so a failed resolve says why.
docker run --rm -v "$PWD:/src:ro" python:3.11-slim sh -c \
  'cp -r /src /tmp/tw && pip install -q --no-cache-dir /tmp/tw >&2 &&
   pip freeze --exclude tierwriter' \
  | grep -v -e '^-e ' -e ' @ file' > requirements.lock.new
{
  echo "# The image's dependency versions, pinned (the Dockerfile installs exactly these)."
  echo "# Refresh after changing pyproject.toml's dependencies: scripts/lock_requirements.sh"
  cat requirements.lock.new
} > requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages pinned"
