#!/usr/bin/env bash
# Installs ISDP on the cluster kubectl points at, then the demo, in the
# order the pieces need each other. Run by an operator (it uses the
# operator's kubectl credentials: nothing in the cluster needs RBAC).
#
#   deploy/kubernetes/bootstrap.sh          # mesh + demo
#   deploy/kubernetes/bootstrap.sh mesh     # etcd and the control plane only
#
# 1. Secret isdp/isdp-kek: the key-encryption key (base64 of 32 random
#    bytes), made once and kept: a new one would lock the replicas out of
#    the CA key sealed in etcd. Back it up apart from etcd.
# 2. kubectl apply -k deploy/kubernetes; wait for both replicas.
# 3. Secret isdp/isdp-admin-token: the bootstrap admin token, copied from
#    isdp-control-plane-0's data dir (an emptyDir: it would go with the
#    pod). Mint narrower tokens for people and CI with it.
# 4. Demo (isdp-demo): ConfigMap isdp-ca (the mesh CA), a join token per
#    service as a Secret, the authorization rule, then the workloads.
set -euo pipefail
cd "$(dirname "$0")"

NS=${ISDP_NAMESPACE:-isdp}
DEMO_NS=${ISDP_DEMO_NAMESPACE:-isdp-demo}
CP=isdp-control-plane-0
what=${1:-all}

kc() { kubectl "$@"; }
# isdpctl inside the first replica, as its local operator: it finds ca.pem
# and admin.token in ISDP_DATA_DIR and dials 127.0.0.1:15010.
isdpctl() { kc -n "$NS" exec "$CP" -c control-plane -- isdpctl "$@"; }

kc get namespace "$NS" >/dev/null 2>&1 || kc apply -f namespace.yaml
if ! kc -n "$NS" get secret isdp-kek >/dev/null 2>&1; then
    echo "creating Secret $NS/isdp-kek (back it up: it opens the CA key in etcd)"
    kc -n "$NS" create secret generic isdp-kek \
        --from-literal=kek="$(head -c 32 /dev/urandom | base64)"
fi

kc apply -k .
kc -n "$NS" rollout status statefulset/isdp-etcd --timeout=5m
kc -n "$NS" rollout status statefulset/isdp-control-plane --timeout=5m

if ! kc -n "$NS" get secret isdp-admin-token >/dev/null 2>&1; then
    token=$(kc -n "$NS" exec "$CP" -c control-plane -- cat /var/lib/isdp/data/admin.token)
    kc -n "$NS" create secret generic isdp-admin-token --from-literal=token="$token"
    echo "kept the bootstrap admin token in Secret $NS/isdp-admin-token"
fi
[ "$what" = mesh ] && exit 0

kc get namespace "$DEMO_NS" >/dev/null 2>&1 || kc apply -f examples/namespace.yaml
kc -n "$NS" exec "$CP" -c control-plane -- cat /var/lib/isdp/data/ca.pem \
    | kc -n "$DEMO_NS" create configmap isdp-ca --from-file=ca.pem=/dev/stdin \
        --dry-run=client -o yaml | kc apply -f -
# service:upstream,... ; each token acts as its service and reads only
# its upstreams.
for entry in payments: web:payments; do
    service=${entry%%:*}
    upstreams=${entry#*:}
    secret="$service-isdp-join"
    kc -n "$DEMO_NS" get secret "$secret" >/dev/null 2>&1 && continue
    args=(token create --role join --service "$service" --description "k8s $DEMO_NS/$service")
    IFS=, read -r -a ups <<<"$upstreams"
    for up in "${ups[@]}"; do args+=(--upstream "$up"); done
    join=$(isdpctl "${args[@]}")
    kc -n "$DEMO_NS" create secret generic "$secret" --from-literal=token="$join"
done
isdpctl authz allow --to payments --from web --name allow-web
kc apply -k examples
kc -n "$DEMO_NS" rollout status deployment/payments --timeout=5m
isdpctl instances payments
