#!/usr/bin/env bash
# Installs what is missing and runs the demo stack on 127.0.0.1:
#   ClickHouse :18123, FerretDB :27018, the STAND-IN legacy FHIR server :18080,
#   and fhir-group-proxy in front of it on :8080 (foreground; Ctrl-C stops what
#   this script started).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROXY_PORT="${FGP_DEMO_PROXY_PORT:-8080}"
STANDIN_PORT="${FGP_DEMO_STANDIN_PORT:-18080}"
ADMIN_PORT="${FGP_DEMO_ADMIN_PORT:-9090}"
# One name for the stand-in's MongoDB database and the proxy's ClickHouse one.
DEMO_DATABASE="${FGP_DEMO_DATABASE:-fhir_demo}"

ensure_all_installed
start_services_for_this_script
cd "$REPO_ROOT"
log "building (release)"
cargo build --release --workspace --quiet
bin="$CARGO_TARGET_DIR/release"

cleanup() {
  [ -n "${standin_pid:-}" ] && kill "$standin_pid" 2>/dev/null
  if [ "$SERVICES_STARTED_HERE" -eq 1 ]; then stop_services; fi
}
trap cleanup EXIT

mkdir -p "$RUN_DIR/standin"
"$bin/standin-legacy-fhir" --listen "127.0.0.1:$STANDIN_PORT" \
  --mongo-uri "$FGP_TEST_MONGO_URI" --database "$DEMO_DATABASE" \
  </dev/null >"$RUN_DIR/standin/log" 2>&1 &
standin_pid=$!
wait_until "stand-in legacy FHIR server" 30 port_open "$STANDIN_PORT"

cat >&2 <<MSG

  fhir-group-proxy demo stack
  ---------------------------
  proxy (use this)           http://127.0.0.1:$PROXY_PORT/4_0_0
  admin (metrics, health)    http://127.0.0.1:$ADMIN_PORT/metrics  /healthz  /readyz
  stand-in legacy server     http://127.0.0.1:$STANDIN_PORT/4_0_0   (log: $RUN_DIR/standin/log)
  ClickHouse                 $FGP_TEST_CLICKHOUSE_URL
  FerretDB (MongoDB wire)    $FGP_TEST_MONGO_URI  database $DEMO_DATABASE

  try:
    curl -s -XPUT localhost:$PROXY_PORT/4_0_0/Group/demo -H 'content-type: application/fhir+json' \\
         -d '{"resourceType":"Group","id":"demo","type":"person","actual":true,"member":[],
              "meta":{"source":"https://demo","security":[{"system":"https://www.icanbwell.com/owner","code":"demo"}]}}'
    curl -s -XPATCH localhost:$PROXY_PORT/4_0_0/Group/demo -H 'content-type: application/json-patch+json' \\
         -d '[{"op":"add","path":"/member/-","value":{"entity":{"reference":"Patient/1"}}}]'
    curl -s localhost:$PROXY_PORT/4_0_0/Group/demo
  Ctrl-C stops everything.

MSG

FGP_LISTEN="127.0.0.1:$PROXY_PORT" FGP_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
FGP_UPSTREAM_URL="http://127.0.0.1:$STANDIN_PORT" \
FGP_CLICKHOUSE_URL="$FGP_TEST_CLICKHOUSE_URL" FGP_CLICKHOUSE_DATABASE="$DEMO_DATABASE" \
FGP_MONGO_URI="$FGP_TEST_MONGO_URI" FGP_MONGO_DATABASE="$DEMO_DATABASE" \
  "$bin/fhir-group-proxy" --config "$REPO_ROOT/config/fhir-group-proxy.toml" serve
