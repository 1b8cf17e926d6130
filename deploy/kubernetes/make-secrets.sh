#!/bin/sh
# The Secrets every overlay needs, made on the operator's machine, never baked into an image:
#
#   AIMASS_STORE_URL='postgresql+psycopg://aimass:PASSWORD@postgres.db.svc:5432/aimass' \
#       sh deploy/kubernetes/make-secrets.sh ~/aimass-pki > secrets.yaml
#   kubectl apply -f deploy/kubernetes/base/namespace.yaml && kubectl apply -f secrets.yaml
#
# PKI_DIR (the first argument) holds the mesh CA: it is made there on the first run and its key never leaves that
# folder (keep it offline, like any CA key); every later run reuses it and issues again only certificates close to
# expiry (aimass certs issue). Output: one Secret aimass-pki-<role> per process role (ca.crt, <role>.crt, <role>.key:
# what a pod mounts at /etc/aimass/pki), aimass-store (key url: the store's SQLAlchemy URL, from AIMASS_STORE_URL),
# and with AIMASS_CONSUL_NAMESPACE set (production: consul), aimass-pki-consul in that namespace, the certificate
# Consul's servers present when they run the processes' gRPC health checks. Needs `aimass` (pip install aimass) and kubectl (its
# --dry-run=client writes the YAML offline).
set -eu

pki="${1:?usage: make-secrets.sh PKI_DIR (the folder of the mesh CA; made if absent) > secrets.yaml}"
store_url="${AIMASS_STORE_URL:?set AIMASS_STORE_URL to the store's SQLAlchemy URL (PostgreSQL for several pods)}"
namespace="${AIMASS_NAMESPACE:-aimass}"
roles="${AIMASS_ROLES:-gateway scheduler node-agent nlp vision speech llm rest}"
if [ -n "${AIMASS_CONSUL_NAMESPACE:-}" ]; then roles="$roles consul"; fi
umask 077

aimass certs init --pki-dir "$pki" >&2
for role in $roles; do
    aimass certs issue --role "$role" --name "$role" --pki-dir "$pki" >&2
    # Consul's servers run the processes' gRPC health checks with this one: it goes to Consul's namespace.
    if [ "$role" = consul ]; then where="$AIMASS_CONSUL_NAMESPACE"; else where="$namespace"; fi
    echo ---
    kubectl create secret generic "aimass-pki-$role" --namespace "$where" --dry-run=client -o yaml \
        --from-file=ca.crt="$pki/ca.crt" --from-file="$role.crt=$pki/$role.crt" --from-file="$role.key=$pki/$role.key"
done
echo ---
kubectl create secret generic aimass-store --namespace "$namespace" --dry-run=client -o yaml \
    --from-literal=url="$store_url"
