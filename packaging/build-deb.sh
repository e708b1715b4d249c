#!/usr/bin/env bash
# Builds pointgate's release binary and its Debian package for one architecture:
#
#   packaging/build-deb.sh amd64|arm64|armhf [cargo-deb options...]
#   packaging/build-deb.sh arm64 --deb-version 0.1.1     # e.g. a test upgrade
#
# Prints the path of the .deb (last line of output). On a fresh Debian (bookworm or newer)
# it first installs what it needs, only if missing: the cross gcc (apt), the Rust target
# (rustup target add; never `rustup update`), cargo-deb (cargo install --locked).
#
# Cross linking: the per-target linker and C compiler are set here through environment
# variables, not in .cargo/config.toml, so that a plain `cargo build` on a developer's
# machine never needs a cross gcc and cross-rs users keep their container's settings
# (cross.toml). ring builds its C and assembly with CC_<target>.
set -euo pipefail

cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 amd64|arm64|armhf [cargo-deb options...]" >&2
    exit 64
}

[[ $# -ge 1 ]] || usage
arch=$1
shift

case "$arch" in
amd64)
    target=x86_64-unknown-linux-gnu
    gcc=
    gcc_pkg=
    ;;
arm64)
    target=aarch64-unknown-linux-gnu
    gcc=aarch64-linux-gnu-gcc
    gcc_pkg=gcc-aarch64-linux-gnu
    ;;
armhf)
    target=armv7-unknown-linux-gnueabihf
    gcc=arm-linux-gnueabihf-gcc
    gcc_pkg=gcc-arm-linux-gnueabihf
    ;;
*) usage ;;
esac

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# ---- what the build needs ----
apt_missing=()
if [[ -n "$gcc" ]] && ! command -v "$gcc" >/dev/null 2>&1; then
    apt_missing+=("$gcc_pkg")
fi
# cargo-deb computes Depends ($auto) with dpkg-shlibdeps.
command -v dpkg-shlibdeps >/dev/null 2>&1 || apt_missing+=(dpkg-dev)
command -v git >/dev/null 2>&1 || apt_missing+=(git)
if [[ ${#apt_missing[@]} -gt 0 ]]; then
    echo "installing: ${apt_missing[*]}" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${apt_missing[@]}" >&2
fi
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target" >&2
fi
if ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --locked >&2
fi

# ---- build ----
if [[ -n "$gcc" ]]; then
    triple_env=$(echo "$target" | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${triple_env}_LINKER=$gcc"
    export "CC_${target//-/_}=$gcc"
fi
# build.rs stamps `pointgate --version` with this; a tarball without .git says so.
if [[ -z "${PG_GIT_REV:-}" ]]; then
    PG_GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    export PG_GIT_REV
fi

# cargo-deb builds with the release profile (Cargo.toml) for the target, then packages.
# --locked: the same dependency versions as CI.
cargo deb --target "$target" "$@" -- --locked >&2
out=${CARGO_TARGET_DIR:-target}/$target
deb=$(ls -t "$out"/debian/pointgate_*.deb | head -n 1)
echo "built $(du -h "$deb" | cut -f1) $deb; binary $(du -h "$out"/release/pointgate | cut -f1)" >&2
echo "$deb"
