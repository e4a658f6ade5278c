#!/usr/bin/env bash
# Install / remove an extension in the Forge lab by symlinking a folder into $LAB/webui/extensions/.
#   ext.sh link DIR [NAME]   (NAME defaults to DIR's basename)
#   ext.sh unlink NAME
#   ext.sh list
# Restart the webui (stop.sh; start.sh) for a change to take effect.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"   # LAB
EXT=$LAB/webui/extensions
[ -d "$EXT" ] || { echo "no $EXT: run build.sh first (LAB=$LAB)" >&2; exit 1; }
case "${1:-}" in
  link)
    src=$(cd "${2:?DIR}" && pwd); name=${3:-$(basename "$src")}
    [ -e "$EXT/$name" ] && [ ! -L "$EXT/$name" ] && { echo "$EXT/$name exists and is not a symlink" >&2; exit 1; }
    ln -sfn "$src" "$EXT/$name"; echo "linked $name -> $src" ;;
  unlink)
    name=${2:?NAME}; [ -L "$EXT/$name" ] && rm "$EXT/$name" && echo "unlinked $name" || echo "no symlink $name" ;;
  list)
    ls -l "$EXT" | sed 1d ;;
  *) sed -n 2,6p "$0"; exit 2 ;;
esac
