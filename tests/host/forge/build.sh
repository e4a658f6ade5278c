#!/usr/bin/env bash
# Build (idempotently) an offline CPU Forge lab under $LAB (default $HOME/forge-lab):
#   $LAB/webui      stable-diffusion-webui-forge at dfdcbab6 (2025-06-26, gradio 4.40), exported from its mirror
#   $LAB/webui/repositories/*   what modules/launch_utils.py would git-clone, at the commits it names
#   $LAB/venv       python venv: torch 2.14.1 / torchvision 0.29.1 / joblib + requirements_versions.txt pins
#                   (setuptools pin raised from 69.5.1 to 80.9.0: torch 2.14.1 needs >= 77.0.3)
#   $LAB/webui/models/Stable-diffusion/{tiny-sd1,full-sd15-random}.safetensors   symlinks to the A1111 lab's
#   checkpoints (made by its build.sh, ../shared/host-lab, FULL=1 for full-sd15-random; A1111_LAB names its folder);
#   with SDXL=1 also tiny-sdxl and forge-sdxl-small (made here by make_forge_sdxl.py into the A1111 lab, with
#   the A1111 lab's python and make_tiny_sdxl.py from HOST_LAB), with SDXL=1 FULL=1 also full-sdxl-random.
#   Forge generates only with full-sd15-random and forge-sdxl-small (README.md, "Checkpoints").
# Re-running skips finished steps (stamp files in $LAB/.stamps). FORCE=1 redoes everything.
#
# git needs no network: MIRROR must name a folder with bare git mirrors of these repositories,
# each as $MIRROR/<owner>+<name>/repo (e.g. git clone --mirror https://github.com/salesforce/BLIP "$MIRROR/salesforce+BLIP/repo"):
MIRROR_REPOS="lllyasviel/stable-diffusion-webui-forge lllyasviel/huggingface_guess salesforce/BLIP
  AUTOMATIC1111/stable-diffusion-webui-assets"
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${MIRROR:-}" ]; then
  echo "build.sh: set MIRROR to the folder that holds bare git mirrors of these repositories," >&2
  echo "each as \$MIRROR/<owner>+<name>/repo:" >&2
  for r in $MIRROR_REPOS; do echo "  $r  ->  \$MIRROR/${r/\//+}/repo" >&2; done
  exit 2
fi
[ -d "$MIRROR" ] || { echo "build.sh: MIRROR=$MIRROR is not a folder" >&2; exit 2; }
MIRROR=$(cd "$MIRROR" && pwd)
source "$HERE/env.sh"   # LAB (default $HOME/forge-lab), caches/temp under $LAB, HF offline
PYTHON=${PYTHON:-python3}
A1111_LAB=${A1111_LAB:-$HOME/a1111-lab}
WEBUI=$LAB/webui
VENV=$LAB/venv
VPY=$VENV/bin/python
STAMPS=$LAB/.stamps
HOST_COMMIT=dfdcbab685e57677014f05a3309b48cc87383167

# name in repositories/ : mirror dir : commit (the defaults in modules/launch_utils.py at HOST_COMMIT)
REPOS=(
  "stable-diffusion-webui-assets:AUTOMATIC1111+stable-diffusion-webui-assets:6f7db241d2f8ba7457bac5ca9753331f0c266917"
  "huggingface_guess:lllyasviel+huggingface_guess:84826248b49bb7ca754c73293299c4d4e23a548d"
  "BLIP:salesforce+BLIP:48211a1594f1321b00f14c9f7a5b4813144b2fb9"
)
# torch is unpinned in requirements_versions.txt; these two wheels are the ones the A1111 lab uses
# (Forge imports torchvision at start, via k_diffusion/utils.py).
# joblib: the built-in soft-inpainting script imports it, and nothing in requirements_versions.txt brings it.
PIP_SPECS=(torch==2.14.1 torchvision==0.29.1 joblib==1.4.2)
SETUPTOOLS=setuptools==80.9.0   # replaces the file's setuptools==69.5.1; still ships pkg_resources

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
done_p() { [ "${FORCE:-0}" != 1 ] && [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "${2:-ok}" ]; }
mark() { mkdir -p "$STAMPS"; printf '%s' "${2:-ok}" > "$STAMPS/$1"; }

need_mirror() {
  local g=$MIRROR/$1/repo
  if ! git --git-dir="$g" cat-file -e "$2^{commit}" 2>/dev/null; then
    echo "missing mirror or commit: $g @ $2" >&2
    echo "  -> needs a bare git mirror of https://github.com/${1/+//} there (MIRROR=$MIRROR)" >&2
    exit 1
  fi
}

# Export a commit's tree into a folder. Mirrors can lack some large blobs (images),
# so when `git archive` fails, fall back to a file-by-file export that skips missing blobs.
export_tree() {
  local g=$1 c=$2 d=$3
  rm -rf "$d.tmp"; mkdir -p "$d.tmp"
  if ! git --git-dir="$g" archive "$c" 2>/dev/null | tar -x -C "$d.tmp" 2>/dev/null; then  # pipefail is on
    rm -rf "$d.tmp"; mkdir -p "$d.tmp"
    local missing=0 mode type sha path
    while IFS= read -r -d '' line; do
      read -r mode type sha <<<"${line%%$'\t'*}"; path=${line#*$'\t'}
      [ "$type" = blob ] || continue
      mkdir -p "$d.tmp/$(dirname "$path")"
      if [ "$mode" = 120000 ]; then
        ln -sfn "$(git --git-dir="$g" cat-file blob "$sha")" "$d.tmp/$path"
      elif git --git-dir="$g" cat-file blob "$sha" >"$d.tmp/$path" 2>/dev/null; then
        if [ "$mode" = 100755 ]; then chmod +x "$d.tmp/$path"; fi
      else
        rm -f "$d.tmp/$path"; missing=$((missing + 1)); echo "  (blob not in mirror, skipped: $path)" >&2
      fi
    done < <(git --git-dir="$g" ls-tree -r -z "$c")
    log "exported $c with $missing missing blob(s) skipped"
  fi
  rm -rf "$d"; mv "$d.tmp" "$d"
}

mkdir -p "$LAB"
T0=$(date +%s)

# 1. host checkout -------------------------------------------------------------------------
need_mirror lllyasviel+stable-diffusion-webui-forge "$HOST_COMMIT"
for spec in "${REPOS[@]}"; do IFS=: read -r name mdir commit <<<"$spec"; need_mirror "$mdir" "$commit"; done

if ! done_p host "$HOST_COMMIT" || [ ! -f "$WEBUI/launch.py" ]; then
  log "exporting Forge $HOST_COMMIT -> $WEBUI"
  # keep user data (models, extensions, outputs, config) across a re-export
  keep=$(mktemp -d)
  for p in models embeddings extensions repositories outputs config.json ui-config.json; do
    if [ -e "$WEBUI/$p" ]; then mv "$WEBUI/$p" "$keep/"; fi
  done
  export_tree "$MIRROR/lllyasviel+stable-diffusion-webui-forge/repo" "$HOST_COMMIT" "$WEBUI"
  for p in "$keep"/* ; do [ -e "$p" ] || continue; rm -rf "$WEBUI/$(basename "$p")"; mv "$p" "$WEBUI/"; done
  rmdir "$keep"
  mark host "$HOST_COMMIT"
fi

# 2. repositories/ (what launch_utils.py would git clone) -------------------------------------
for spec in "${REPOS[@]}"; do
  IFS=: read -r name mdir commit <<<"$spec"
  if ! done_p "repo-$name" "$commit" || [ ! -d "$WEBUI/repositories/$name" ]; then
    log "exporting $mdir @ ${commit:0:8} -> repositories/$name"
    mkdir -p "$WEBUI/repositories"
    export_tree "$MIRROR/$mdir/repo" "$commit" "$WEBUI/repositories/$name"
    mark "repo-$name" "$commit"
  fi
done

# 3. venv + packages -------------------------------------------------------------------------
if [ ! -x "$VPY" ]; then
  log "creating venv with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  rm -f "$STAMPS/pip"   # a new venv has nothing
fi
REQS=$LAB/requirements-lab.txt
sed "s/^setuptools==[^ ]*/$SETUPTOOLS/" "$WEBUI/requirements_versions.txt" >"$REQS"
grep -qx "$SETUPTOOLS.*" "$REQS" || { echo "build.sh: no setuptools pin to replace in requirements_versions.txt" >&2; exit 1; }
REQ_KEY="${PIP_SPECS[*]} $(sha1sum "$REQS" | cut -c1-12)"
if ! done_p pip "$REQ_KEY"; then
  log "pip install ${PIP_SPECS[*]} -r requirements-lab.txt (torch wheels are large; minutes)"
  "$VPY" -m pip install --disable-pip-version-check "${PIP_SPECS[@]}" -r "$REQS"
  "$VPY" -m pip check
  mark pip "$REQ_KEY"
fi

# 4. checkpoints: symlinks to the A1111 lab's (Forge reads the family from the weights, no yaml) ---------
# Forge only loads checkpoints whose UNet shapes huggingface_guess recognises and whose VAE is full-size
# (README.md, "Checkpoints"): full-sd15-random (SD1) and forge-sdxl-small (SDXL) are the ones that generate.
# tiny-sd1 / tiny-sdxl are linked too: listed and selectable, but any generation with them fails.
SD_DIR=$WEBUI/models/Stable-diffusion
A1111_SD=$A1111_LAB/webui/models/Stable-diffusion
mkdir -p "$SD_DIR"
CKPTS=(tiny-sd1 full-sd15-random)
if [ "${SDXL:-0}" = 1 ]; then
  CKPTS+=(tiny-sdxl forge-sdxl-small)
  # forge-sdxl-small: made here, into the A1111 lab (with its yaml, so A1111 loads it too), by make_forge_sdxl.py,
  # which reuses the A1111 lab's make_tiny_sdxl.py; ~25 s, 8.4 GB peak RSS.
  HOST_LAB=${HOST_LAB:-$HERE/../../../../shared/host-lab}
  XL_KEY=$(cat "$HERE/make_forge_sdxl.py" "$HOST_LAB/make_tiny_sdxl.py" "$HOST_LAB/make_tiny_sd1.py" | sha1sum | cut -c1-12)
  if ! done_p forge-sdxl-small "$XL_KEY" || [ ! -f "$A1111_SD/forge-sdxl-small.safetensors" ]; then
    [ -x "$A1111_LAB/venv/bin/python" ] || { echo "build.sh: no A1111 lab in $A1111_LAB (../shared/host-lab/build.sh)" >&2; exit 1; }
    avail_gb=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo)
    if [ "$avail_gb" -lt 10 ]; then
      echo "build.sh: only ${avail_gb} GB memory available; making forge-sdxl-small needs about 9 GB" >&2; exit 1
    fi
    log "making $A1111_SD/forge-sdxl-small.{safetensors,yaml} (make_forge_sdxl.py)"
    HOST_LAB=$HOST_LAB "$A1111_LAB/venv/bin/python" "$HERE/make_forge_sdxl.py" --webui "$A1111_LAB/webui" \
      --out "$A1111_SD/forge-sdxl-small"
    mark forge-sdxl-small "$XL_KEY"
  fi
fi
if [ "${SDXL:-0}" = 1 ] && [ "${FULL:-0}" = 1 ]; then CKPTS+=(full-sdxl-random); fi
# With live previews on (the default, "Approx NN"), every SDXL generation loads models/VAE-approx/vaeapprox-sdxl.pt
# and downloads it when missing (no network here: HTTP 500). The checkout ships SD1's approximation (model.pt),
# same architecture and latent channels: use it, as the A1111 lab does (these VAEs are random anyway).
APPROX=$WEBUI/models/VAE-approx
if [ "${SDXL:-0}" = 1 ] && [ ! -f "$APPROX/vaeapprox-sdxl.pt" ] && [ -f "$APPROX/model.pt" ]; then
  log "copying models/VAE-approx/model.pt to vaeapprox-sdxl.pt (live previews; no download)"
  cp "$APPROX/model.pt" "$APPROX/vaeapprox-sdxl.pt"
fi
for c in "${CKPTS[@]}"; do
  src=$A1111_SD/$c.safetensors
  if [ ! -f "$src" ]; then
    case $c in
      full-sd15-random) hint="FULL=1 ../shared/host-lab/build.sh";;
      full-sdxl-random) hint="SDXL=1 FULL=1 ../shared/host-lab/build.sh";;
      tiny-sdxl) hint="SDXL=1 ../shared/host-lab/build.sh";;
      *) hint="../shared/host-lab/build.sh";;
    esac
    echo "build.sh: no $src; make it with the A1111 lab: $hint" >&2
    exit 1
  fi
  if [ "$(readlink "$SD_DIR/$c.safetensors" 2>/dev/null)" != "$src" ]; then
    log "linking models/Stable-diffusion/$c.safetensors -> $src"
    ln -sfn "$src" "$SD_DIR/$c.safetensors"
  fi
done

"$VPY" -m pip freeze 2>/dev/null >"$LAB/pip-freeze.txt" || true
log "done in $(( $(date +%s) - T0 )) s; disk: $(du -sh "$LAB" | cut -f1) in $LAB"
