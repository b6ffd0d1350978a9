#!/usr/bin/env bash
# Soak: the balancer under mixed load for MINUTES, watching that memory and descriptors stay flat.
#
# Starts three nginx origins (1 worker each), a deployment agent (a small python3 WebSocket
# server written here, stdlib only) that pushes a new server set every few seconds and drops the
# link now and then, and the release balancer. Then, for MINUTES, runs at once:
#   - wrk keep-alive GETs (small answers)           - wrk GETs with `Connection: close`
#   - wrk GETs of one .css (cache hits)             - wrk GETs of 4,000 .css keys (cache churn)
#   - curl uploads of 4 MiB, one after the other    - curl downloads of 32 MiB read at 4 MiB/s
#   - slow clients (bash /dev/tcp) that send a whole request in pieces over about 2 s
#   - slowloris clients that never finish their head (the balancer answers 408)
#   - the agent's updates (about every 3 s; the link dropped every 45 s)
# and reports the balancer's RSS, open file descriptors and threads, with the requests and errors
# of the minute (from its /metrics): before the load, 10 s into it, every minute, 3 s after it and
# 15 s after it (the origins close idle keep-alive connections after 10 s, so by then the pool
# should be empty), with its TCP sockets by kind (ss) when idle. Then the error counts of every
# load generator, the agent sets' propagation delays (from the balancer's log), and whether the
# figures stayed flat.
#
# Usage: scripts/soak.sh MINUTES [--cpus LIST] [--build] [--keep-tmp]
#   MINUTES     1..240
#   --cpus      BALANCER_CPUS for the balancer (default 0); the load is not pinned
#   --build     run `cargo build --release --bins` first (default: only if the binary is missing)
#   --keep-tmp  keep the temporary directory (logs, configs, wrk outputs)
#
# Every loop and wait is bounded; only 127.0.0.1 is used; everything started is stopped by PID
# (each in its own process group) on exit. Exit status 0 when the balancer survived and no
# request failed unexpectedly, 1 otherwise.
set -euo pipefail

die() { echo "soak: $*" >&2; exit 1; }
log() { echo "soak: $*" >&2; }

MINUTES= CPUS=0 BUILD=0 KEEP_TMP=0
while (($#)); do
    case $1 in
        --cpus) CPUS=${2:?--cpus needs a value}; shift 2 ;;
        --build) BUILD=1; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option: $1" ;;
        *) [[ -z $MINUTES ]] || die "one MINUTES only"; MINUTES=$1; shift ;;
    esac
done
[[ $MINUTES =~ ^[0-9]+$ ]] && ((MINUTES >= 1 && MINUTES <= 240)) ||
    die "usage: scripts/soak.sh MINUTES (1..240) [--cpus LIST] [--build] [--keep-tmp]"
[[ $CPUS =~ ^[0-9,-]+$ ]] || die "--cpus must be a CPU list like 0 or 0-1, got '$CPUS'"

for t in wrk nginx curl python3 setsid timeout nice; do
    command -v "$t" >/dev/null 2>&1 || die "missing $t (apt-get install -y wrk nginx-light curl python3)"
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=$ROOT/target/release/balancer
if ((BUILD)) || [[ ! -x $BIN ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found: cannot build $BIN"
    log "building the release binary (cargo build --release --bins)"
    cargo build --release --bins >&2 || die "cargo build failed"
fi
[[ -x $BIN ]] || die "$BIN missing"
if [[ -n $(find src Cargo.toml Cargo.lock -newer "$BIN" -print -quit 2>/dev/null) ]]; then
    log "warning: $BIN is older than the sources; pass --build to rebuild"
fi

# ------------------------------------------------------------------ process bookkeeping
TMP=$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")
chmod 755 "$TMP"
STARTED=() # PIDs, each the leader of its own process group

alive() { # running, not a zombie
    local s
    read -r s 2>/dev/null <"/proc/$1/stat" || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z ]]
}

# SIGTERM to the process group of one PID we started, up to 5 s, then SIGKILL; then reap.
stop_pid() {
    local pid=$1 i
    if alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.05; done
        if alive "$pid"; then
            log "PID $pid did not stop within 5 s of SIGTERM; killing its process group"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i
    set +e
    trap - EXIT INT TERM
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_pid "${STARTED[i]}"; done
    if ((KEEP_TMP)); then log "temporary files kept in $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background as the leader of its own process group, niced by $NICE (the
# machine may be shared); output to $1.
NICE=5
start_bg() {
    local logf=$1
    shift
    setsid nice -n "$NICE" "$@" >"$logf" 2>&1 </dev/null &
    STARTED_PID=$!
    STARTED+=("$STARTED_PID")
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # pid port: 0 once the port accepts (15 s at most)
    local i
    for ((i = 0; i < 300; i++)); do
        alive "$1" || return 1
        port_open "$2" && return 0
        sleep 0.05
    done
    return 1
}

# ------------------------------------------------------------------ origins
mkdir -p "$TMP/www/static"
printf 'small response from the origin\n' >"$TMP/www/index.txt"
for ((i = 0; i < 40; i++)); do
    printf '.c%02d { margin: %dpx; color: #%06x; }\n' "$i" "$i" $((i * 4099))
done >"$TMP/www/static/style.css"
head -c $((32 << 20)) /dev/urandom >"$TMP/www/big32m"
head -c $((4 << 20)) /dev/urandom >"$TMP/upload.bin"
NGINX=$(command -v nginx)
NGINX_USER=
((EUID == 0)) && NGINX_USER="user $(id -un) $(id -gn);"

origin_conf() { # dir port
    cat >"$1/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
$NGINX_USER
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    tcp_nodelay on;
    # Short, so that after the load the origins close the balancer's pooled connections and
    # the last sample shows whether its descriptors return to the idle baseline.
    keepalive_timeout 10s;
    keepalive_requests 1000000;
    client_max_body_size 64m;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    types { text/css css; }
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$2 backlog=4096;
        root $TMP/www;
        location = / { default_type text/plain; return 200 "origin $2\n"; }
        location = /close { default_type text/plain; return 200 "origin $2\n"; }
        location = /slow { default_type text/plain; return 200 "origin $2\n"; }
        location = /upload { default_type text/plain; return 200 "stored\n"; }
        location = /big32m { add_header Cache-Control "no-store" always; }
        location /static/ { add_header Cache-Control "max-age=5" always; }
    }
}
EOF
}

ORIGINS=()
for n in 1 2 3; do
    dir=$TMP/origin-$n
    mkdir -p "$dir"
    port=$(free_port)
    origin_conf "$dir" "$port"
    start_bg "$dir/stdout.log" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    wait_port "$STARTED_PID" "$port" || { tail -n 20 "$dir/error.log" >&2; die "origin nginx on port $port did not start"; }
    ORIGINS+=("$port")
done
SERVERS_JSON=$(printf '["127.0.0.1", %s],' "${ORIGINS[@]}")
SERVERS_JSON="[${SERVERS_JSON%,}]"

# ------------------------------------------------------------------ deployment agent
cat >"$TMP/agent.py" <<'PY'
"""A deployment agent for the soak: a stdlib-only WebSocket server (RFC 6455, server side).

argv: port, servers JSON ([[host, port], ...]), seconds between sets, seconds between drops,
seconds to run. Pushes a new set every period (rotating scores and which servers are in it,
every 10th message one the balancer must reject), counts the balancer's replies, answers pings,
drops the link every `drop` seconds, and prints one `agent ...` line of counts per event.
"""
import base64, hashlib, json, os, select, socket, struct, sys, time

port, servers = int(sys.argv[1]), json.loads(sys.argv[2])
period, drop, run = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
end = time.time() + run
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
stats = {"connections": 0, "sent": 0, "applied": 0, "rejected": 0, "invalid_sent": 0,
         "drops": 0, "pings": 0, "bad_frames": 0}

def say(event):
    print("agent", event, " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)

def the_set(n):
    if n % 10 == 9:
        stats["invalid_sent"] += 1
        return '{"servers": [{"host": "127.0.0.1", "score": "high"}]}'
    chosen = [s for i, s in enumerate(servers) if (n + i) % 4 != 0] or servers
    return json.dumps({"servers": [{"host": h, "port": p, "score": 1 + (n + i) % 3}
                                   for i, (h, p) in enumerate(chosen)]})

def recv_exact(c, n, deadline):
    out = b""
    while len(out) < n:
        c.settimeout(max(0.01, deadline - time.time()))
        chunk = c.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out

def handshake(c):
    data, deadline = b"", time.time() + 5
    while b"\r\n\r\n" not in data:
        if len(data) > 65536 or time.time() > deadline:
            raise ConnectionError("bad handshake")
        c.settimeout(max(0.01, deadline - time.time()))
        chunk = c.recv(4096)
        if not chunk:
            raise ConnectionError("closed during handshake")
        data += chunk
    key = next(l.split(b":", 1)[1].strip() for l in data.split(b"\r\n")
               if l.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")

def send_frame(c, opcode, payload):
    n = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([n]) if n < 126 else (bytes([126]) + struct.pack(">H", n) if n < 65536
                                        else bytes([127]) + struct.pack(">Q", n))
    c.sendall(head + payload)

def read_frame(c):
    deadline = time.time() + 5
    b0, b1 = recv_exact(c, 2, deadline)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", recv_exact(c, 2, deadline))[0]
    elif n == 127:
        n = struct.unpack(">Q", recv_exact(c, 8, deadline))[0]
    if n > 1 << 20:
        raise ConnectionError("frame too large")
    mask = recv_exact(c, 4, deadline) if b1 & 0x80 else b"\0\0\0\0"
    data = recv_exact(c, n, deadline)
    return b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

def serve(c):
    handshake(c)
    stats["connections"] += 1
    say("connected")
    connected, last = time.time(), 0.0
    while time.time() < end:
        if time.time() - connected >= drop:
            stats["drops"] += 1
            say("dropping the link")
            return
        if time.time() - last >= period:
            send_frame(c, 1, the_set(stats["sent"]).encode())
            stats["sent"] += 1
            last = time.time()
        ready, _, _ = select.select([c], [], [], 0.2)
        if not ready:
            continue
        opcode, payload = read_frame(c)
        if opcode == 1:
            reply = json.loads(payload)
            if "applied" in reply:
                stats["applied"] += 1
            elif "rejected" in reply:
                stats["rejected"] += 1
            else:
                stats["bad_frames"] += 1
            say("reply " + payload.decode()[:80])
        elif opcode == 9:
            stats["pings"] += 1
            send_frame(c, 10, payload)
        elif opcode == 8:
            say("closed by the balancer")
            return
        elif opcode != 10:
            stats["bad_frames"] += 1

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(4)
srv.settimeout(1.0)
say("listening")
while time.time() < end:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        continue
    try:
        serve(conn)
    except (ConnectionError, OSError, ValueError, StopIteration) as e:
        say(f"link error {e!r}")
    finally:
        conn.close()
say("done")
PY

DURATION=$((MINUTES * 60))
AGENT_PORT=$(free_port)
start_bg "$TMP/agent.log" python3 "$TMP/agent.py" "$AGENT_PORT" "$SERVERS_JSON" 3 45 $((DURATION + 60))
AGENT_PID=$STARTED_PID
wait_port "$AGENT_PID" "$AGENT_PORT" || { cat "$TMP/agent.log" >&2; die "the agent did not start"; }

# ------------------------------------------------------------------ balancer
PORT=$(free_port)
BACKENDS_JSON=$(printf '{"host":"127.0.0.1","port":%s,"score":1},' "${ORIGINS[@]}")
BACKENDS_JSON="[${BACKENDS_JSON%,}]"
BACKENDS=$BACKENDS_JSON HOST_PORT_HTTP_BALANCER=$PORT BALANCER_BIND=127.0.0.1 \
    HOST_PORT_WS_DEPLOYMENT_AGENT=$AGENT_PORT AGENT_BACKOFF_MAX=1 BALANCER_CPUS=$CPUS \
    ADMIN_PORT=0 CACHE_CAPACITY=1024 RUST_LOG=info \
    start_bg "$TMP/balancer.log" "$BIN"
LB_PID=$STARTED_PID
for ((i = 0; i < 300; i++)); do
    grep -q 'admin on' "$TMP/balancer.log" 2>/dev/null && break
    alive "$LB_PID" || break
    sleep 0.05
done
ADMIN=$(sed -n 's/.*admin on \([0-9.:]*\).*/\1/p' "$TMP/balancer.log" | head -n1)
[[ -n $ADMIN ]] || { tail -n 20 "$TMP/balancer.log" >&2; die "the balancer did not start"; }
URL=http://127.0.0.1:$PORT
[[ $(curl -s --noproxy '*' --max-time 5 -o /dev/null -w '%{http_code}' "$URL/") == 200 ]] ||
    die "the balancer does not answer 200 on $URL/"

# ------------------------------------------------------------------ figures
metrics() { curl -s --noproxy '*' --max-time 5 "http://$ADMIN/metrics" || true; }
# "requests non2xx 4xx 5xx 408 version reconnects cache_entries ejected" from /metrics
metric_figures() {
    metrics | awk '
        /^balancer_requests_total\{/ { c = $1; sub(/.*code="/, "", c); sub(/".*/, "", c)
            t += $2; if (c !~ /^2/) n += $2; if (c ~ /^4/) f += $2; if (c ~ /^5/) s += $2
            if (c == "408") to += $2 }
        /^balancer_server_set_version / { v = $2 }
        /^balancer_agent_reconnects_total / { r = $2 }
        /^balancer_cache_entries / { e = $2 }
        /^balancer_ejected_servers / { j = $2 }
        END { printf "%d %d %d %d %d %d %d %d %d\n", t, n, f, s, to, v, r, e, j }'
}
proc_figures() { # "rss_kib fds threads"
    local rss thr fds
    rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$LB_PID/status" 2>/dev/null || echo 0)
    thr=$(awk '$1 == "Threads:" { print $2 }' "/proc/$LB_PID/status" 2>/dev/null || echo 0)
    fds=$(find "/proc/$LB_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    echo "${rss:-0} $fds ${thr:-0}"
}
sockets() { # the balancer's TCP sockets by kind, from ss
    command -v ss >/dev/null 2>&1 || { echo "sockets: ss not available"; return 0; }
    ss -tanpH 2>/dev/null | awk -v pid="pid=$LB_PID," -v port="$PORT" -v agent="$AGENT_PORT" \
        -v origins=" ${ORIGINS[*]} " '
        index($0, pid) {
            n = split($4, l, ":"); lp = l[n]; n = split($5, r, ":"); rp = r[n]
            if ($1 == "LISTEN") k = "listening"
            else if (lp == port) k = "clients"
            else if (rp == agent) k = "agent"
            else if (index(origins, " " rp " ")) k = "upstream"
            else k = "other"
            c[k " " $1]++
        }
        END { printf "sockets:"; for (x in c) printf " %s=%d", x, c[x]; printf "\n" }' |
        sed 's/ \([a-z]*\) \([A-Z-]*\)=/ \1:\2=/g'
}
PREV_T=0 PREV_5=0 PREV_4=0
SAMPLES=()
sample() { # label
    local rss fds thr t n f s to v r e j
    alive "$LB_PID" || { echo "$1: the balancer is not running"; return 1; }
    read -r rss fds thr <<<"$(proc_figures)"
    read -r t n f s to v r e j <<<"$(metric_figures)"
    printf '%-12s rss_mib=%6.1f fds=%5d threads=%3d | requests=%9d (+%d) 4xx=+%d (408 total %d) 5xx=+%d | set_version=%d agent_reconnects=%d cache_entries=%d ejected=%d\n' \
        "$1" "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')" "$fds" "$thr" "$t" $((t - PREV_T)) \
        $((f - PREV_4)) "$to" $((s - PREV_5)) "$v" "$r" "$e" "$j"
    PREV_T=$t PREV_4=$f PREV_5=$s
    SAMPLES+=("$1 $rss $fds")
}

echo "# soak $(date -u +%Y-%m-%dT%H:%M:%SZ) minutes=$MINUTES balancer_cpus=$CPUS; $(uname -sr); $(nproc) CPUs; loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# balancer $URL (admin $ADMIN), origins ${ORIGINS[*]}, agent port $AGENT_PORT"
sleep 1
sample "idle-before"
sockets

# ------------------------------------------------------------------ load
LOAD_START=$EPOCHSECONDS
END_AT=$((LOAD_START + DURATION))
export URL END_AT TMP PORT

cat >"$TMP/churn.lua" <<'LUA'
math.randomseed(os.time())
request = function()
    return wrk.format(nil, "/static/style.css?v=" .. math.random(1, 4000))
end
LUA
run_wrk() { # name conns [wrk args...]
    local name=$1 conns=$2
    shift 2
    start_bg "$TMP/wrk-$name.out" timeout $((DURATION + 30)) \
        wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 10s "$@"
}
NICE=10 # the load generators give way to the balancer and to anyone else
run_wrk keepalive 16 "$URL/"
run_wrk close 4 -H 'Connection: close' "$URL/close"
run_wrk css 4 "$URL/static/style.css"
run_wrk churn 4 -s "$TMP/churn.lua" "$URL/"

# The loops run in their own bash; a write to a socket the balancer closed must fail, not kill it.
upload_loop() { # one 4 MiB upload after another; one status line each
    trap '' PIPE
    while ((EPOCHSECONDS < END_AT)); do
        curl -s --noproxy '*' --max-time 60 -o /dev/null -w '%{http_code}\n' \
            -H 'Content-Type: application/octet-stream' --data-binary "@$TMP/upload.bin" "$URL/upload" || echo "curl-$?"
        sleep 0.5
    done
}
# 32 MiB read at 4 MiB/s (about 8 s), one after the other: more than the socket buffers on the
# way hold, so the balancer must hold back the origin (smaller downloads fit in the buffers and
# curl's rate limit never bites).
slow_reader_loop() {
    trap '' PIPE
    while ((EPOCHSECONDS < END_AT)); do
        curl -s --noproxy '*' --max-time 60 --limit-rate 4M -o /dev/null \
            -w '%{http_code} %{size_download}\n' "$URL/big32m" || echo "curl-$?"
    done
}
slow_client_loop() { # a whole request sent 4 bytes every 50 ms (about 2 s); the status line
    local req=$'GET /slow HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n' i line
    trap '' PIPE
    while ((EPOCHSECONDS < END_AT)); do
        if exec 3<>"/dev/tcp/127.0.0.1/$PORT"; then
            for ((i = 0; i < ${#req}; i += 4)); do
                printf '%s' "${req:i:4}" >&3 2>/dev/null || break
                sleep 0.05
            done
            line=
            IFS= read -r -t 15 line <&3 || true
            echo "${line%$'\r'}"
            exec 3>&- 3<&-
        else
            echo "connect-failed"
        fi
        sleep 0.2
    done
}
slowloris_loop() { # a head that never ends: one byte a second until the balancer answers (408)
    local i line
    trap '' PIPE
    while ((EPOCHSECONDS < END_AT)); do
        if exec 3<>"/dev/tcp/127.0.0.1/$PORT"; then
            printf 'GET /slowloris HTTP/1.1\r\nHost: soak\r\nX-Slow: ' >&3 2>/dev/null || true
            line=
            for ((i = 0; i < 30; i++)); do
                IFS= read -r -t 1 line <&3 && break
                printf 'a' >&3 2>/dev/null || break
            done
            [[ -z $line ]] && IFS= read -r -t 2 line <&3
            echo "${line%$'\r'}"
            exec 3>&- 3<&-
        else
            echo "connect-failed"
        fi
    done
}
export -f upload_loop slow_reader_loop slow_client_loop slowloris_loop
start_bg "$TMP/uploads.out" bash -c upload_loop
start_bg "$TMP/slowreaders.out" bash -c slow_reader_loop
for n in 1 2 3; do
    start_bg "$TMP/slowclients-$n.out" bash -c slow_client_loop
done
for n in 1 2; do
    start_bg "$TMP/slowloris-$n.out" bash -c slowloris_loop
done
LOAD_PIDS=("${STARTED[@]: -11}")

log "running mixed load for $MINUTES min"
while ((EPOCHSECONDS < LOAD_START + 10)); do sleep 1; done
sample "load-10s" || true
for ((m = 1; m <= MINUTES; m++)); do
    while ((EPOCHSECONDS < LOAD_START + m * 60)); do sleep 1; done
    sample "minute-$m" || break
done

# The load ends by itself; wait for it (bounded), then let the balancer settle.
for pid in "${LOAD_PIDS[@]}"; do
    for ((i = 0; i < 900; i++)); do alive "$pid" || break; sleep 0.1; done
    stop_pid "$pid"
done
sleep 3
sample "idle-after" || true
sockets
# The origins close idle connections after 10 s: the balancer's pool should let them go.
sleep 12
sample "idle-15s" || true
sockets

# ------------------------------------------------------------------ errors
echo
echo "# load generators"
wrk_line() { # name: requests, socket errors, non-2xx
    awk -v name="$1" '
        /requests in/ { req = $1 }
        /Socket errors/ { gsub(/,/, ""); se = "connect=" $4 " read=" $6 " write=" $8 " timeout=" $10 }
        /Non-2xx/ { non = $NF }
        END { printf "wrk %-9s requests=%s socket_errors: %s non2xx=%d\n", name, req, (se == "" ? "none" : se), non }' \
        "$TMP/wrk-$1.out"
}
FAIL=0
for w in keepalive close css churn; do
    line=$(wrk_line "$w")
    echo "$line"
    [[ $line == *"socket_errors: none non2xx=0" ]] || FAIL=1
done
count() { grep -c -- "$2" "$1" 2>/dev/null || true; }
up_ok=$(count "$TMP/uploads.out" '^200$') up_all=$(wc -l <"$TMP/uploads.out")
echo "uploads (4 MiB): $up_ok of $up_all answered 200"
((up_ok == up_all)) || FAIL=1
sr_ok=$(count "$TMP/slowreaders.out" "^200 $((32 << 20))$") sr_all=$(wc -l <"$TMP/slowreaders.out")
echo "slow readers (32 MiB at 4 MiB/s): $sr_ok of $sr_all complete"
((sr_ok == sr_all)) || FAIL=1
sc_ok=$(cat "$TMP"/slowclients-*.out | grep -c '^HTTP/1.1 200' || true)
sc_all=$(cat "$TMP"/slowclients-*.out | wc -l)
echo "slow clients (request over ~2 s): $sc_ok of $sc_all answered 200"
((sc_ok == sc_all)) || FAIL=1
sl_408=$(cat "$TMP"/slowloris-*.out | grep -c '^HTTP/1.1 408' || true)
sl_all=$(cat "$TMP"/slowloris-*.out | wc -l)
echo "slowloris (head never ends): $sl_408 of $sl_all answered 408"
((sl_408 == sl_all)) || FAIL=1
echo "agent: $(tail -n 1 "$TMP/agent.log")"
rejected=$(tail -n 1 "$TMP/agent.log" | sed -n 's/.* rejected=\([0-9]*\).*/\1/p')
invalid=$(tail -n 1 "$TMP/agent.log" | sed -n 's/.* invalid_sent=\([0-9]*\).*/\1/p')
((${rejected:-0} <= ${invalid:-0})) || { echo "the balancer rejected valid sets"; FAIL=1; }
grep -o 'applied server set version=[0-9]* .*shards=[0-9]*us' "$TMP/balancer.log" |
    sed 's/.*shards=\([0-9]*\)us/\1/' | sort -n | awk '
    { a[++n] = $1; if ($1 > 100000) slow++ }
    END { if (n) printf "agent sets applied on every shard: %d; propagation p50 %.1f ms, p99 %.1f ms, max %.1f ms; over 100 ms: %d\n",
              n, a[int((n + 1) * 0.5)] / 1000, a[int((n - 1) * 0.99) + 1] / 1000, a[n] / 1000, slow }'
warns=$(grep -E ' (WARN|ERROR) ' "$TMP/balancer.log" | grep -vc 'rejected server set' || true)
echo "balancer log: $warns warning/error lines besides the agent's deliberately invalid sets"
grep -E ' (WARN|ERROR) ' "$TMP/balancer.log" | grep -v 'rejected server set' | head -n 5 || true
((warns == 0)) || FAIL=1

# ------------------------------------------------------------------ flatness
echo
echo "# flatness"
printf '%s\n' "${SAMPLES[@]}" | awk '
    $1 == "idle-before" { ib_rss = $2; ib_fds = $3 }
    $1 == "load-10s" || $1 ~ /^minute-/ {
        n++; if (n == 1) { f_label = $1; f_rss = $2; f_fds = $3 }
        l_label = $1; l_rss = $2; l_fds = $3
        if (n == 1 || $2 < lo) lo = $2; if (n == 1 || $2 > hi) hi = $2
        if (n == 1 || $3 < flo) flo = $3; if (n == 1 || $3 > fhi) fhi = $3
    }
    $1 ~ /^idle-/ && $1 != "idle-before" { e_label = $1; e_rss = $2; e_fds = $3 }
    END {
        if (n < 2) { print "too few samples under load"; exit }
        printf "under load: rss %.1f MiB at %s -> %.1f MiB at %s (%+.1f MiB); fds %d -> %d\n",
            f_rss / 1024, f_label, l_rss / 1024, l_label, (l_rss - f_rss) / 1024, f_fds, l_fds
        printf "range under load (%d samples): rss %.1f..%.1f MiB, fds %d..%d\n", n, lo / 1024, hi / 1024, flo, fhi
        printf "idle: rss %.1f MiB before -> %.1f MiB at %s; fds %d before -> %d at %s\n",
            ib_rss / 1024, e_rss / 1024, e_label, ib_fds, e_fds, e_label
    }'
alive "$LB_PID" || { echo "the balancer died"; FAIL=1; }
((FAIL == 0)) && echo "result: ok" || echo "result: errors (see above)"
exit "$FAIL"
