#!/usr/bin/env bash
# Starts or stops a moto server (DynamoDB, SQS, S3) on 127.0.0.1.
#   scripts/moto.sh start [port]   prints the endpoint
#   scripts/moto.sh stop
source "$(dirname "$0")/env.sh"
PIDFILE="$CACHE/moto.pid"
case "${1:-}" in
  start)
    ensure_venv
    port="${2:-5055}"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      kill "$(cat "$PIDFILE")" 2>/dev/null || true
      sleep 0.5
    fi
    # moto_server.py: DynamoDB requests isolated as in DynamoDB, AWS limits moto lacks,
    # faults from MOTO_FAULTS (inherited; changed at runtime with POST /_faults), and
    # a request log at GET /_stats (see the file).
    "$VENV/bin/python" "$REPO/scripts/moto_server.py" -H 127.0.0.1 -p "$port" >"$CACHE/moto.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 100); do
      if curl -fsS "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
        echo "http://127.0.0.1:$port"
        exit 0
      fi
      sleep 0.2
    done
    echo "moto did not start; see $CACHE/moto.log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$PIDFILE" ]; then
      kill "$(cat "$PIDFILE")" 2>/dev/null || true
      rm -f "$PIDFILE"
    fi
    ;;
  *)
    echo "usage: $0 start [port] | stop" >&2
    exit 2
    ;;
esac
