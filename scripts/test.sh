#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing (Mesa's lavapipe, a
# software Vulkan driver; OpenMPI and libclang for the `mpi` feature), then runs formatting,
# lints and the whole test suite with GPU tests required: the workspace with the `mpi` feature
# (its tests run `mpirun -n 2` and `-n 3`), and the library without its `gpu` feature (the
# CPU-only build must build and pass its tests without wgpu).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# (`compgen -G`: either folder may hold the driver's manifest; `ls` of both fails if one is empty.)
compgen -G '/usr/share/vulkan/icd.d/*.json' >/dev/null || compgen -G '/etc/vulkan/icd.d/*.json' >/dev/null ||
    need_apt+=(mesa-vulkan-drivers)
command -v mpirun >/dev/null && command -v mpicc >/dev/null || need_apt+=(openmpi-bin libopenmpi-dev)
# bindgen (for the mpi crate) needs libclang and clang's own headers.
{ compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' || compgen -G '/usr/lib/*/libclang*.so*'; } >/dev/null &&
    compgen -G '/usr/lib/llvm-*/lib/clang/*/include/stddef.h' >/dev/null || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "missing ${need_apt[*]} and cannot install them (need root and apt-get)" >&2
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

# The distributed tests start several processes on however many cores there are.
export OMPI_MCA_rmaps_base_oversubscribe=1

MPI=(--features xent/mpi,xent-cli/mpi)
cargo fmt --all --check
cargo clippy --workspace --release --all-targets "${MPI[@]}" -- -D warnings
cargo clippy -p xent --release --no-default-features --all-targets -- -D warnings
# xent-burn without its `gpu` feature (Flex only) must build too.
cargo clippy -p xent-burn --release --no-default-features --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --release "${MPI[@]}"
cargo test --workspace --release "${MPI[@]}"
# Which CPU matrix-product kernels the tests ran on this machine and which they skipped, and why.
cargo test --workspace --release "${MPI[@]}" --test cpu_matmul -- --nocapture --exact the_kernels_on_this_cpu
# Whether the framework ops' `set_cpu` precision could be told apart on this CPU's kernels.
cargo test --workspace --release "${MPI[@]}" --test cpu_backend -- --nocapture
# On a CPU without AMX, the AMX instructions under the unit tests' trap-and-emulate harness: how many ran.
cargo test --workspace --release "${MPI[@]}" --lib -- --nocapture emulat
cargo test -p xent --release --no-default-features
