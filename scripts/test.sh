#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: installs what is missing, starts
# real ClickHouse and FerretDB on 127.0.0.1, checks formatting and lints, then
# runs every test. Services this script started are stopped at the end.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_all_installed
start_services_for_this_script

cd "$REPO_ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo test (target dir: $CARGO_TARGET_DIR)"
cargo test --workspace --no-fail-fast
