#!/usr/bin/env bash
# Install the peer servers that `make bench` (python -m bench.field) measures batchline against,
# each in its own virtual environment so the project's .venv is untouched:
#   scripts/install_peers.sh [DEST]        (default: .tools/peers)
#
#   DEST/triton-venv     nvidia-pytriton==0.7.0: ships tritonserver 2.51 with its python backend
#                        (no ONNX Runtime backend: bench/peers/triton_model.py runs ORT inside it)
#   DEST/mlserver-venv   mlserver==1.7.1 (no ONNX runtime package exists for 1.7.1:
#                        bench/peers/mlserver_runtime.py is a small MLModel running onnxruntime)
#
# Both get the same onnxruntime version as the interpreter in PYTHON (the project's .venv), so
# every server runs the same ONNX Runtime on the same model file; numpy is whatever each peer
# allows (nvidia-pytriton 0.7.0 wants numpy < 2). PyPI only.
# Idempotent: a venv whose stamp matches the wanted versions is left alone.
# Env: PYTHON (the project's interpreter; default .venv/bin/python, else python3).
set -euo pipefail

PYTRITON_VERSION=0.7.0
MLSERVER_VERSION=1.7.1

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/.tools/peers}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

die() { echo "install_peers: ERROR: $*" >&2; exit 1; }
log() { echo "install_peers: $*" >&2; }

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "only Linux x86_64 is supported (got $(uname -s)-$(uname -m))"
command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found (set PYTHON)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PY is not Python 3.11 (tritonserver's python backend stub in nvidia-pytriton is built per minor version; this bench uses the 3.11 one)"

# The versions the project runs, so that the peers run the same ONNX Runtime.
ORT="$("$PY" -c 'import importlib.metadata as m; print(m.version("onnxruntime"))' 2>/dev/null)" \
  || die "onnxruntime is not installed for $PY (run make install first)"

# venv NAME STAMP PACKAGE...: (re)create DEST/NAME unless its stamp says it already holds these.
venv() {
  local name="$1" stamp="$2"
  shift 2
  local dir="$DEST/$name"
  if [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$stamp" ] && [ -x "$dir/bin/python" ]; then
    log "$name: already installed ($stamp)"
    return 0
  fi
  log "$name: installing $* (a few minutes)"
  rm -rf "$dir"
  mkdir -p "$DEST"
  "$PY" -m venv "$dir" || die "could not create $dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$dir/bin/python" -m pip install --quiet "$@" \
    || die "pip install $* into $dir failed (needs network access to PyPI)"
  echo "$stamp" >"$dir/.installed"
}

venv triton-venv "pytriton=$PYTRITON_VERSION ort=$ORT" \
  "nvidia-pytriton==$PYTRITON_VERSION" "onnxruntime==$ORT"
TRITON_SERVER="$(ls "$DEST"/triton-venv/lib/python3.11/site-packages/pytriton/tritonserver/bin/tritonserver 2>/dev/null || true)"
[ -x "$TRITON_SERVER" ] || die "nvidia-pytriton installed but pytriton/tritonserver/bin/tritonserver is missing"

venv mlserver-venv "mlserver=$MLSERVER_VERSION ort=$ORT" \
  "mlserver==$MLSERVER_VERSION" "onnxruntime==$ORT"
[ -x "$DEST/mlserver-venv/bin/mlserver" ] || die "mlserver installed but bin/mlserver is missing"

log "peers installed under $DEST (onnxruntime $ORT)"
