#!/usr/bin/env bash
# Install Triton's perf_analyzer (the C++ load generator) into DEST without GitHub or NGC:
#   scripts/install_perf_analyzer.sh [DEST]        (default: .tools/perf_analyzer)
#
# Sources:
#   - the binary:        bin/perf_analyzer inside the tritonclient==2.41.0 wheel (PyPI)
#   - libcudart.so.12:   the nvidia-cuda-runtime-cu12 wheel (PyPI); needed even for CPU-only gRPC
#   - libb64.so.0d:      the Debian package libb64-0d (apt-get download + dpkg -x, no install)
# Result: DEST/perf_analyzer, DEST/lib/{libcudart.so.12,libb64.so.0d}, and DEST/run, a wrapper
# that sets LD_LIBRARY_PATH and execs the binary. Idempotent: does nothing when DEST/run works.
# Env: PYTHON (interpreter whose pip downloads; default python3).
set -euo pipefail

TRITONCLIENT_VERSION=2.41.0
CUDART_VERSION=12.9.79
PLATFORM=manylinux2014_x86_64

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/.tools/perf_analyzer}"
PY="${PYTHON:-python3}"

die() { echo "install_perf_analyzer: ERROR: $*" >&2; exit 1; }
log() { echo "install_perf_analyzer: $*" >&2; }

works() {
  # perf_analyzer --help prints usage and may exit non-zero; accept either a 0 exit or usage text.
  local out rc=0
  [ -x "$DEST/run" ] && [ -x "$DEST/perf_analyzer" ] || return 1
  out="$("$DEST/run" --help 2>&1)" || rc=$?
  [ "$rc" -eq 0 ] || grep -q -- "--concurrency-range" <<<"$out"
}

if works; then
  log "already installed at $DEST"
  exit 0
fi

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "only Linux x86_64 is supported (got $(uname -s)-$(uname -m))"
command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found (set PYTHON)"
command -v dpkg >/dev/null 2>&1 || die "dpkg is required to unpack libb64-0d (Debian/Ubuntu only)"
command -v apt-get >/dev/null 2>&1 || die "apt-get is required to download libb64-0d (Debian/Ubuntu only)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"  # lets apt's unprivileged _apt user write the .deb here (avoids a warning)

log "downloading tritonclient==$TRITONCLIENT_VERSION and nvidia-cuda-runtime-cu12==$CUDART_VERSION from PyPI"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --platform "$PLATFORM" \
  --python-version 3.11 --implementation py --abi none -d "$TMP/wheels" \
  "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDART_VERSION" \
  || die "pip download failed (needs network access to PyPI)"

log "downloading libb64-0d (Debian)"
if ! (cd "$TMP" && apt-get download -qq libb64-0d) >/dev/null 2>&1; then
  log "apt-get download failed; running apt-get update and retrying"
  apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed (run as root, needs the Debian mirrors)"
  (cd "$TMP" && apt-get download -qq libb64-0d) >/dev/null \
    || die "apt-get download libb64-0d failed"
fi

STAGE="$TMP/stage"
mkdir -p "$STAGE/lib"
"$PY" - "$TMP/wheels" "$STAGE" <<'EOF' || die "could not extract the binary or libcudart from the wheels"
import glob, os, shutil, sys, zipfile

wheels, stage = sys.argv[1], sys.argv[2]
wanted = {
    "tritonclient-*.whl": ("/bin/perf_analyzer", "perf_analyzer"),
    "nvidia_cuda_runtime_cu12-*.whl": ("/libcudart.so.12", "lib/libcudart.so.12"),
}
for pattern, (suffix, target) in wanted.items():
    (wheel,) = glob.glob(os.path.join(wheels, pattern))
    with zipfile.ZipFile(wheel) as z:
        (member,) = [n for n in z.namelist() if n.endswith(suffix)]
        with z.open(member) as src, open(os.path.join(stage, target), "wb") as dst:
            shutil.copyfileobj(src, dst)
EOF
dpkg -x "$TMP"/libb64-0d_*.deb "$TMP/deb" || die "dpkg -x libb64-0d failed"
LIBB64="$(find "$TMP/deb" -name 'libb64.so.0d*' \( -type f -o -type l \) | head -n1)"
[ -n "$LIBB64" ] || die "libb64.so.0d not found in the libb64-0d package"
cp -L "$LIBB64" "$STAGE/lib/libb64.so.0d"
chmod 755 "$STAGE/perf_analyzer"

cat >"$STAGE/run" <<'EOF'
#!/usr/bin/env bash
# perf_analyzer with its private libraries (written by scripts/install_perf_analyzer.sh)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LD_LIBRARY_PATH="$HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$HERE/perf_analyzer" "$@"
EOF
chmod 755 "$STAGE/run"

# Swap the finished install in only once it is complete, so an interrupted run leaves no
# half-installed DEST that a later run could mistake for a good one.
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$STAGE" "$DEST"

if ! works; then
  log "the installed binary does not run; its output:"
  "$DEST/run" --help 2>&1 | tail -n 20 >&2 || true
  die "perf_analyzer at $DEST/run failed its --help check (missing system library? try: ldd $DEST/perf_analyzer)"
fi
log "installed $DEST/run"
