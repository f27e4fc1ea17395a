#!/usr/bin/env bash
# User-space instructions per proxied request, ours vs nginx, counted by callgrind.
#
# Wall-clock figures on a shared 2-core machine swing with whatever else runs; instruction
# counts do not (the same binary and load give the same count with the other core busy).
# Kernel time is not counted: this isolates what differs between proxies, their own code.
#
# Each proxy runs alone under callgrind (one worker) in front of the seed's Go product
# service; wrk drives it for a few seconds at 8 connections. The count of a proxy started
# and stopped without traffic is subtracted, then divided by the requests served.
#
# Usage: bench/instructions.sh [seconds]   (needs valgrind, wrk, nginx, go; installs them)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-8}

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx)
command -v go >/dev/null || need+=(golang-go)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

target=${CARGO_TARGET_DIR:-target}
cargo build --profile profiling --locked -p shop-gateway
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The seed's product service, from the blog post's code block.
python3 - "$work" <<'EOF'
import os, re, sys
work = sys.argv[1]
seeds = os.path.join("..", "shared", "seeds")
text = open(os.path.join(seeds, sorted(p for p in os.listdir(seeds) if p.startswith("000_"))[0])).read()
for block in re.findall(r"```go\n(.*?)```", text, re.S):
    if block.lstrip().splitlines()[0].strip() == "// product/main.go":
        os.makedirs(f"{work}/seed", exist_ok=True)
        open(f"{work}/seed/main.go", "w").write(block)
        open(f"{work}/seed/go.mod", "w").write("module seed/product\n\ngo 1.19\n")
EOF
(cd "$work/seed" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -o "$work/seed-product" .)
"$work/seed-product" >/dev/null 2>&1 &
pids+=($!)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 150); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done
  echo "no answer from $1" >&2; return 1
}
wait_http http://127.0.0.1:8081/products

# run NAME URL SECONDS CMD...: prints "requests instructions" for one callgrind run.
run() {
  local name=$1 url=$2 secs=$3; shift 3
  local out="$work/callgrind.$name.$secs"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" 2>"$work/$name.log" &
  local pid=$!
  wait_http "$url"
  local served=0
  if [ "$secs" -gt 0 ]; then
    served=$(wrk -t1 -c8 -d"${secs}s" "$url" | awk '/requests in/{print $1}')
  fi
  kill -TERM "$pid"
  # nginx without a master process can sit on TERM under valgrind; QUIT ends it gracefully.
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -QUIT "$pid" 2>/dev/null || true
  wait "$pid" || true
  local total
  total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
  echo "$served $total"
}

port=$(free_port)
# Authentication on, as deployed (/api/products is public; the verifier needs a key).
JWT_PUBLIC_KEY=$(openssl genpkey -algorithm ed25519 | openssl pkey -pubout)
# Exported, not passed through `env`: valgrind does not follow an exec.
export PORT="$port" HOST=127.0.0.1 PRODUCT_URL=http://127.0.0.1:8081 GATEWAY_WORKERS=1 \
  ACCESS_LOG=false RUST_LOG=warn SHUTDOWN_DELAY=0s SHUTDOWN_TIMEOUT=2s JWT_PUBLIC_KEY
gateway=("$target/profiling/gateway")
nginx_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
error_log $work/nginx/error.log warn;
pid $work/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;
    fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
    upstream product { server 127.0.0.1:8081; keepalive 128; }
    server {
        listen 127.0.0.1:$nginx_port;
        location = /ready { return 200; }
        location /api/ {
            proxy_pass http://product/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
nginx=(nginx -c "$work/nginx/nginx.conf")

report() {
  local name=$1 idle=$2 loaded=$3
  read -r _ base <<<"$idle"
  read -r served total <<<"$loaded"
  echo "$name $(( (total - base) / served )) $served"
}
ours=$(report ours "$(run ours-idle "http://127.0.0.1:$port/ready" 0 "${gateway[@]}")" \
  "$(run ours "http://127.0.0.1:$port/api/products" "$seconds" "${gateway[@]}")")
theirs=$(report nginx "$(run nginx-idle "http://127.0.0.1:$nginx_port/ready" 0 "${nginx[@]}")" \
  "$(run nginx "http://127.0.0.1:$nginx_port/api/products" "$seconds" "${nginx[@]}")")

printf '%-6s %18s %10s\n' proxy "instructions/req" requests
for line in "$ours" "$theirs"; do
  read -r name per served <<<"$line"
  printf '%-6s %18s %10s\n' "$name" "$per" "$served"
done
read -r _ ours_per _ <<<"$ours"
read -r _ nginx_per _ <<<"$theirs"
python3 -c "print(f'ours / nginx: {$ours_per / $nginx_per:.2f}x user-space instructions per request')"
