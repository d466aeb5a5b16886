#!/usr/bin/env bash
# Benchmarks (not tests): member PATCH through the proxy vs the legacy path, in
# one run on this machine. Starts ClickHouse and FerretDB like the tests do.
# FGP_BENCH_SIZES=1000,100000 limits the group sizes; FGP_BENCH_RATIO=0 skips the
# store-ratio rows; FGP_BENCH_THROUGHPUT=0 skips
# the (slow) throughput rows; FGP_BENCH_PASSTHROUGH=0 skips the passthrough CPU
# comparison against nginx (scripts/passthrough-bench.sh, which then runs last).
# The benches' ClickHouse databases (Groups of up to a million members) are
# dropped at the end; FGP_KEEP_TEST_DATABASES=1 keeps them.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_all_installed
start_services_for_this_script
cd "$REPO_ROOT"
begin_test_run
set +e
cargo bench --bench member_patch --bench group_read "$@"
status=$?
set -e
end_test_run --release
[ "$status" -eq 0 ] || exit "$status"
if [ "${FGP_BENCH_PASSTHROUGH:-1}" != 0 ]; then
  bash "$REPO_ROOT/scripts/passthrough-bench.sh"
fi
