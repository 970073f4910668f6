#!/usr/bin/env bash
# An aarch64 (arm64) Python that runs edgerun on an x86-64 host under qemu user-mode emulation,
# with no root tricks: no binfmt_misc, no chroot, nothing installed into the system.
#
#   tools/arm64_python.sh setup          # build the cache (idempotent; prints what it does)
#   tools/arm64_python.sh run ARGS...    # = python3 ARGS..., but aarch64, with edgerun importable
#   tools/arm64_python.sh path           # print the cache directory
#
# The cache (${EDGERUN_ARM64_ROOT:-$HOME/.cache/edgerun/arm64}) holds:
#   root/           Debian's arm64 python3.11 and the libraries it links, unpacked with `dpkg-deb -x`
#   site-packages/  the aarch64 wheels of edgerun's runtime dependencies, unzipped
#   qemu/           qemu-aarch64-static unpacked from Debian's qemu-user-static, if not on PATH
#   numba/          NUMBA_CACHE_DIR for `run` unless the caller sets one
#   apt/            a private apt state, only while setup runs
#
# How the root is made: instead of `debootstrap --foreign` (which needs root, unpacks the whole
# minbase system and makes device nodes) apt-get resolves and downloads just python3.11-minimal,
# libpython3.11-stdlib and libstdc++6 plus their dependencies (~40 .debs, ~16 MB) against a
# private, empty apt state in the cache (arm64 package lists, empty dpkg status), and each .deb is
# unpacked with `dpkg-deb -x`. qemu-aarch64-static -L ROOT then finds the dynamic loader and
# libraries inside ROOT. Wheels: `pip download --only-binary :all: --platform ..._aarch64`, pinned to
# the versions installed for the host's python3 where aarch64 wheels of them exist.
#
# Environment: EDGERUN_ARM64_ROOT (cache dir), EDGERUN_ARM64_MIRROR (Debian mirror,
# default http://deb.debian.org/debian), EDGERUN_HOST_PYTHON (the host Python whose pip and versions are used,
# default python3), QEMU_CPU (qemu's CPU model, default max).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/tools/arm64_python.sh"
CACHE=${EDGERUN_ARM64_ROOT:-$HOME/.cache/edgerun/arm64}
MIRROR=${EDGERUN_ARM64_MIRROR:-http://deb.debian.org/debian}
PY=${EDGERUN_HOST_PYTHON:-python3}
SUITE=bookworm                 # Debian 12: Python 3.11, glibc 2.36 (manylinux_2_28 wheels run)
PYVER=3.11
DEBS="python3.11-minimal libpython3.11-stdlib libstdc++6"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# What `import edgerun` and its CLI import (pyproject.toml dependencies plus what they import at
# import time). Left out on purpose: huggingface-hub (tokenizers' from_pretrained only), requests
# and tqdm (gguf's download helpers and scripts only).
WHEELS="numpy numba llvmlite safetensors psutil click tokenizers jinja2 markupsafe gguf pyyaml"

ROOT=$CACHE/root
SITE=$CACHE/site-packages
APT=$CACHE/apt

say() { echo "arm64_python: $*" >&2; }
die() { say "error: $*"; exit 1; }

find_qemu() {
  local q
  for q in "$CACHE/qemu/usr/bin/qemu-aarch64-static" "$(command -v qemu-aarch64-static || true)"; do
    if [[ -n $q && -f $q && -x $q ]]; then echo "$q"; return; fi
  done
  return 1
}

# apt-get on the private state: arm64 is the "native" architecture, the host's is added when
# qemu-user-static has to be fetched too. Nothing here reads or writes /var/lib/apt or /var/lib/dpkg.
ARCHS=arm64
BUILT=0
apt_private() {
  local a archopts=(-o APT::Architecture=arm64)
  for a in ${ARCHS//,/ }; do archopts+=(-o "APT::Architectures::=$a"); done
  apt-get -qq -o Debug::NoLocking=1 -o APT::Sandbox::User=root "${archopts[@]}" -o Dir::State="$APT/state" -o Dir::State::status="$APT/status" \
    -o Dir::Cache="$APT/cache" -o Dir::Cache::archives="$APT/debs" -o Dir::Etc::SourceList="$APT/sources.list" \
    -o Dir::Etc::SourceParts="$APT/none" -o Dir::Etc::Preferences="$APT/none" \
    -o Dir::Etc::PreferencesParts="$APT/none" "$@"
}

apt_lists() {
  local want="$MIRROR $SUITE $ARCHS"
  [[ -f $APT/.updated && $(cat "$APT/.updated") == "$want" ]] && return
  mkdir -p "$APT/state/lists/partial" "$APT/cache" "$APT/debs/partial" "$APT/none"
  : >"$APT/status"
  echo "deb [arch=$ARCHS signed-by=$KEYRING] $MIRROR $SUITE main" >"$APT/sources.list"
  say "apt: package lists of $SUITE ($ARCHS) from $MIRROR into a private apt state in $APT"
  apt_private update >&2
  echo "$want" >"$APT/.updated"
}

setup_tools() {
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || die "needs apt-get and dpkg-deb (a Debian or Ubuntu host)"
  [[ -f $KEYRING ]] || die "needs $KEYRING (apt-get install debian-archive-keyring)"
  local qemu hostarch
  hostarch=$(dpkg --print-architecture)
  if qemu=$(find_qemu); then
    say "qemu: $qemu"
  else
    ARCHS=arm64,$hostarch
    apt_lists
    say "qemu: downloading qemu-user-static:$hostarch and unpacking it into $CACHE/qemu"
    rm -rf "$CACHE/qemu.tmp" && mkdir -p "$CACHE/qemu.tmp"
    (cd "$APT/debs" && apt_private download "qemu-user-static:$hostarch" >&2)
    say "qemu: unpacking $(du -sh "$APT"/debs/qemu-user-static_*_"$hostarch".deb | cut -f1) .deb with dpkg-deb -x"
    dpkg-deb -x "$APT"/debs/qemu-user-static_*_"$hostarch".deb "$CACHE/qemu.tmp"
    rm -f "$APT"/debs/qemu-user-static_*.deb
    # the package holds every target (370 MB unpacked): keep the aarch64 one (13 MB)
    find "$CACHE/qemu.tmp" ! -type d ! -name qemu-aarch64-static -delete
    mv "$CACHE/qemu.tmp" "$CACHE/qemu"
    BUILT=1
  fi
}

setup_root() {
  if [[ -f $ROOT/.edgerun-root && $(cat "$ROOT/.edgerun-root") == "$SUITE $DEBS" ]]; then
    say "root: $ROOT (cached)"
    return
  fi
  BUILT=1
  apt_lists
  say "root: resolving and downloading $DEBS (arm64) with their dependencies"
  apt_private install -y --download-only --no-install-recommends $DEBS >&2
  say "root: unpacking $(ls "$APT"/debs/*.deb | wc -l) .debs ($(du -sh "$APT/debs" | cut -f1)) with dpkg-deb -x"
  rm -rf "$ROOT.tmp" && mkdir -p "$ROOT.tmp"
  for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT.tmp"; done
  echo "$SUITE $DEBS" >"$ROOT.tmp/.edgerun-root"
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
}

# The package lists are only needed while resolving: dropped, so that a later rebuild fetches
# current ones (old pool files disappear at each Debian point release).
apt_cleanup() {
  rm -rf "$APT"
}

setup_wheels() {
  # name==version as installed for the host Python (unpinned when it is not installed there)
  local pins
  pins=$("$PY" - $WHEELS <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
EOF
)
  pins=$(echo $pins)
  if [[ -f $SITE/.edgerun-wheels && $(cat "$SITE/.edgerun-wheels") == "$pins" ]]; then
    say "wheels: $SITE (cached: $pins)"
    return
  fi
  BUILT=1
  local dl=$CACHE/wheels.tmp
  rm -rf "$dl" && mkdir -p "$dl"
  local pipdl=("$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all:
               --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64
               --python-version "$PYVER" --implementation cp -d "$dl")
  say "wheels: pip download (aarch64, cp${PYVER/./}) $pins"
  if ! "${pipdl[@]}" $pins >&2; then
    for pin in $pins; do      # one by one: a version without an aarch64 wheel falls back to the newest
      "${pipdl[@]}" "$pin" >&2 || { say "wheels: no aarch64 wheel of $pin; taking the newest ${pin%%==*}"
                                    "${pipdl[@]}" "${pin%%==*}" >&2; }
    done
  fi
  say "wheels: unzipping $(ls "$dl"/*.whl | wc -l) wheels ($(du -sh "$dl" | cut -f1)) into $SITE"
  rm -rf "$SITE.tmp" && mkdir -p "$SITE.tmp"
  for whl in "$dl"/*.whl; do "$PY" -m zipfile -e "$whl" "$SITE.tmp"; done
  ls "$dl" >"$SITE.tmp/.wheels"
  echo "$pins" >"$SITE.tmp/.edgerun-wheels"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
  rm -rf "$dl"
}

run() {
  local qemu
  qemu=$(find_qemu) || die "qemu-aarch64-static not found: run '$SELF setup' first"
  [[ -f $ROOT/.edgerun-root && -f $SITE/.edgerun-wheels ]] || die "no arm64 root in $CACHE: run '$SELF setup' first"
  ulimit -c 0       # an aborting kernel compile would leave a qemu core file in the cwd
  # The repository and the unzipped wheels only (never the host's x86 site-packages); children
  # that re-run "this Python" (tools/target_check.py) do it through EDGERUN_PYTHON.
  PYTHONPATH="$REPO:$SITE" PYTHONNOUSERSITE=1 EDGERUN_PYTHON="$SELF run" \
    NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$CACHE/numba}" \
    exec "$qemu" -L "$ROOT" "$ROOT/usr/bin/python$PYVER" "$@"
}

case "${1:-}" in
  setup)
    start=$SECONDS
    mkdir -p "$CACHE"
    setup_tools
    setup_root
    setup_wheels
    apt_cleanup
    if ((BUILT)); then
      say "checking: $("$SELF" run -c 'import platform, numpy, numba, edgerun.api; print(platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__, "numba", numba.__version__)')"
    fi
    say "ready in $((SECONDS - start)) s: $CACHE ($(du -sh "$CACHE" | cut -f1))"
    ;;
  run) shift; run "$@" ;;
  path) echo "$CACHE" ;;
  *) echo "usage: $0 setup | run ARGS... | path" >&2; exit 2 ;;
esac
