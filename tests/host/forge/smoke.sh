#!/usr/bin/env bash
# Smoke check of a running Forge lab (start.sh first), through the API only:
#   GET /sdapi/v1/sd-models lists the lab's checkpoints; for each one (CKPTS, default: those of
#   full-sd15-random and forge-sdxl-small that are listed, the ones Forge recognises) POST /sdapi/v1/options
#   selects it, GET /sdapi/v1/options reads it back, and a 2-step 64x64 txt2img must return a 64x64 PNG.
#   Prints one PASS/FAIL line per step (with the txt2img time and the server's RSS after it); exits 1 on any FAIL.
#   Switching leaves the last checkpoint selected (saved in config.json); start.sh's --ckpt wins at the next start.
# Env: LAB (default $HOME/forge-lab), PORT (7870), CKPTS (space-separated titles), TIMEOUT (s per request, 600).
set -uo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"   # LAB
PORT=${PORT:-7870}
URL=http://127.0.0.1:$PORT
PY=$LAB/venv/bin/python
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
fails=0
say() { printf '%s %s\n' "$1" "$2"; if [ "$1" = FAIL ]; then fails=$((fails + 1)); fi; }
rss() {  # the server's resident memory, if start.sh's pid file names a live process
  local pid; pid=$(cat "$LAB/run/webui.pid" 2>/dev/null) || return 0
  ps -o rss= -p "$pid" 2>/dev/null | awk '{ printf "; server RSS %.1f GB", $1 / 1048576 }'
}
req() {  # METHOD PATH [JSON] -> body in $TMP/body, HTTP code on stdout
  curl -s -m "${TIMEOUT:-600}" -o "$TMP/body" -w '%{http_code}' -X "$1" "$URL$2" \
    -H 'Content-Type: application/json' ${3:+-d "$3"}
}

code=$(req GET /sdapi/v1/sd-models) || true
[ "$code" = 200 ] || { say FAIL "sd-models: HTTP $code (is the lab running? start.sh)"; exit 1; }
titles=$("$PY" -c 'import json,sys; print(" ".join(m["title"] for m in json.load(open(sys.argv[1]))))' "$TMP/body")
say PASS "sd-models: $titles"
want=${CKPTS:-}
if [ -z "$want" ]; then
  for t in full-sd15-random.safetensors forge-sdxl-small.safetensors; do case " $titles " in *" $t "*) want+="$t ";; esac; done
fi
[ -n "$want" ] || { say FAIL "neither full-sd15-random nor forge-sdxl-small listed (build.sh, SDXL=1)"; exit 1; }

for ckpt in $want; do
  case " $titles " in *" $ckpt "*) ;; *) say FAIL "$ckpt: not listed by sd-models"; continue;; esac
  code=$(req POST /sdapi/v1/options "{\"sd_model_checkpoint\": \"$ckpt\"}") || true
  [ "$code" = 200 ] || { say FAIL "$ckpt: options POST HTTP $code: $(head -c 300 "$TMP/body")"; continue; }
  code=$(req GET /sdapi/v1/options) || true
  got=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("sd_model_checkpoint"))' "$TMP/body" 2>/dev/null)
  # the read-back is the checkpoint's title, which gains " [<hash>]" once Forge has hashed the file
  if [ "$got" = "$ckpt" ] || [ "${got% \[*\]}" = "$ckpt" ]; then say PASS "$ckpt: selected ($got)"; else say FAIL "$ckpt: options read back '$got'"; continue; fi
  t0=$(date +%s.%N)
  code=$(req POST /sdapi/v1/txt2img '{"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64,
    "sampler_name": "Euler", "scheduler": "Automatic", "seed": 1, "cfg_scale": 7, "batch_size": 1}') || true
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$code" != 200 ]; then
    msg=$(head -c 300 "$TMP/body")
    hint=""
    case "$msg" in *"Failed to recognize model type"*)
      hint=" (Forge's huggingface_guess matches only full-size UNet shapes; see README.md, 'Checkpoints')";; esac
    say FAIL "$ckpt: txt2img HTTP $code in ${dt}s: $msg$hint"; continue
  fi
  size=$("$PY" - "$TMP/body" <<'PYEOF'
import base64, io, json, sys
from PIL import Image
img = Image.open(io.BytesIO(base64.b64decode(json.load(open(sys.argv[1]))["images"][0])))
print(f"{img.format} {img.size[0]}x{img.size[1]}")
PYEOF
  )
  if [ "$size" = "PNG 64x64" ]; then say PASS "$ckpt: txt2img 2 steps -> $size in ${dt}s$(rss)"
  else say FAIL "$ckpt: txt2img returned '$size'"; fi
done
echo "smoke: $fails failure(s)"
[ "$fails" = 0 ]
