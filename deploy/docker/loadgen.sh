#!/usr/bin/env bash
# The compose mesh's `web` application: calls payments through its
# sidecar's upstream listener (127.0.0.1:9191, loopback only: the sidecar
# and this container share one network namespace) a few times a second,
# so the dashboard, the traces and the alerts have traffic to show. Each
# answer names the payments instance that served it; the log shows the
# balancing (`docker compose logs -f web`).
# Plain bash (/dev/tcp): the image has no curl.
set -uo pipefail

TARGET=${TARGET:-127.0.0.1:9191}
INTERVAL=${INTERVAL:-0.3}
host=${TARGET%:*}
port=${TARGET##*:}
n=0

while true; do
    n=$((n + 1))
    if exec 3<>"/dev/tcp/$host/$port"; then
        printf 'GET /pay/%d HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n' "$n" >&3
        reply=$(timeout 5 cat <&3)
        exec 3<&-
        status=$(head -n1 <<<"$reply" | tr -d '\r')
        instance=$(grep -o '"instance":"[^"]*"' <<<"$reply" || true)
        echo "request $n: $status $instance"
    else
        echo "request $n: cannot connect to $TARGET (sidecar starting?)"
    fi
    sleep "$INTERVAL"
done
