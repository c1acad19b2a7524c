# Sourced by the other scripts: one cache for the build and the venv, so
# the demo, the tests and CI share one Lance build.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LANCE_BACKFILL_CACHE:-$HOME/.cache/lance-backfill}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv"
mkdir -p "$CACHE"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Lance's build needs protoc (Debian: protobuf-compiler).
ensure_protoc() {
  command -v protoc >/dev/null 2>&1 && return 0
  log "installing protoc (protobuf-compiler)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
}

# The dashboard's test loads the page in a real browser: Debian's Chromium.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  log "installing Chromium (Debian's package, for the dashboard's browser test)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
}

# The project's Python tools (moto, cfn-lint, cargo-lambda, pylance) in its own venv.
ensure_venv() {
  local stamp="$VENV/.requirements"
  if [ -x "$VENV/bin/python" ] && cmp -s "$REPO/scripts/requirements.txt" "$stamp"; then
    return 0
  fi
  log "creating the Python venv at $VENV (moto, cfn-lint, cargo-lambda, pylance)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$REPO/scripts/requirements.txt"
  cp "$REPO/scripts/requirements.txt" "$stamp"
}
