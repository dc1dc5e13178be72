#!/usr/bin/env bash
# Builds the four Lambda functions (aggregate, alerts, query, replay) as zips for
# template.yaml, with cargo-lambda, and reports their sizes.
#
#   deploy/build.sh            arm64, what template.yaml deploys
#   deploy/build.sh --x86_64   x86_64 (or IOTPIPE_LAMBDA_ARCH=x86_64), for
#                              machines without the aarch64 Rust target
#
# Needs cargo-lambda (pip install cargo-lambda, which brings zig). For arm64
# also: rustup target add aarch64-unknown-linux-gnu. The zips land in
# deploy/dist/{aggregate,alerts,query,replay}.zip.
set -euo pipefail

arch="${IOTPIPE_LAMBDA_ARCH:-arm64}"
for arg in "$@"; do
    case "$arg" in
        --x86_64 | --x86-64) arch=x86_64 ;;
        --arm64) arch=arm64 ;;
        -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done
case "$arch" in
    arm64) arch_flag=--arm64 triple=aarch64-unknown-linux-gnu ;;
    x86_64) arch_flag=--x86-64 triple=x86_64-unknown-linux-gnu ;;
    *) echo "IOTPIPE_LAMBDA_ARCH must be arm64 or x86_64, not $arch" >&2; exit 2 ;;
esac

if ! command -v cargo-lambda >/dev/null; then
    echo "cargo-lambda is not installed: pip install cargo-lambda" >&2
    exit 1
fi

deploy="$(cd "$(dirname "$0")" && pwd)"
cd "$deploy/.."
# cargo-lambda refuses --target-dir; it follows CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# Smaller zips, faster cold starts: no debug info, symbols stripped.
export CARGO_PROFILE_RELEASE_DEBUG=false
export CARGO_PROFILE_RELEASE_STRIP=symbols
export CARGO_PROFILE_RELEASE_LTO=thin
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=4

out="$CARGO_TARGET_DIR/lambda-$arch"
cargo lambda build --release "$arch_flag" --package processors \
    --bin aggregate --bin alerts --bin query --bin replay \
    --output-format zip --lambda-dir "$out"

mkdir -p "$deploy/dist"
for function in aggregate alerts query replay; do
    cp "$out/$function/bootstrap.zip" "$deploy/dist/$function.zip"
    zip_bytes=$(stat -c %s "$deploy/dist/$function.zip")
    binary_bytes=$(unzip -l "$deploy/dist/$function.zip" | awk '$4 == "bootstrap" {print $1}')
    awk -v f="$function" -v a="$arch" -v z="$zip_bytes" -v b="$binary_bytes" 'BEGIN {
        printf "%-9s %s: zip %d bytes (%.2f MiB), bootstrap %d bytes (%.2f MiB)\n", f, a, z, z / 1048576, b, b / 1048576
    }'
done
echo "unzipped binaries, e.g. for the cold-start example: $CARGO_TARGET_DIR/$triple/release/{aggregate,alerts,query,replay}"
