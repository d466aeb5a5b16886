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
log "module graph: no new import cycles, no upward imports"
python3 scripts/module-graph.py
log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# This run's databases, and only this run's, are dropped at the end.
begin_test_run
log "cargo test (target dir: $CARGO_TARGET_DIR, test run $FGP_TEST_RUN_ID)"
mkdir -p "$RUN_DIR"
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$RUN_DIR/cargo-test.log"
status=${PIPESTATUS[0]}
set -e
end_test_run
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' \
  "$RUN_DIR/cargo-test.log"
exit "$status"
