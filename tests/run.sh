#!/usr/bin/env bash
# Installs what the test suite needs and runs it: the one command for "test everything".
#
#   tests/run.sh                      # install (cached after the first run), then all tests
#   tests/run.sh --no-fail-fast       # extra arguments go to `cargo test --workspace`
#   tests/run.sh -- --nocapture       # ... including the test binaries' own arguments
#
# For one crate or test file, run install.sh once and then cargo directly, e.g.
#   cargo test -p spokelet-e2e --test smoke
#
# The first run on a fresh Debian 12 machine installs Debian packages and builds Kubernetes,
# etcd and OCM from the Go module proxy (about 18 minutes in all); later runs reuse them
# (seconds). See tests/env/install.sh.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

run() {
  printf '+ %s\n' "$*" >&2
  "$@"
}

run tests/env/install.sh
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install a Rust toolchain (rustup)" >&2; exit 1; }
# Not --all-targets: that would also run the benchmarks (harness = false) as tests.
# Benchmarks are run on purpose with `cargo bench`; clippy still checks them in CI.
run cargo test --workspace "$@"
