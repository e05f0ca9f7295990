#!/usr/bin/env bash
# One-shot bootstrap of the compose mesh (the `bootstrap` service), run
# once the control-plane replicas are ready: gives each demo service's
# sidecar the mesh CA and a join token of its own, and writes the demo's
# authorization rule.
#
# Reads the bootstrap admin token and ca.pem from the first replica's data
# dir ($CP_DATA, its volume mounted read-only; the replicas share tokens
# and the CA through etcd). Writes $OUT/<service>/ca.pem and
# $OUT/<service>/sidecar.toml (join_token and ca_file only: the rest of a
# sidecar's configuration is in compose.yaml's environment), each
# directory 0700 and mounted into that service's sidecars alone
# (compose's volume subpath). A service that already has its files keeps
# them, so `docker compose up` again mints nothing new.
set -euo pipefail

CP_DATA=${CP_DATA:-/cp}
OUT=${OUT:-/var/lib/isdp}
# Each join token may act as its service and discover only its upstreams.
# SERVICE:UPSTREAM,... ; the web client calls payments, payments nobody.
SERVICES=${SERVICES:-"payments: web:payments"}

export ISDP_CA_FILE="$CP_DATA/ca.pem"
# The admin token goes to isdpctl through the environment, never argv.
ISDP_TOKEN=$(<"$CP_DATA/admin.token")
export ISDP_TOKEN
umask 077

for entry in $SERVICES; do
    service=${entry%%:*}
    upstreams=${entry#*:}
    dir="$OUT/$service"
    if [ -s "$dir/sidecar.toml" ]; then
        echo "bootstrap: $service already has a join token"
        continue
    fi
    mkdir -p "$dir"
    args=(token create --role join --service "$service"
          --description "compose mesh: $service sidecars")
    IFS=, read -r -a ups <<<"$upstreams"
    for up in "${ups[@]}"; do
        args+=(--upstream "$up")
    done
    # The secret is the only line on stdout (the notice goes to stderr).
    secret=$(isdpctl "${args[@]}")
    cp "$CP_DATA/ca.pem" "$dir/ca.pem"
    printf 'ca_file = "%s"\njoin_token = "%s"\n' "/var/lib/isdp/ca.pem" "$secret" \
        >"$dir/sidecar.toml.tmp"
    mv "$dir/sidecar.toml.tmp" "$dir/sidecar.toml"
    echo "bootstrap: $service: join token and CA written to $dir"
done

# Zero trust for the demo: payments admits web only, and nothing else is
# allowed by default. Writing the same rule again replaces it.
isdpctl authz allow --to payments --from web --name allow-web
isdpctl authz default deny
echo "bootstrap: done"
