#!/usr/bin/env bash
# Start the lab's Forge webui in the background (CPU, fp32, offline, API on, bound to 127.0.0.1).
# Writes $LAB/run/webui.pid and $LAB/run/webui.log; returns once the API answers.
# Env: LAB (default $HOME/forge-lab), PORT (7870; the A1111 lab uses 7860), CKPT (checkpoint file in
#      models/Stable-diffusion/ to select at start, default full-sd15-random.safetensors; Forge loads it at
#      the first generation, not at start), START_TIMEOUT (s, 300),
#      MIN_FREE_GB (6: refuse to start with less available memory), WEBUI_EXTRA_ARGS (appended).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"   # LAB, HF offline, caches under $LAB
PORT=${PORT:-7870}
CKPT=${CKPT:-full-sd15-random.safetensors}
[ -x "$LAB/venv/bin/python" ] && [ -f "$LAB/webui/launch.py" ] || { echo "no lab in $LAB: run build.sh first" >&2; exit 1; }
[ -f "$LAB/webui/models/Stable-diffusion/$CKPT" ] || { echo "no checkpoint $LAB/webui/models/Stable-diffusion/$CKPT" >&2; exit 1; }
RUN=$LAB/run
mkdir -p "$RUN"
PIDF=$RUN/webui.pid
if [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then
  echo "already running: pid $(cat "$PIDF") (stop.sh first)"; exit 0
fi
avail_gb=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo)
if [ "$avail_gb" -lt "${MIN_FREE_GB:-6}" ]; then
  echo "only ${avail_gb} GB memory available (< MIN_FREE_GB=${MIN_FREE_GB:-6}); not starting" >&2; exit 1
fi
export PYTHONUNBUFFERED=1
cd "$LAB/webui"
# launch.py runs the server in its own process, so $! is the server's pid.
# fds 3-9 closed: a lock held by the caller (`flock LOCKFILE ./start.sh`) must not live on in the server.
# --skip-prepare-environment: no git clone, no pip (build.sh did both); --always-cpu --all-in-fp32: Forge's
# own device/dtype switches (A1111's --use-cpu/--no-half do not steer Forge's backend).
nohup "$LAB/venv/bin/python" launch.py \
  --skip-prepare-environment --skip-install --skip-torch-cuda-test --skip-version-check \
  --skip-python-version-check --no-download-sd-model --disable-safe-unpickle \
  --always-cpu --all-in-fp32 --api --port "$PORT" --ckpt "models/Stable-diffusion/$CKPT" \
  ${WEBUI_EXTRA_ARGS:-} >"$RUN/webui.log" 2>&1 < /dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
PID=$!
echo "$PID" >"$PIDF"
T0=$(date +%s)
DEADLINE=$((T0 + ${START_TIMEOUT:-300}))
until curl -sf -o /dev/null "http://127.0.0.1:$PORT/sdapi/v1/sd-models"; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "webui exited during start; tail of $RUN/webui.log:" >&2; tail -40 "$RUN/webui.log" >&2; rm -f "$PIDF"; exit 1
  fi
  if [ "$(date +%s)" -ge "$DEADLINE" ]; then
    echo "API not up after ${START_TIMEOUT:-300}s (pid $PID still running; log $RUN/webui.log)" >&2; exit 1
  fi
  sleep 2
done
echo "forge up: pid $PID, http://127.0.0.1:$PORT, $(( $(date +%s) - T0 ))s, log $RUN/webui.log"
