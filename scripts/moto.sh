#!/usr/bin/env bash
# Starts or stops a moto server (DynamoDB, SQS, S3) on 127.0.0.1; one per port.
#   scripts/moto.sh start [port]   prints the endpoint
#   scripts/moto.sh stop [port]    stops the one on port, or every one started here
source "$(dirname "$0")/env.sh"
pidfile() { echo "$CACHE/moto-$1.pid"; }
case "${1:-}" in
  start)
    ensure_venv
    port="${2:-5055}"
    PIDFILE="$(pidfile "$port")"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      kill "$(cat "$PIDFILE")" 2>/dev/null || true
      sleep 0.5
    fi
    # moto_server.py: DynamoDB requests isolated as in DynamoDB, AWS limits moto lacks,
    # faults from MOTO_FAULTS (inherited; changed at runtime with POST /_faults), and
    # a request log at GET /_stats (see the file).
    "$VENV/bin/python" "$REPO/scripts/moto_server.py" -H 127.0.0.1 -p "$port" >"$CACHE/moto-$port.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 100); do
      if curl -fsS "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
        echo "http://127.0.0.1:$port"
        exit 0
      fi
      sleep 0.2
    done
    echo "moto did not start; see $CACHE/moto-$port.log" >&2
    exit 1
    ;;
  stop)
    for file in "$CACHE"/moto-${2:-*}.pid; do
      [ -f "$file" ] || continue
      kill "$(cat "$file")" 2>/dev/null || true
      rm -f "$file"
    done
    ;;
  *)
    echo "usage: $0 start [port] | stop [port]" >&2
    exit 2
    ;;
esac
