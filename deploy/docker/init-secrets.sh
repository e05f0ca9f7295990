#!/usr/bin/env bash
# Creates the compose mesh's secrets, once, on the host: secrets/kek.env
# with the key-encryption key (ISDP_KEK: base64 of 32 random bytes) that
# seals the mesh CA's private key in etcd. Both control-plane replicas read
# the same file (compose `env_file`), so each can open what the other
# sealed. It is never in the image, never in git (secrets/ is ignored);
# back it up apart from etcd's volumes: without it the stored CA key cannot
# be opened and the control plane refuses to start.
# An existing file is kept (a new KEK would lock the replicas out of the
# CA key already in etcd).
set -euo pipefail
cd "$(dirname "$0")"

umask 077
mkdir -p secrets
if [ -s secrets/kek.env ]; then
    echo "secrets/kek.env exists; kept"
    exit 0
fi
printf 'ISDP_KEK=%s\n' "$(head -c 32 /dev/urandom | base64)" >secrets/kek.env.tmp
mv secrets/kek.env.tmp secrets/kek.env
echo "wrote secrets/kek.env (mode 0600): back it up apart from the etcd volumes"
