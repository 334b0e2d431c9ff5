#!/usr/bin/env bash
# Self-signed TLS material for a Flower SuperLink on this host (127.0.0.1 / localhost):
#   scripts/make-certs.sh DIR   ->  DIR/ca.crt, DIR/ca.key, DIR/server.pem, DIR/server.key
# The SuperLink serves server.pem/server.key (with ca.crt as --ssl-ca-certfile); SuperNodes and
# the flwr CLI trust ca.crt (--root-certificates / root-certificates). For a coordinator reached
# by another name, pass it (and any addresses) as extra arguments: DIR NAME|IP ...
# Keys never belong in git: DIR should be outside the repository or ignored (.gitignore: certs/).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 DIR [EXTRA_NAME_OR_IP ...]  (writes a CA and a server certificate for 127.0.0.1/localhost)" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "$0: openssl is needed" >&2; exit 2; }
dir="$1"; shift
mkdir -p "$dir"
chmod 700 "$dir"

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then sans+=",IP:$name"; else sans+=",DNS:$name"; fi
done

# CA (valid 1 year) and a server key + certificate signed by it, with the names as SANs
openssl req -x509 -newkey rsa:3072 -sha256 -days 365 -nodes -subj "/CN=PromptFolio local CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:3072 -sha256 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
openssl x509 -req -sha256 -days 365 -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -out "$dir/server.pem" \
    -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$sans") \
    2>/dev/null
rm -f "$dir/server.csr" "$dir/ca.srl"
chmod 600 "$dir"/*.key
openssl verify -CAfile "$dir/ca.crt" "$dir/server.pem" >/dev/null
echo "wrote $dir/ca.crt, $dir/server.pem and their keys (SANs: $sans)"
