#!/usr/bin/env bash
# The test command: installs a Vulkan driver if none is present (Mesa's lavapipe, a software
# GPU), then runs formatting, lints and the whole test suite with GPU tests required.
set -euo pipefail
cd "$(dirname "$0")/.."

has_vulkan_driver() {
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | grep -q .
}
if ! has_vulkan_driver; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "no Vulkan driver found: installing mesa-vulkan-drivers (lavapipe)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers >/dev/null
    else
        echo "no Vulkan driver found and cannot install one (need root and apt-get)" >&2
        exit 1
    fi
fi

# GPU tests fail (rather than skip) without an adapter.
export XENT_REQUIRE_GPU=1
# Mesa warns on every process without a valid runtime dir.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
    XDG_RUNTIME_DIR=$(mktemp -d)
    export XDG_RUNTIME_DIR
fi

cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release
