#!/usr/bin/env bash
# Passthrough CPU per request: the proxy against Debian's nginx, in one run, in
# front of the same upstream, with pingora's bare forwarding path
# (examples/bare_pingora_proxy.rs) beside them as the floor of the proxy's
# stack. CPU comes from /proc/<pid>/stat (utime + stime of
# the server and its children), so a noisy machine changes the req/s but much
# less the CPU each request costs. Prints every round, the medians and the
# ratios to nginx.
#
# Settings (environment):
#   BENCH_ROUNDS=3        rounds; each round drives every target, order rotating
#   BENCH_SECONDS=10      wrk duration per target and round
#   BENCH_CONNECTIONS=32  wrk connections (fewer than either keep-alive pool)
#   BENCH_WRK_THREADS=1   wrk threads
#   BENCH_WORKERS=1       proxy threads = nginx worker processes
#   BENCH_PORT_BASE=19180 upstream, proxy, nginx and bare pingora listen on base, +1, +2, +3
#   BENCH_KEEP=1          keep the work directory (configs, logs) under /tmp
#
# The upstream is a second nginx serving one ~2 KB FHIR Patient from a file:
# the cheapest upstream there is, so its own cost stays out of the comparison,
# and it is printed anyway.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS="${BENCH_ROUNDS:-3}"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
CONNECTIONS="${BENCH_CONNECTIONS:-32}"
WRK_THREADS="${BENCH_WRK_THREADS:-1}"
WORKERS="${BENCH_WORKERS:-1}"
PORT_BASE="${BENCH_PORT_BASE:-19180}"
UPSTREAM_PORT="$PORT_BASE"
PROXY_PORT="$((PORT_BASE + 1))"
NGINX_PORT="$((PORT_BASE + 2))"
PINGORA_PORT="$((PORT_BASE + 3))"
BENCH_DB="fgp_passthrough_bench"
REQUEST_PATH="/4_0_0/Patient/x"

ensure_bench_tools() {
  local missing=()
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_all_installed
ensure_bench_tools
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
cd "$REPO_ROOT"
log "building the proxy (release)"
cargo build --release --quiet --bin fhir-group-proxy --example bare_pingora_proxy
PROXY_BIN="$CARGO_TARGET_DIR/release/fhir-group-proxy"
PINGORA_BIN="$CARGO_TARGET_DIR/release/examples/bare_pingora_proxy"

# The proxy starts with member handling on, as deployed, so it needs its stores.
start_services_for_this_script

WORK="$(mktemp -d /tmp/fgp-passthrough-bench.XXXXXX)"
# nginx workers run as an unprivileged user and read the upstream's file.
chmod 755 "$WORK"
STARTED_PIDS=()
cleanup() {
  local pid i
  for pid in "${STARTED_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  curl -sf --max-time 5 "$FGP_TEST_CLICKHOUSE_URL/" --data-binary "DROP DATABASE IF EXISTS $BENCH_DB" >/dev/null || true
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$WORK"
  if [ "$SERVICES_STARTED_HERE" -eq 1 ]; then stop_services; fi
}
trap cleanup EXIT

# A Patient of about 2 KB, the size the issue measured.
mkdir -p "$WORK/upstream/html"
{
  printf '{"resourceType":"Patient","id":"x","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00.000Z"},'
  printf '"identifier":['
  for i in $(seq 1 12); do
    [ "$i" -gt 1 ] && printf ','
    printf '{"system":"urn:oid:2.16.840.1.113883.4.%d","value":"%08d-passthrough-bench"}' "$i" "$i"
  done
  printf '],"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],'
  printf '"telecom":[{"system":"phone","value":"(03) 5555 6473","use":"work","rank":1}],'
  printf '"gender":"male","birthDate":"1974-12-25","address":[{"use":"home","type":"both",'
  printf '"text":"534 Erewhon St PeasantVille, Rainbow, Vic  3999","line":["534 Erewhon St"],'
  printf '"city":"PleasantVille","district":"Rainbow","state":"Vic","postalCode":"3999",'
  printf '"period":{"start":"1974-12-25"}}],"contact":[{"relationship":[{"coding":[{"system":'
  printf '"http://terminology.hl7.org/CodeSystem/v2-0131","code":"N"}]}],"name":{"family":'
  printf '"du Marche","given":["Benedicte"]},"telecom":[{"system":"phone","value":"+33 (237) 998327"}],'
  printf '"gender":"female","period":{"start":"2012"}}],"managingOrganization":{"reference":"Organization/1"}}'
} >"$WORK/upstream/html/patient.json"
BODY_BYTES="$(wc -c <"$WORK/upstream/html/patient.json")"

# Keep-alive without a request limit everywhere: wrk, the proxy and nginx then
# keep their connections for the whole run, and reconnects measure nothing.
cat >"$WORK/upstream/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/upstream/nginx.pid;
error_log $WORK/upstream/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.1:$UPSTREAM_PORT;
    root $WORK/upstream/html;
    location / { default_type application/fhir+json; try_files /patient.json =404; }
  }
}
NGINX

# nginx as a reverse proxy the way the issue ran it: an upstream block with
# keep-alive, HTTP/1.1 to the upstream, an access line per request to a file,
# and the same forwarding headers the proxy adds.
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<NGINX
worker_processes $WORKERS;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log $WORK/nginx/access.log combined;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  upstream legacy {
    server 127.0.0.1:$UPSTREAM_PORT;
    keepalive 64;
    keepalive_requests 100000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://legacy;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$http_host;
      # The proxy sends a generated X-Request-Id upstream and back; so does nginx.
      proxy_set_header X-Request-Id \$request_id;
      add_header X-Request-Id \$request_id;
    }
  }
}
NGINX

# Starts an nginx master in the foreground; its pid is left in STARTED_PID.
start_nginx() {
  local name="$1"
  "$NGINX" -c "$WORK/$name/nginx.conf" -p "$WORK/$name" -e "$WORK/$name/error.log" \
    </dev/null >"$WORK/$name/stdout.log" 2>&1 &
  STARTED_PID="$!"
  STARTED_PIDS+=("$STARTED_PID")
}

log "starting the upstream (nginx, static ${BODY_BYTES}-byte Patient) on 127.0.0.1:$UPSTREAM_PORT"
start_nginx upstream
UPSTREAM_PID="$STARTED_PID"
wait_until "upstream" 10 curl -sf "http://127.0.0.1:$UPSTREAM_PORT$REQUEST_PATH"

log "starting nginx (proxy_pass, $WORKERS worker(s)) on 127.0.0.1:$NGINX_PORT"
start_nginx nginx
NGINX_PID="$STARTED_PID"
wait_until "nginx" 10 curl -sf "http://127.0.0.1:$NGINX_PORT$REQUEST_PATH"

log "starting the proxy ($WORKERS thread(s)) on 127.0.0.1:$PROXY_PORT"
mkdir -p "$WORK/proxy"
FGP_LISTEN="127.0.0.1:$PROXY_PORT" FGP_ADMIN_LISTEN="" FGP_THREADS="$WORKERS" \
  FGP_UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT" \
  FGP_CLICKHOUSE_URL="$FGP_TEST_CLICKHOUSE_URL" FGP_CLICKHOUSE_DATABASE="$BENCH_DB" \
  FGP_MONGO_URI="$FGP_TEST_MONGO_URI" FGP_MONGO_DATABASE="$BENCH_DB" \
  FGP_LOG=info "$PROXY_BIN" serve </dev/null >"$WORK/proxy/stdout.log" 2>"$WORK/proxy/access.log" &
PROXY_PID="$!"
STARTED_PIDS+=("$PROXY_PID")
wait_until "proxy" 30 curl -sf "http://127.0.0.1:$PROXY_PORT$REQUEST_PATH"

log "starting bare pingora ($WORKERS thread(s)) on 127.0.0.1:$PINGORA_PORT"
mkdir -p "$WORK/pingora"
"$PINGORA_BIN" "127.0.0.1:$PINGORA_PORT" "127.0.0.1:$UPSTREAM_PORT" "$WORKERS" \
  </dev/null >"$WORK/pingora/stdout.log" 2>&1 &
PINGORA_PID="$!"
STARTED_PIDS+=("$PINGORA_PID")
wait_until "bare pingora" 30 curl -sf "http://127.0.0.1:$PINGORA_PORT$REQUEST_PATH"

# The same bytes through every target, or the comparison means nothing.
cmp -s <(curl -sf "http://127.0.0.1:$PROXY_PORT$REQUEST_PATH") "$WORK/upstream/html/patient.json" \
  || die "the proxy does not return the upstream's body unchanged"
cmp -s <(curl -sf "http://127.0.0.1:$NGINX_PORT$REQUEST_PATH") "$WORK/upstream/html/patient.json" \
  || die "nginx does not return the upstream's body unchanged"
cmp -s <(curl -sf "http://127.0.0.1:$PINGORA_PORT$REQUEST_PATH") "$WORK/upstream/html/patient.json" \
  || die "bare pingora does not return the upstream's body unchanged"

# Clock ticks of user + system time of a process and its direct children
# (nginx's workers; the proxy's threads are counted in its own line).
cpu_ticks() {
  local total=0 pid rest
  for pid in "$1" $(pgrep -P "$1" || true); do
    [ -r "/proc/$pid/stat" ] || continue
    rest="$(sed -E 's/^.*\) //' "/proc/$pid/stat")"
    # Fields 14 and 15 of stat are the 12th and 13th after "(comm) ".
    total=$((total + $(awk '{print $12 + $13}' <<<"$rest")))
  done
  echo "$total"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# One wrk run against a target; prints "requests req_per_s target_ticks upstream_ticks".
drive() {
  local port="$1" pid="$2" seconds="$3" out before after up_before up_after
  before="$(cpu_ticks "$pid")"
  up_before="$(cpu_ticks "$UPSTREAM_PID")"
  out="$(wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "${seconds}s" "http://127.0.0.1:$port$REQUEST_PATH")"
  after="$(cpu_ticks "$pid")"
  up_after="$(cpu_ticks "$UPSTREAM_PID")"
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
    printf '%s\n' "$out" >&2
    die "wrk saw errors against port $port"
  fi
  local requests rps
  requests="$(awk '/requests in/ {print $1}' <<<"$out")"
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  echo "$requests $rps $((after - before)) $((up_after - up_before))"
}

TARGETS=(proxy nginx pingora)
declare -A PORT=([proxy]="$PROXY_PORT" [nginx]="$NGINX_PORT" [pingora]="$PINGORA_PORT")
declare -A PID=([proxy]="$PROXY_PID" [nginx]="$NGINX_PID" [pingora]="$PINGORA_PID")

log "warming up the three targets (2 s each)"
for target in "${TARGETS[@]}"; do
  drive "${PORT[$target]}" "${PID[$target]}" 2 >/dev/null
done

per_request_us() { awk -v t="$1" -v n="$2" -v us="$TICK_US" 'BEGIN {printf "%.1f", t * us / n}'; }
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

log "GET $REQUEST_PATH (${BODY_BYTES}-byte body), $ROUNDS rounds of ${SECONDS_PER_RUN}s per target, wrk -t$WRK_THREADS -c$CONNECTIONS, $WORKERS worker(s)"
log "targets: proxy = fhir-group-proxy; nginx = Debian's nginx (proxy_pass, keep-alive); pingora = pingora's bare forwarding path (examples/bare_pingora_proxy.rs), the floor under the proxy"
printf '\n%-6s %-8s %10s %12s %16s %14s\n' round target req/s "cpu µs/req" "upstream µs/req" "÷ nginx"
# Per target: space-separated values, one per round.
declare -A US=() RPS=() UP=()
ratios_proxy="" ratios_pingora=""
for ((round = 1; round <= ROUNDS; round++)); do
  # Rotate which target goes first, so a drift of the machine's load during
  # a round does not always favour the same one.
  order=()
  for ((k = 0; k < ${#TARGETS[@]}; k++)); do
    order+=("${TARGETS[$(((round - 1 + k) % ${#TARGETS[@]}))]}")
  done
  declare -A this_round=()
  for target in "${order[@]}"; do
    read -r n rps ticks up_ticks < <(drive "${PORT[$target]}" "${PID[$target]}" "$SECONDS_PER_RUN")
    this_round[$target]="$(per_request_us "$ticks" "$n")"
    this_round[$target.rps]="$rps" this_round[$target.up]="$(per_request_us "$up_ticks" "$n")"
    US[$target]+=" ${this_round[$target]}" RPS[$target]+=" $rps" UP[$target]+=" ${this_round[$target.up]}"
  done
  ratios_proxy+=" $(ratio "${this_round[proxy]}" "${this_round[nginx]}")"
  ratios_pingora+=" $(ratio "${this_round[pingora]}" "${this_round[nginx]}")"
  for target in "${TARGETS[@]}"; do
    printf '%-6s %-8s %10.0f %12s %16s %14s\n' "$round" "$target" "${this_round[$target.rps]}" \
      "${this_round[$target]}" "${this_round[$target.up]}" "$(ratio "${this_round[$target]}" "${this_round[nginx]}")"
  done
  unset this_round
done

declare -A M=()
for target in "${TARGETS[@]}"; do
  M[$target]="$(median <<<"${US[$target]}")"
done
for target in "${TARGETS[@]}"; do
  printf '%-6s %-8s %10.0f %12s %16s %14s\n' median "$target" "$(median <<<"${RPS[$target]}")" \
    "${M[$target]}" "$(median <<<"${UP[$target]}")" "$(ratio "${M[$target]}" "${M[nginx]}")"
done
printf '\nproxy / nginx CPU per request: %s (median of medians: %s / %s; median of the rounds: %s)\n' \
  "$(ratio "${M[proxy]}" "${M[nginx]}")" "${M[proxy]}" "${M[nginx]}" "$(median <<<"$ratios_proxy")"
printf "bare pingora / nginx: %s (median of the rounds: %s): the floor of the proxy's stack\n" \
  "$(ratio "${M[pingora]}" "${M[nginx]}")" "$(median <<<"$ratios_pingora")"
printf 'proxy / bare pingora: %s: what the proxy adds to pingora\n' "$(ratio "${M[proxy]}" "${M[pingora]}")"
printf 'access lines written: proxy %s, nginx %s\n' \
  "$(grep -c 'request done' "$WORK/proxy/access.log" || true)" "$(wc -l <"$WORK/nginx/access.log")"
