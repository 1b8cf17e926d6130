#!/bin/sh
# The mesh's secrets, made before any aimass process starts: the compose "init" service runs this once per
# `docker compose up` (docker-compose.yml), and every other aimass container waits for it to succeed.
#
#   sh mesh-init.sh                 the head host: CA, every process's certificate, store schema, admin key
#   sh mesh-init.sh worker NAME [FOLDER]
#                                   certificates for another host's node agent and replicas (NAME: that host's
#                                   name in them, AIMASS_WORKER_NAME there), in FOLDER (default /out, a bind mount)
#
# Where things go (the init service's environment):
#   AIMASS_MESH__PKI_DIR   the CA and every certificate it issued, in the init service's own state volume: the CA
#                          key never leaves it (no other container mounts it).
#   MESH_PKI_OUT           per process, a folder <name>/ holding ca.crt, <name>.crt and <name>.key: each container
#                          mounts only its own folder (volume subpath, read-only), so a replica that is broken into
#                          holds its own role's key and no other (docker-compose.yml, x-pki).
#   AIMASS_STATE_DIR       `aimass init` writes the admin key there (admin.key, owner-only).
#
# Each run issues again only certificates close to expiry (aimass.pki), so a restart a year on renews them. It runs
# as root, because fresh named volumes belong to root, and hands every file to MESH_PKI_OWNER (the image's user,
# which the aimass containers and Consul run as): keys stay 0600, readable by that user only.
set -eu

state_pki="${AIMASS_MESH__PKI_DIR:?the CA folder (AIMASS_MESH__PKI_DIR) is not set}"
out="${MESH_PKI_OUT:?the folder for the processes certificates (MESH_PKI_OUT) is not set}"
state="${AIMASS_STATE_DIR:?the state folder (AIMASS_STATE_DIR) is not set}"
owner="${MESH_PKI_OWNER:-aimass:aimass}"
# Nothing written here is for others to read; certificates are opened up below, one by one.
umask 077

# The files of identity $1 (and the CA certificate) into folder $2, with the modes every reader expects.
export_identity() {
    cp "$state_pki/ca.crt" "$state_pki/$1.crt" "$state_pki/$1.key" "$2/"
    chmod 0644 "$2/ca.crt" "$2/$1.crt"
    chmod 0600 "$2/$1.key"
}

# Root (the init container) hands what it wrote to the image's user; anyone else already owns it.
hand_over() {
    if [ "$(id -u)" = 0 ]; then
        chown -R "$owner" "$@"
    fi
}

if [ "${1:-}" = worker ]; then
    worker="${2:?usage: mesh-init.sh worker NAME [FOLDER] (NAME: the worker host in its certificates names)}"
    dest="${3:-/out}"
    mkdir -p "$dest"
    chmod 0700 "$dest"
    # No CA here means this is not the head host's state volume: `aimass certs issue` says so and stops.
    for role in ${MESH_WORKER_ROLES:-node-agent nlp vision speech llm}; do
        aimass certs issue --role "$role" --name "$role-$worker" --pki-dir "$state_pki"
        export_identity "$role-$worker" "$dest"
    done
    hand_over "$dest" "$state_pki"
    echo "certificates for $worker in $dest: copy them to a folder on $worker (owner uid 10001, keys 0600) and" \
        "set AIMASS_PKI_DIR to it and AIMASS_WORKER_NAME=$worker there (compose/docker-compose.worker.yml)"
    exit 0
fi

aimass certs init --pki-dir "$state_pki"
for name in ${MESH_IDENTITIES:?the identities to issue (MESH_IDENTITIES) are not set}; do
    # On the head host each process's name is its role: gateway, scheduler, nlp, ...
    aimass certs issue --role "$name" --name "$name" --pki-dir "$state_pki"
    mkdir -p "$out/$name"
    chmod 0700 "$out/$name"
    export_identity "$name" "$out/$name"
done
# The store's schema (PostgreSQL, AIMASS_STORE__URL) and the admin key; the CA is the one above.
aimass init
hand_over "$out" "$state" "$state_pki"
