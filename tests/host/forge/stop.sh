#!/usr/bin/env bash
# Stop the Forge webui started by start.sh (only the pid in $LAB/run/webui.pid, and only if it is our launch.py).
set -uo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"   # LAB
PIDF=$LAB/run/webui.pid
[ -f "$PIDF" ] || { echo "no pid file ($PIDF): not running"; exit 0; }
PID=$(cat "$PIDF")
if ! kill -0 "$PID" 2>/dev/null; then echo "pid $PID not running"; rm -f "$PIDF"; exit 0; fi
if ! tr '\0' ' ' </proc/"$PID"/cmdline | grep -q 'launch.py'; then
  echo "pid $PID is not the lab's launch.py; not touching it" >&2; exit 1
fi
kill -TERM "$PID"
for _ in $(seq 1 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$PID" 2>/dev/null; then echo "pid $PID ignored SIGTERM; sending SIGKILL"; kill -KILL "$PID"; sleep 1; fi
rm -f "$PIDF"
echo "stopped pid $PID"
