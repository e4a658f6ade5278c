# Sourced by the Forge lab scripts. Everything the lab builds goes under $LAB (default $HOME/forge-lab);
# caches and temp files stay under it too, and Hugging Face is kept offline.
LAB=${LAB:-$HOME/forge-lab}
export LAB
export HF_HOME=$LAB/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export XDG_CACHE_HOME=$LAB/cache MPLCONFIGDIR=$LAB/cache/matplotlib PIP_CACHE_DIR=$LAB/cache/pip
export TORCH_HOME=$LAB/cache/torch
export GRADIO_TEMP_DIR=$LAB/tmp/gradio TMPDIR=$LAB/tmp
export GRADIO_ANALYTICS_ENABLED=False
mkdir -p "$XDG_CACHE_HOME" "$MPLCONFIGDIR" "$GRADIO_TEMP_DIR"
