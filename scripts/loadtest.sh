#!/usr/bin/env bash
# Load test: the balancer against HAProxy and NGINX, configured equivalently, on 127.0.0.1.
#
# Starts two nginx origins (1 worker each), then, for every rep, scenario and proxy (interleaved:
# balancer, haproxy, nginx, balancer, haproxy, nginx, ...), starts the proxy fresh pinned to its
# own CPU, checks it answers, warms it up and runs wrk (pinned with the origins to the other CPU).
# Reports per run: requests/s, p50/p99 latency, CPU time per request of the proxy's own process
# tree (utime+stime from /proc before and after the wrk run; io_uring kernel workers are threads
# of the balancer's process and count), peak RSS, and for the balancer the upstream connection
# reuse ratio from its /metrics. Then a summary per scenario: medians, and paired median ratios
# balancer/HAProxy and balancer/NGINX (per rep, then median). Plus the idle RSS of a 2-shard balancer.
#
# Usage: scripts/loadtest.sh [--quick] [--reps N] [--duration S] [--scenarios small,big,close,css]
#          [--proxies balancer,haproxy,nginx] [--out FILE] [--warmup S] [--conns N]
#          [--proxy-cpu N] [--load-cpu N] [--port P] [--max-noise PCT] [--build]
#          [--balancer-bin PATH] [--keep-tmp]     (--help describes every option and output field)
#
# Every loop and wait is bounded; only 127.0.0.1 is used; everything started is stopped by PID
# (its own process group) on exit; temporary files live in one mktemp directory.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/loadtest.sh [options]

  --reps N             interleaved repetitions (default 3)
  --duration S         seconds of each measured wrk run (default 5)
  --warmup S           seconds of wrk warm-up before each measured run (default 1)
  --quick              smoke run: 1 rep of 2 s (later --reps/--duration still override)
  --scenarios LIST     comma list of small,big,close,css (default: all)
  --proxies LIST       comma list of balancer,haproxy,nginx (default: all, in that order)
  --conns N            wrk connections (default 64)
  --proxy-cpu N        CPU for the proxy under test (default 0)
  --load-cpu N         CPU for wrk and the origins (default 1)
  --port P             proxy listen port (default 8080); origins use 9001 and 9002
  --out FILE           also write the per-run lines and the summary to FILE
  --no-defer-accept    plain listeners: without it every proxy hands over a new connection only
                       once its request has arrived (TCP_DEFER_ACCEPT: NGINX `listen ... deferred`,
                       HAProxy `bind ... defer-accept`, balancer BALANCER_DEFER_ACCEPT=on)
  --max-noise PCT      mark a run noisy=1 when other processes took over PCT % of the proxy CPU
                       (or steal exceeded it); the summary warns about noisy runs (default 10)
  --build              run `cargo build --release --bins` first (default: only if the binary is missing)
  --balancer-bin PATH  balancer binary (default target/release/balancer)
  --keep-tmp           keep the temporary directory (configs, logs, wrk outputs)
  --instructions       instead of the CPU runs: the balancer alone (1 shard) under valgrind's
                       callgrind, one run per scenario (--warmup, then --duration; 2 s and 5 s
                       are plenty), printing its user-space instructions per request. Those do
                       not move with the machine's noise, so a change of 1 % shows; kernel work
                       is not counted. Needs valgrind (apt-get install valgrind).
  --summarize FILE     no runs: print the summary of the per-run lines in FILE (an earlier
                       --out file); scenarios, proxies and reps are taken from those lines
  -h, --help           this text

Scenarios: small = GET / (small body, keep-alive); big = GET /big64k (65,536-byte body, no-store);
close = GET / with `Connection: close` (new client connection per request);
css = GET /static/style.css (Cache-Control: max-age=60): a cache hit in every proxy.

Output: a header, the idle RSS of a 2-shard balancer, one line per run, then a summary.
Per-run fields: rps, p50_ms, p99_ms (wrk --latency); cpu_us_per_req = utime+stime of the
proxy's whole process tree (all threads, io_uring workers included) over the measured run,
divided by the requests wrk completed; sys_pct = kernel share of it; rss_mib = summed VmHWM of
the tree; proxy_cores = proxy CPU seconds per wall second; origin_us_per_req = the same for the
two origins; requests, errors (socket errors), non2xx; backends_seen = distinct X-Backend values
over 16 checked requests (1 is expected for css); tasks = threads in the tree;
proxy_cpu_busy_pct / load_cpu_busy_pct (/proc/stat); proxy_cpu_other_pct = proxy CPU busy time
not used by the proxy (other processes: noise); steal_pct; noisy; for the balancer reuse_pct =
reused / (created + reused) upstream connections and cache_hit_pct over the run, from /metrics;
valid = 0 when the proxy died, wrk failed, or errors + non-2xx exceed 0.1 %.
Summary: per scenario and proxy the medians over valid reps; then the paired ratios
balancer/peer of CPU per request, req/s and p99 (per rep, then the median over reps), and
"vs best peer" = median over reps of balancer CPU / the lowest peer CPU of that rep.
Exit status: 0 when every run was valid, 1 otherwise (or on a setup error).
EOF
}

die() { echo "loadtest: $*" >&2; exit 1; }
log() { echo "loadtest: $*" >&2; }

# ------------------------------------------------------------------ options
REPS=3 DURATION=5 WARMUP=1 CONNS=64 MAX_NOISE=10 PROXY_CPU=0 LOAD_CPU=1 PORT=8080
ORIGIN_PORT1=9001 ORIGIN_PORT2=9002
SCENARIOS=small,big,close,css PROXIES=balancer,haproxy,nginx
OUT= BUILD=0 KEEP_TMP=0 BALANCER_BIN= INSTRUCTIONS=0 SUMMARIZE= DEFER_ACCEPT=on
while (($#)); do
    case $1 in
        --reps) REPS=${2:?--reps needs a value}; shift 2 ;;
        --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
        --warmup) WARMUP=${2:?--warmup needs a value}; shift 2 ;;
        --quick) REPS=1 DURATION=2; shift ;;
        --scenarios) SCENARIOS=${2:?--scenarios needs a value}; shift 2 ;;
        --proxies) PROXIES=${2:?--proxies needs a value}; shift 2 ;;
        --conns) CONNS=${2:?--conns needs a value}; shift 2 ;;
        --proxy-cpu) PROXY_CPU=${2:?--proxy-cpu needs a value}; shift 2 ;;
        --load-cpu) LOAD_CPU=${2:?--load-cpu needs a value}; shift 2 ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        --no-defer-accept) DEFER_ACCEPT=off; shift ;;
        --max-noise) MAX_NOISE=${2:?--max-noise needs a value}; shift 2 ;;
        --build) BUILD=1; shift ;;
        --balancer-bin) BALANCER_BIN=${2:?--balancer-bin needs a value}; shift 2 ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        --instructions) INSTRUCTIONS=1; shift ;;
        --summarize) SUMMARIZE=${2:?--summarize needs a file}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

# The peers' spelling of deferred accept, on their listen lines.
NGINX_DEFER= HAPROXY_DEFER=
[[ $DEFER_ACCEPT == on ]] && NGINX_DEFER=' deferred' HAPROXY_DEFER=' defer-accept'

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in REPS DURATION CONNS PROXY_CPU LOAD_CPU PORT; do
    o=${v,,}; is_uint "${!v}" || die "--${o//_/-} must be a non-negative integer, got '${!v}'"
done
is_uint "$MAX_NOISE" || die "--max-noise must be a non-negative integer, got '$MAX_NOISE'"
is_uint "$WARMUP" || die "--warmup must be a non-negative integer, got '$WARMUP'"
((REPS >= 1 && REPS <= 100)) || die "--reps must be 1..100"
((DURATION >= 1 && DURATION <= 600)) || die "--duration must be 1..600 seconds"
((WARMUP <= 60)) || die "--warmup must be 0..60 seconds"
((CONNS >= 1 && CONNS <= 4096)) || die "--conns must be 1..4096"
((PORT >= 1 && PORT <= 65535)) || die "--port must be 1..65535"
((PROXY_CPU != LOAD_CPU)) || die "--proxy-cpu and --load-cpu must differ"

declare -A SC_PATH SC_HDR SC_LEN
ALL_SCENARIOS=(small big close css)
ALL_PROXIES=(balancer haproxy nginx)
IFS=, read -r -a SCEN_LIST <<<"$SCENARIOS"
IFS=, read -r -a PROXY_LIST <<<"$PROXIES"
for s in "${SCEN_LIST[@]}"; do
    [[ " ${ALL_SCENARIOS[*]} " == *" $s "* ]] || die "unknown scenario '$s' (small, big, close, css)"
done
for p in "${PROXY_LIST[@]}"; do
    [[ " ${ALL_PROXIES[*]} " == *" $p "* ]] || die "unknown proxy '$p' (balancer, haproxy, nginx)"
done
((${#SCEN_LIST[@]})) || die "no scenario given"
((${#PROXY_LIST[@]})) || die "no proxy given"
WITH_BALANCER=0
[[ " ${PROXY_LIST[*]} " == *" balancer "* ]] && WITH_BALANCER=1
((INSTRUCTIONS)) && PROXY_LIST=(balancer) WITH_BALANCER=1

# ------------------------------------------------------------------ summary
summary() {
    awk -v scens="$SCENARIOS" -v proxies="$PROXIES" -v reps="$REPS" -v maxnoise="$MAX_NOISE" '
    function sortn(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    }
    function median(a, n) {
        if (n == 0) return "NA"
        sortn(a, n)
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function med(s, p, k,   r, n, a) {   # median over valid reps of field k
        n = 0; split("", a)
        for (r = 1; r <= reps; r++)
            if (((s, p, r) in ok) && v[s, p, r, k] != "NA" && v[s, p, r, k] != "") a[++n] = v[s, p, r, k] + 0
        return median(a, n)
    }
    function ratio(s, p, k,   r, n, a) {   # median over reps of balancer/p for field k
        n = 0; split("", a)
        for (r = 1; r <= reps; r++)
            if (((s, "balancer", r) in ok) && ((s, p, r) in ok) && v[s, p, r, k] > 0)
                a[++n] = v[s, "balancer", r, k] / v[s, p, r, k]
        return median(a, n)
    }
    function best(s,   r, n, a, b, i, m, ok2) {   # median over reps of balancer / best peer CPU
        n = 0; split("", a)
        for (r = 1; r <= reps; r++) {
            if (!((s, "balancer", r) in ok)) continue
            m = -1; ok2 = 1
            for (i = 1; i <= np; i++) {
                if (P[i] == "balancer") continue
                if (!((s, P[i], r) in ok) || v[s, P[i], r, "cpu_us_per_req"] <= 0) { ok2 = 0; break }
                if (m < 0 || v[s, P[i], r, "cpu_us_per_req"] < m) m = v[s, P[i], r, "cpu_us_per_req"]
            }
            if (ok2 && m > 0) a[++n] = v[s, "balancer", r, "cpu_us_per_req"] / m
        }
        return median(a, n)
    }
    function f(x, fmt) { return x == "NA" ? "NA" : sprintf(fmt, x) }
    function fr(x) { return x == "NA" ? "NA" : sprintf("%.2fx", x) }
    {
        delete kv
        for (i = 1; i <= NF; i++) { e = index($i, "="); kv[substr($i, 1, e - 1)] = substr($i, e + 1) }
        s = kv["scenario"]; p = kv["proxy"]; r = kv["rep"]
        runs++; if (kv["noisy"] == 1) noisy++
        if (kv["valid"] != 1) { bad[s, p]++; next }
        ok[s, p, r] = 1
        # Numbers are stored as numbers: awk compares two strings as text, so "13.06" < "9.03".
        for (k in kv) v[s, p, r, k] = (kv[k] ~ /^-?[0-9]+([.][0-9]+)?$/) ? kv[k] + 0 : kv[k]
    }
    END {
        ns = split(scens, S, ","); np = split(proxies, P, ",")
        haspeer = 0; hasbal = 0
        for (i = 1; i <= np; i++) { if (P[i] == "balancer") hasbal = 1; else haspeer++ }
        printf "\n## Summary: medians over %d rep(s), valid runs only\n\n", reps
        if (noisy > 0)
            printf "WARNING: %d of %d runs were noisy (other processes used over %d%% of the proxy CPU, or steal):\nthe machine was not quiet and these numbers are not a reliable comparison.\n\n", noisy, runs, maxnoise
        printf "| scenario | proxy | runs | req/s | p50 ms | p99 ms | CPU µs/req | sys %% | peak RSS MiB | upstream reuse %% | origin µs/req |\n"
        printf "|---|---|---|---|---|---|---|---|---|---|---|\n"
        for (i = 1; i <= ns; i++) for (j = 1; j <= np; j++) {
            s = S[i]; p = P[j]; n = 0
            for (r = 1; r <= reps; r++) if ((s, p, r) in ok) n++
            printf "| %s | %s | %d%s | %s | %s | %s | %s | %s | %s | %s | %s |\n", s, p, n,
                ((s, p) in bad) ? sprintf(" (+%d invalid)", bad[s, p]) : "",
                f(med(s, p, "rps"), "%.0f"), f(med(s, p, "p50_ms"), "%.3f"), f(med(s, p, "p99_ms"), "%.3f"),
                f(med(s, p, "cpu_us_per_req"), "%.2f"), f(med(s, p, "sys_pct"), "%.0f"),
                f(med(s, p, "rss_mib"), "%.1f"), p == "balancer" ? f(med(s, p, "reuse_pct"), "%.2f") : "-",
                f(med(s, p, "origin_us_per_req"), "%.2f")
        }
        if (!hasbal || !haspeer) exit
        printf "\n## Paired ratios balancer/peer (per rep, then median); CPU: lower is better, req/s: higher is better\n\n"
        printf "| scenario | CPU/req vs best peer |"
        for (j = 1; j <= np; j++) if (P[j] != "balancer") printf " CPU/req vs %s | req/s vs %s | p99 vs %s |", P[j], P[j], P[j]
        printf "\n|---|---|"
        for (j = 1; j <= np; j++) if (P[j] != "balancer") printf "---|---|---|"
        printf "\n"
        for (i = 1; i <= ns; i++) {
            s = S[i]
            printf "| %s | %s |", s, fr(best(s))
            for (j = 1; j <= np; j++) if (P[j] != "balancer")
                printf " %s | %s | %s |", fr(ratio(s, P[j], "cpu_us_per_req")), fr(ratio(s, P[j], "rps")),
                    fr(ratio(s, P[j], "p99_ms"))
            printf "\n"
        }
    }' "$RESULTS"
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
[[ -n $OUT && $OUT != /* ]] && OUT="$ROOT/$OUT"
if [[ -n $OUT ]]; then : >"$OUT" || die "cannot write --out $OUT"; fi

# --summarize: the summary of earlier runs, from their lines; nothing is started.
if [[ -n $SUMMARIZE ]]; then
    [[ -r $SUMMARIZE ]] || die "cannot read --summarize $SUMMARIZE"
    RESULTS=$(mktemp "${TMPDIR:-/tmp}/loadtest-summary.XXXXXX")
    trap 'rm -f "$RESULTS"' EXIT
    grep '^proxy=' "$SUMMARIZE" >"$RESULTS" || die "no per-run lines (proxy=...) in $SUMMARIZE"
    field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" "$RESULTS"; }
    SCENARIOS=$(field scenario | awk '!seen[$0]++' | paste -sd,)
    PROXIES=$(sed -n 's/^proxy=\([^ ]*\).*/\1/p' "$RESULTS" | awk '!seen[$0]++' | paste -sd,)
    REPS=$(field rep | sort -n | tail -n1)
    summary | if [[ -n $OUT ]]; then tee -a "$OUT"; else cat; fi
    exit 0
fi

# ------------------------------------------------------------------ tools and binary
need=()
for t in wrk haproxy nginx curl taskset timeout setsid; do
    command -v "$t" >/dev/null 2>&1 || need+=("$t")
done
if ((${#need[@]})); then
    pkgs=()
    for t in "${need[@]}"; do
        case $t in
            wrk | haproxy | curl) pkgs+=("$t") ;;
            nginx) pkgs+=(nginx-light) ;;
            *) die "missing $t (util-linux / coreutils)" ;;
        esac
    done
    ((EUID == 0)) && command -v apt-get >/dev/null 2>&1 ||
        die "missing ${need[*]}: apt-get install -y ${pkgs[*]}"
    log "installing ${pkgs[*]} (apt-get)"
    timeout 600 apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "${pkgs[@]}" >&2 ||
        die "apt-get install ${pkgs[*]} failed"
fi
NGINX=$(command -v nginx) HAPROXY=$(command -v haproxy)
if ((INSTRUCTIONS)); then
    command -v valgrind >/dev/null 2>&1 && command -v callgrind_control >/dev/null 2>&1 ||
        die "--instructions needs valgrind: apt-get install -y valgrind"
fi

allowed=$(taskset -cp $$ | sed 's/.*: //')
cpu_allowed() { # CPU in a taskset list like 0,2-3
    local part lo hi
    IFS=, read -r -a parts <<<"$allowed"
    for part in "${parts[@]}"; do
        lo=${part%-*} hi=${part#*-}
        (($1 >= lo && $1 <= hi)) && return 0
    done
    return 1
}
cpu_allowed "$PROXY_CPU" || die "CPU $PROXY_CPU is not usable here (allowed: $allowed)"
cpu_allowed "$LOAD_CPU" || die "CPU $LOAD_CPU is not usable here (allowed: $allowed)"

if ((WITH_BALANCER)); then
    if [[ -z $BALANCER_BIN ]]; then
        BALANCER_BIN=$ROOT/target/release/balancer
        if ((BUILD)) || [[ ! -x $BALANCER_BIN ]]; then
            command -v cargo >/dev/null 2>&1 || die "cargo not found: cannot build $BALANCER_BIN"
            log "building the release binary (cargo build --release --bins)"
            cargo build --release --bins >&2 || die "cargo build failed"
        fi
        if [[ -n $(find src Cargo.toml Cargo.lock -newer "$BALANCER_BIN" -print -quit 2>/dev/null) ]]; then
            log "warning: $BALANCER_BIN is older than the sources; pass --build to rebuild"
        fi
    fi
    [[ -x $BALANCER_BIN ]] || die "balancer binary '$BALANCER_BIN' missing or not executable"
fi

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$PORT" "$ORIGIN_PORT1" "$ORIGIN_PORT2"; do
    port_taken "$p" && die "127.0.0.1:$p is already in use"
done

# ------------------------------------------------------------------ temp dir, process bookkeeping
TMP=$(mktemp -d "${TMPDIR:-/tmp}/loadtest.XXXXXX")
chmod 755 "$TMP"
STARTED=()   # PIDs (each the leader of its own process group) still to stop
WRK_PID=

alive() { # running, not a zombie
    local s
    read -r s 2>/dev/null <"/proc/$1/stat" || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z ]]
}

# Stops one process we started: SIGTERM, up to 5 s; if it is still running then, SIGKILL of its
# own process group (whose id is its PID: it is still alive, so the id is still ours), then
# reaps it. Sets STOP_STATUS to its exit status.
STOP_STATUS=0
stop_pid() {
    local pid=$1 i
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.05; done
        if alive "$pid"; then
            log "PID $pid did not stop within 5 s of SIGTERM; killing its process group"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    STOP_STATUS=0
    wait "$pid" 2>/dev/null || STOP_STATUS=$?
    local keep=() p
    for p in "${STARTED[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}

cleanup() {
    local rc=$? i
    set +e   # stop everything even if one step fails
    trap - EXIT INT TERM
    if [[ -n $WRK_PID ]]; then
        kill -TERM "$WRK_PID" 2>/dev/null || true
        wait "$WRK_PID" 2>/dev/null || true
    fi
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_pid "${STARTED[i]}"; done
    if ((KEEP_TMP)); then log "temporary files kept in $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background as the leader of its own process group, pinned to CPU list $1.
# Sets STARTED_PID. stdout+stderr go to $2.
start_bg() {
    local cpus=$1 logf=$2
    shift 2
    setsid taskset -c "$cpus" "$@" >"$logf" 2>&1 </dev/null &
    STARTED_PID=$!
    STARTED+=("$STARTED_PID")
}

wait_port() { # pid port seconds: 0 when the port accepts, 1 if the process died or time ran out
    local pid=$1 port=$2 i
    for ((i = 0; i < $3 * 20; i++)); do
        alive "$pid" || return 1
        port_taken "$port" && return 0
        sleep 0.05
    done
    return 1
}

# The PID and every descendant of it (bounded depth).
tree_pids() {
    local -A kids=()
    local f s pid ppid depth
    for f in /proc/[0-9]*/stat; do
        read -r s 2>/dev/null <"$f" || continue
        pid=${f#/proc/}; pid=${pid%/stat}
        s=${s##*) }
        read -r _ ppid _ <<<"$s"
        kids[$ppid]+=" $pid"
    done
    local out=("$1") frontier=("$1") next
    for ((depth = 0; depth < 8 && ${#frontier[@]}; depth++)); do
        next=()
        for pid in "${frontier[@]}"; do
            # shellcheck disable=SC2206
            [[ -n ${kids[$pid]:-} ]] && next+=(${kids[$pid]})
        done
        out+=("${next[@]}")
        frontier=("${next[@]}")
    done
    echo "${out[@]}"
}

# "utime stime" in clock ticks summed over the given PIDs (whole thread groups, including exited
# threads and reaped children: /proc/PID/stat fields 14-17).
cpu_ticks() {
    local u=0 s=0 pid st f
    for pid in "$@"; do
        read -r st 2>/dev/null <"/proc/$pid/stat" || continue
        st=${st##*) }
        read -r -a f <<<"$st"
        u=$((u + f[11] + f[13])) s=$((s + f[12] + f[14]))
    done
    echo "$u $s"
}

hwm_kib() { # sum of VmHWM over the given PIDs
    local t=0 pid v
    for pid in "$@"; do
        v=$(awk '$1=="VmHWM:"{print $2}' "/proc/$pid/status" 2>/dev/null) || true
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

cpu_stat() { # "busy steal total" ticks of one CPU from /proc/stat
    awk -v c="cpu$1" '$1==c{b=$2+$3+$4+$7+$8; print b, $9, b+$5+$6+$9}' /proc/stat
}

CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------------ origin content and configs
SMALL_BODY="small response from the origin: $(printf 'abcdefghij%.0s' {1..6})"
SC_PATH[small]=/ SC_HDR[small]= SC_LEN[small]=${#SMALL_BODY}
SC_PATH[big]=/big64k SC_HDR[big]= SC_LEN[big]=65536
SC_PATH[close]=/ SC_HDR[close]='Connection: close' SC_LEN[close]=${#SMALL_BODY}
SC_PATH[css]=/static/style.css SC_HDR[css]=

mkdir -p "$TMP/www/static"
head -c 65536 /dev/zero | tr '\0' 'b' >"$TMP/www/big64k"
for ((i = 0; i < 40; i++)); do
    printf '.c%02d { margin: %dpx; color: #%06x; }\n' "$i" "$i" $((i * 4099))
done >"$TMP/www/static/style.css"
SC_LEN[css]=$(stat -c %s "$TMP/www/static/style.css")

NGINX_USER=
((EUID == 0)) && NGINX_USER="user $(id -un) $(id -gn);"
# Extensions the balancer caches (src/cache/rules.rs), as a regex for the peers' caches.
STATIC_RE='\.(css|js|mjs|map|png|jpe?g|gif|svg|ico|webp|avif|woff2?|ttf|otf|txt)$'

# One origin: nginx, 1 worker, keep-alive, no access log. X-Backend names the port.
origin_conf() {
    local port=$1 dir=$TMP/origin-$1
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
$NGINX_USER
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    etag off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    open_file_cache max=100 inactive=60s;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    types { text/css css; }
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$port backlog=4096;
        root $TMP/www;
        location = / {
            default_type text/plain;
            add_header X-Backend $port always;
            return 200 "$SMALL_BODY";
        }
        location = /big64k {
            add_header X-Backend $port always;
            add_header Cache-Control "no-store" always;
        }
        location /static/ {
            add_header X-Backend $port always;
            add_header Cache-Control "max-age=60" always;
        }
    }
}
EOF
}

# NGINX as the proxy: 1 worker, upstream keep-alive pool, equal weights (round robin), the same
# forwarding headers as the balancer; in the css scenario proxy_cache for the static extensions
# (honours Cache-Control). Other scenarios never hit a static path, so the cache is left out there
# (as the peers are usually run), which if anything favours the peers.
nginx_conf() {
    local dir=$TMP/nginx cache_http= cache_loc=
    rm -rf "$dir"
    mkdir -p "$dir"
    if [[ $1 == css ]]; then
        cache_http="proxy_cache_path $dir/cache levels=1:2 keys_zone=static:16m max_size=256m inactive=10m use_temp_path=off;"
        cache_loc="location ~* $STATIC_RE {
            proxy_pass http://origins;
            proxy_cache static;
            proxy_cache_valid 200 60s;
            proxy_cache_lock on;
        }"
    fi
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
$NGINX_USER
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    $cache_http
    upstream origins {
        server 127.0.0.1:$ORIGIN_PORT1 weight=1;
        server 127.0.0.1:$ORIGIN_PORT2 weight=1;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }
    server {
        listen 127.0.0.1:$PORT reuseport backlog=4096$NGINX_DEFER;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$http_host;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto http;
        proxy_buffer_size 16k;
        proxy_buffers 8 16k;
        proxy_busy_buffers_size 32k;
        location / {
            proxy_pass http://origins;
        }
        $cache_loc
    }
}
EOF
}

# HAProxy as the proxy: 1 thread, keep-alive both sides, upstream connections shared
# (http-reuse always, like the balancer's per-core pool), equal weights (round robin), the
# same forwarding headers, no log lines; in the css scenario the in-memory cache for the static
# extensions (its memory is allocated up front, hence only there).
haproxy_conf() {
    local dir=$TMP/haproxy cache_sec= cache_rules=
    mkdir -p "$dir"
    if [[ $1 == css ]]; then
        cache_sec="cache static
    total-max-size 16
    max-object-size 1048576
    max-age 3600
"
        cache_rules="    acl static path_reg -i $STATIC_RE
    http-request set-var(txn.static) bool(true) if static
    http-request cache-use static if static
    http-response cache-store static if { var(txn.static) -m bool }"
    fi
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 30s
    timeout http-keep-alive 60s
    option http-keep-alive
    option forwardfor
    http-reuse always

$cache_sec
frontend fe
    bind 127.0.0.1:$PORT$HAPROXY_DEFER
    default_backend origins

backend origins
    balance roundrobin
    http-request set-header X-Forwarded-Proto http
$cache_rules
    server o1 127.0.0.1:$ORIGIN_PORT1 weight 1
    server o2 127.0.0.1:$ORIGIN_PORT2 weight 1
EOF
}

BACKENDS_JSON="[{\"host\":\"127.0.0.1\",\"port\":$ORIGIN_PORT1,\"score\":1},{\"host\":\"127.0.0.1\",\"port\":$ORIGIN_PORT2,\"score\":1}]"

# Starts the balancer on CPU list $1 (its shards) with log $2; waits for "listening on" and sets
# ADMIN_ADDR from "admin on". Returns 1 if it did not come up within 15 s.
ADMIN_ADDR=
BALANCER_WRAP=()   # a command the balancer runs under (valgrind for --instructions)
start_balancer() {
    local cpus=$1 logf=$2 i
    BACKENDS=$BACKENDS_JSON HOST_PORT_HTTP_BALANCER=$PORT BALANCER_BIND=127.0.0.1 \
        BALANCER_CPUS=$cpus ADMIN_PORT=0 CACHE_CAPACITY=10000 RUST_LOG=warn,balancer=info \
        BALANCER_DEFER_ACCEPT=$DEFER_ACCEPT \
        start_bg "$cpus" "$logf" "${BALANCER_WRAP[@]}" "$BALANCER_BIN"
    ADMIN_ADDR=
    for ((i = 0; i < 300; i++)); do
        alive "$STARTED_PID" || return 1
        if grep -q 'listening on' "$logf" 2>/dev/null; then
            ADMIN_ADDR=$(sed -n 's/.*admin on \([0-9.:]*\).*/\1/p' "$logf" | head -n1)
            return 0
        fi
        sleep 0.05
    done
    return 1
}

start_proxy() { # proxy scenario log -> STARTED_PID; 1 on failure
    local proxy=$1 scen=$2 logf=$3
    case $proxy in
        balancer) start_balancer "$PROXY_CPU" "$logf" || return 1 ;;
        haproxy)
            haproxy_conf "$scen"
            start_bg "$PROXY_CPU" "$logf" "$HAPROXY" -db -f "$TMP/haproxy/haproxy.cfg"
            wait_port "$STARTED_PID" "$PORT" 15 || return 1
            ;;
        nginx)
            nginx_conf "$scen"
            start_bg "$PROXY_CPU" "$logf" "$NGINX" -p "$TMP/nginx" -e "$TMP/nginx/error.log" \
                -c "$TMP/nginx/nginx.conf"
            wait_port "$STARTED_PID" "$PORT" 15 || return 1
            ;;
    esac
    # the setsid/taskset chain must have exec'd into the proxy as its own group leader
    local st
    read -r st 2>/dev/null <"/proc/$STARTED_PID/stat" || die "$proxy exited right after starting"
    st=${st##*) }
    read -r _ _ pgrp _ <<<"$st"
    [[ $pgrp == "$STARTED_PID" ]] || die "$proxy did not start as its own process group"
}

metric() { # name: value from the balancer's /metrics (empty if unavailable)
    [[ -n $ADMIN_ADDR ]] || return 0
    curl -s --noproxy '*' --max-time 3 "http://$ADMIN_ADDR/metrics" 2>/dev/null |
        awk -v n="$1" '$1==n{print $2; exit}' || true
}

# Sends 16 checked requests of a scenario; sets SEEN (distinct X-Backend values). 1 on failure.
SEEN=0 SANITY_ERR=
sanity() {
    local scen=$1 i res code size be
    local -A backends=()
    local args=(-s --noproxy '*' --max-time 5 -o "$TMP/body" -D "$TMP/head" -w '%{http_code} %{size_download}')
    [[ -n ${SC_HDR[$scen]} ]] && args+=(-H "${SC_HDR[$scen]}")
    SEEN=0 SANITY_ERR=
    for ((i = 0; i < 16; i++)); do
        res=$(curl "${args[@]}" "http://127.0.0.1:$PORT${SC_PATH[$scen]}" 2>/dev/null) || res="000 0"
        read -r code size <<<"$res"
        if [[ $code != 200 || $size != "${SC_LEN[$scen]}" ]]; then
            SANITY_ERR="request $((i + 1)) of ${SC_PATH[$scen]}: status $code, $size bytes (want 200, ${SC_LEN[$scen]})"
            return 1
        fi
        be=$(tr -d '\r' <"$TMP/head" | awk 'tolower($1)=="x-backend:"{print $2}')
        [[ -n $be ]] && backends[$be]=1
    done
    SEEN=${#backends[@]}
}

# Runs wrk for $1 seconds on scenario $2, output to $3; bounded by timeout. 1 on failure.
run_wrk() {
    local dur=$1 scen=$2 out=$3 rc=0
    local args=(wrk -t1 -c"$CONNS" -d"${dur}s" --latency)
    [[ -n ${SC_HDR[$scen]} ]] && args+=(-H "${SC_HDR[$scen]}")
    args+=("http://127.0.0.1:$PORT${SC_PATH[$scen]}")
    timeout -k 5 $((dur + 20)) taskset -c "$LOAD_CPU" "${args[@]}" >"$out" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID" || rc=$?
    WRK_PID=
    return "$rc"
}

# wrk output -> "rps p50_ms p99_ms requests errors non2xx"
parse_wrk() {
    awk '
    function ms(v) {
        if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
        if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
        if (v ~ /m$/) return substr(v, 1, length(v) - 1) * 60000
        if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
        return v + 0
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    $2 == "requests" && $3 == "in" { req = $1 }
    $1 == "Socket" && $2 == "errors:" {
        for (i = 3; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) { v = $i; sub(/,/, "", v); err += v }
    }
    $1 == "Non-2xx" { non2xx = $NF }
    $1 == "Requests/sec:" { rps = $2 }
    END { printf "%s %s %s %s %d %d\n", (rps == "" ? "NA" : rps), (p50 == "" ? "NA" : p50),
          (p99 == "" ? "NA" : p99), (req == "" ? 0 : req), err, non2xx }' "$1"
}

say() { # result output: stdout and --out
    echo "$*"
    if [[ -n $OUT ]]; then echo "$*" >>"$OUT"; fi
}

RESULTS=$TMP/results.txt
: >"$RESULTS"
INVALID=0

# One measured run of one proxy on one scenario.
run_one() {
    local proxy=$1 scen=$2 rep=$3
    local tag="$proxy-$scen-$rep" logf="$TMP/$proxy-$scen-$rep.log" note= valid=1
    local pid
    port_taken "$PORT" && die "127.0.0.1:$PORT still in use before starting $proxy"
    if ! start_proxy "$proxy" "$scen" "$logf"; then
        log "$proxy did not start listening on 127.0.0.1:$PORT within 15 s; log:"
        tail -n 20 "$logf" >&2 || true
        if command -v ss >/dev/null 2>&1; then
            log "sockets on port $PORT:"
            ss -tanp "( sport = :$PORT )" 2>/dev/null | awk 'NR > 1 {n[$1]++} END {for (s in n) print "  " n[s], s}' >&2 || true
            ss -tanp "( sport = :$PORT )" 2>/dev/null | grep -v TIME-WAIT | head -n 5 >&2 || true
        fi
        stop_pid "$STARTED_PID"
        record "proxy=$proxy scenario=$scen rep=$rep valid=0 note=start_failed"
        return
    fi
    pid=$STARTED_PID
    if ! sanity "$scen"; then
        log "$tag: sanity check failed: $SANITY_ERR"
        stop_pid "$pid"
        record "proxy=$proxy scenario=$scen rep=$rep valid=0 note=sanity_failed"
        return
    fi
    local seen=$SEEN
    if ((WARMUP > 0)); then
        run_wrk "$WARMUP" "$scen" "$TMP/$tag.warmup" || log "$tag: warm-up wrk failed"
    fi

    local pids created0 reused0 hits0 misses0 u0 s0 u1 s1 ou0 os0 ou1 os1 t0 t1
    local pc0 pc1 lc0 lc1
    pids=$(tree_pids "$pid")
    if [[ $proxy == balancer ]]; then
        created0=$(metric balancer_upstream_connections_created_total)
        reused0=$(metric balancer_upstream_connections_reused_total)
        hits0=$(metric balancer_cache_hits_total)
        misses0=$(metric balancer_cache_misses_total)
    fi
    # shellcheck disable=SC2086
    read -r u0 s0 <<<"$(cpu_ticks $pids)"
    # shellcheck disable=SC2086
    read -r ou0 os0 <<<"$(cpu_ticks $ORIGIN_PIDS)"
    read -r -a pc0 <<<"$(cpu_stat "$PROXY_CPU")"
    read -r -a lc0 <<<"$(cpu_stat "$LOAD_CPU")"
    t0=$EPOCHREALTIME
    local wrk_ok=1
    run_wrk "$DURATION" "$scen" "$TMP/$tag.wrk" || wrk_ok=0
    t1=$EPOCHREALTIME
    read -r -a pc1 <<<"$(cpu_stat "$PROXY_CPU")"
    read -r -a lc1 <<<"$(cpu_stat "$LOAD_CPU")"
    # shellcheck disable=SC2086
    read -r ou1 os1 <<<"$(cpu_ticks $ORIGIN_PIDS)"
    # shellcheck disable=SC2086
    read -r u1 s1 <<<"$(cpu_ticks $pids)"
    local alive_after=1
    alive "$pid" || alive_after=0
    local nthreads=0 p
    for p in $pids; do
        nthreads=$((nthreads + $(find "/proc/$p/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)))
    done
    local rss_kib
    # shellcheck disable=SC2086
    rss_kib=$(hwm_kib $pids)
    local extra=
    if [[ $proxy == balancer ]]; then
        local created1 reused1 hits1 misses1
        created1=$(metric balancer_upstream_connections_created_total)
        reused1=$(metric balancer_upstream_connections_reused_total)
        hits1=$(metric balancer_cache_hits_total)
        misses1=$(metric balancer_cache_misses_total)
        extra=$(awk -v c0="$created0" -v c1="$created1" -v r0="$reused0" -v r1="$reused1" \
            -v h0="$hits0" -v h1="$hits1" -v m0="$misses0" -v m1="$misses1" 'BEGIN {
            if (c0 == "" || c1 == "" || r0 == "" || r1 == "") { printf "reuse_pct=NA" }
            else {
                c = c1 - c0; r = r1 - r0
                printf "reuse_pct=%s upstream_created=%d upstream_reused=%d",
                    (c + r > 0 ? sprintf("%.2f", 100 * r / (c + r)) : "NA"), c, r
            }
            if (h0 != "" && h1 != "" && m0 != "" && m1 != "") {
                h = h1 - h0; m = m1 - m0
                printf " cache_hit_pct=%s", (h + m > 0 ? sprintf("%.2f", 100 * h / (h + m)) : "NA")
            }
        }')
    fi
    stop_pid "$pid"
    local stop_status=$STOP_STATUS
    if [[ $proxy == balancer ]] && ((stop_status != 0)); then
        note+="${note:+,}exit_status_$stop_status"
        log "$tag: the balancer exited with status $stop_status after SIGTERM"
    fi
    if [[ $proxy == balancer ]] && grep -Eq ' (WARN|ERROR) ' "$logf"; then
        note+="${note:+,}log_warnings"
        log "$tag: the balancer logged warnings/errors:"
        grep -E ' (WARN|ERROR) ' "$logf" | head -n 5 >&2
    fi

    local rps p50 p99 req err non2xx
    read -r rps p50 p99 req err non2xx <<<"$(parse_wrk "$TMP/$tag.wrk")"
    ((wrk_ok)) || { valid=0; note+="${note:+,}wrk_failed"; tail -n 5 "$TMP/$tag.wrk" >&2; }
    ((alive_after)) || { valid=0; note+="${note:+,}proxy_died"; }
    ((req > 0)) || { valid=0; note+="${note:+,}no_requests"; }
    if ((req > 0 && (err + non2xx) * 1000 > req)); then valid=0; note+="${note:+,}errors"; fi
    local line
    line=$(awk -v proxy="$proxy" -v scen="$scen" -v rep="$rep" -v rps="$rps" -v p50="$p50" \
        -v p99="$p99" -v req="$req" -v err="$err" -v non2xx="$non2xx" -v u0="$u0" -v s0="$s0" \
        -v u1="$u1" -v s1="$s1" -v ou0="$ou0" -v os0="$os0" -v ou1="$ou1" -v os1="$os1" \
        -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" -v rss="$rss_kib" -v seen="$seen" \
        -v pb0="${pc0[0]}" -v ps0="${pc0[1]}" -v pt0="${pc0[2]}" \
        -v pb1="${pc1[0]}" -v ps1="${pc1[1]}" -v pt1="${pc1[2]}" \
        -v lb0="${lc0[0]}" -v ls0="${lc0[1]}" -v lt0="${lc0[2]}" \
        -v lb1="${lc1[0]}" -v ls1="${lc1[1]}" -v lt1="${lc1[2]}" -v thr="$nthreads" \
        -v noise="$MAX_NOISE" 'BEGIN {
        u = u1 - u0; s = s1 - s0; cpu = (u + s) / hz; wall = t1 - t0
        o = ((ou1 - ou0) + (os1 - os0)) / hz
        pt = pt1 - pt0; lt = lt1 - lt0
        pbusy = pt > 0 ? 100 * (pb1 - pb0) / pt : 0
        lbusy = lt > 0 ? 100 * (lb1 - lb0) / lt : 0
        steal = (pt + lt) > 0 ? 100 * ((ps1 - ps0) + (ls1 - ls0)) / (pt + lt) : 0
        other = pbusy - (wall > 0 ? 100 * cpu / wall : 0); if (other < 0) other = 0
        printf "proxy=%s scenario=%s rep=%s rps=%s p50_ms=%s p99_ms=%s", proxy, scen, rep,
            (rps == "NA" ? "NA" : sprintf("%.0f", rps)),
            (p50 == "NA" ? "NA" : sprintf("%.3f", p50)), (p99 == "NA" ? "NA" : sprintf("%.3f", p99))
        printf " cpu_us_per_req=%s sys_pct=%s rss_mib=%.1f",
            (req > 0 ? sprintf("%.2f", 1e6 * cpu / req) : "NA"),
            (u + s > 0 ? sprintf("%.0f", 100 * s / (u + s)) : "NA"), rss / 1024
        printf " proxy_cores=%.2f origin_us_per_req=%s requests=%d errors=%d non2xx=%d",
            (wall > 0 ? cpu / wall : 0), (req > 0 ? sprintf("%.2f", 1e6 * o / req) : "NA"),
            req, err, non2xx
        printf " backends_seen=%d tasks=%d proxy_cpu_busy_pct=%.0f load_cpu_busy_pct=%.0f",
            seen, thr, pbusy, lbusy
        printf " proxy_cpu_other_pct=%.0f steal_pct=%.1f noisy=%d", other, steal, (other > noise || steal > noise)
    }')
    [[ -n $extra ]] && line+=" $extra"
    line+=" valid=$valid"
    [[ -n $note ]] && line+=" note=$note"
    record "$line"
}

record() {
    [[ $1 == *" valid=0"* ]] && INVALID=$((INVALID + 1))
    echo "$1" >>"$RESULTS"
    say "$1"
}

# ------------------------------------------------------------------ run
if ((INSTRUCTIONS)); then
    say "# loadtest --instructions $(date -u +%Y-%m-%dT%H:%M:%SZ) duration=${DURATION}s" \
        "warmup=${WARMUP}s conns=$CONNS scenarios=$SCENARIOS proxy_cpu=$PROXY_CPU load_cpu=$LOAD_CPU" \
        "defer_accept=$DEFER_ACCEPT"
else
    say "# loadtest $(date -u +%Y-%m-%dT%H:%M:%SZ) reps=$REPS duration=${DURATION}s warmup=${WARMUP}s" \
        "conns=$CONNS scenarios=$SCENARIOS proxies=$PROXIES proxy_cpu=$PROXY_CPU load_cpu=$LOAD_CPU" \
        "defer_accept=$DEFER_ACCEPT"
fi
say "# $(uname -sr); $(nproc) CPUs ($(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo));" \
    "loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
say "# $("$HAPROXY" -v | head -n1 | cut -d' ' -f1-3); $("$NGINX" -v 2>&1 | sed 's/.*: //'); $(wrk --version 2>&1 | head -n1 | cut -d' ' -f1-2)" \
    "${BALANCER_BIN:+; balancer $("$BALANCER_BIN" --version 2>/dev/null | head -n1)}"

ORIGIN_PIDS=
for p in "$ORIGIN_PORT1" "$ORIGIN_PORT2"; do
    origin_conf "$p"
    start_bg "$LOAD_CPU" "$TMP/origin-$p/stdout.log" "$NGINX" -p "$TMP/origin-$p" \
        -e "$TMP/origin-$p/error.log" -c "$TMP/origin-$p/nginx.conf"
    wait_port "$STARTED_PID" "$p" 15 || {
        tail -n 20 "$TMP/origin-$p/error.log" "$TMP/origin-$p/stdout.log" >&2 || true
        die "origin nginx on 127.0.0.1:$p did not start"
    }
    for ((i = 0; i < 100; i++)); do   # master + its worker
        tree=$(tree_pids "$STARTED_PID")
        [[ $tree == *" "* ]] && break
        sleep 0.05
    done
    ORIGIN_PIDS+=" $tree"
done
for s in "${SCEN_LIST[@]}"; do
    for p in "$ORIGIN_PORT1" "$ORIGIN_PORT2"; do
        res=$(curl -s --noproxy '*' --max-time 5 -o /dev/null -w '%{http_code} %{size_download}' \
            "http://127.0.0.1:$p${SC_PATH[$s]}") || res="000 0"
        [[ $res == "200 ${SC_LEN[$s]}" ]] || die "origin 127.0.0.1:$p answered '$res' to ${SC_PATH[$s]} (want 200 ${SC_LEN[$s]})"
    done
done

# --instructions: one callgrind run per scenario. The counters are zeroed after the warm-up and
# dumped after the measured run, so start-up and shutdown are not in the count.
if ((INSTRUCTIONS)); then
    for s in "${SCEN_LIST[@]}"; do
        BALANCER_WRAP=(valgrind --tool=callgrind --compress-strings=no
            "--callgrind-out-file=$TMP/callgrind.$s.%p")
        logf=$TMP/balancer-callgrind-$s.log
        start_balancer "$PROXY_CPU" "$logf" || {
            tail -n 20 "$logf" >&2 || true
            die "the balancer did not start under valgrind"
        }
        pid=$STARTED_PID
        sanity "$s" || die "balancer, $s: $SANITY_ERR"
        run_wrk "$WARMUP" "$s" "$TMP/callgrind-$s.warmup" || die "balancer, $s: warm-up wrk failed"
        callgrind_control -z "$pid" >/dev/null 2>&1 || die "callgrind_control -z $pid failed"
        run_wrk "$DURATION" "$s" "$TMP/callgrind-$s.wrk" || die "balancer, $s: wrk failed"
        callgrind_control -d "$pid" >/dev/null 2>&1 || die "callgrind_control -d $pid failed"
        # Counted and dumped. Under valgrind (one thread runs at a time) a SIGTERM drain does
        # not finish in reasonable time, and there is nothing left to wait for.
        kill -KILL -- "-$pid" 2>/dev/null || true
        stop_pid "$pid"
        # Killed, valgrind cannot remove the FIFOs its gdbserver (which callgrind_control
        # talks to) made in /tmp.
        rm -f /tmp/vgdb-pipe-*-"$pid"-by-* 2>/dev/null || true
        read -r _ _ _ req err non2xx <<<"$(parse_wrk "$TMP/callgrind-$s.wrk")"
        ((req > 0 && err == 0 && non2xx == 0)) ||
            die "balancer, $s: $req requests, $err socket errors, $non2xx non-2xx"
        dump=$TMP/callgrind.$s.$pid.1
        ir=$(awk '$1=="totals:"{print $2; exit}' "$dump" 2>/dev/null)
        [[ -n $ir ]] || die "no callgrind totals in $dump"
        say "instructions: scenario=$s conns=$CONNS requests=$req user_instructions=$ir" \
            "user_instructions_per_req=$((ir / req))"
    done
    exit 0
fi

if ((WITH_BALANCER)); then
    if start_balancer "$PROXY_CPU,$LOAD_CPU" "$TMP/balancer-idle.log"; then
        sleep 1
        idle=$(awk '$1=="VmRSS:"{r=$2} $1=="VmHWM:"{h=$2} $1=="RssAnon:"{a=$2} $1=="RssFile:"{f=$2}
            $1=="Threads:"{t=$2}
            END{printf "VmRSS=%.1fMiB VmHWM=%.1fMiB RssAnon=%.1fMiB RssFile=%.1fMiB threads=%d",
                r/1024, h/1024, a/1024, f/1024, t}' "/proc/$STARTED_PID/status")
        say "idle_rss: balancer shards=2 (BALANCER_CPUS=$PROXY_CPU,$LOAD_CPU), 1 s after startup: $idle"
        stop_pid "$STARTED_PID"
    else
        tail -n 20 "$TMP/balancer-idle.log" >&2 || true
        stop_pid "$STARTED_PID"
        die "the balancer (2 shards) did not start"
    fi
fi

total=$((REPS * ${#SCEN_LIST[@]} * ${#PROXY_LIST[@]}))
log "$total runs of ${DURATION}s (+${WARMUP}s warm-up each), about $((total * (DURATION + WARMUP + 2) / 60 + 1)) min"
for ((rep = 1; rep <= REPS; rep++)); do
    for s in "${SCEN_LIST[@]}"; do
        for p in "${PROXY_LIST[@]}"; do
            run_one "$p" "$s" "$rep"
        done
    done
done

summary | while IFS= read -r l; do say "$l"; done
if ((INVALID)); then
    log "$INVALID invalid run(s): see note= in their lines"
    exit 1
fi
