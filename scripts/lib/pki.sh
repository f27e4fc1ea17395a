# shellcheck shell=bash
# Certificates and kubeconfigs for the test cluster (scripts/k8s-control-plane, scripts/k8s-node),
# signed by the cluster CA in a PKI directory (ca.crt, ca.key).

# cert PKI NAME SUBJECT [SUBJECT_ALT_NAMES]: PKI/NAME.{key,crt}; a client certificate, or a
# serving and client one when alt names are given.
cert() {
  local pki=$1 name=$2 subject=$3 san=${4:-} ext
  openssl req -new -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -subj "$subject" \
    -out "$pki/$name.csr" 2>/dev/null
  ext="$pki/$name.ext"
  if [[ -n "$san" ]]; then
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$san" >"$ext"
  else
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$ext"
  fi
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 2 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
}

# kubeconfig FILE PKI USER SERVER: a kubeconfig for USER's certificate (from cert).
kubeconfig() {
  cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$4", certificate-authority: "$2/ca.crt"}
users:
- name: $3
  user: {client-certificate: "$2/$3.crt", client-key: "$2/$3.key"}
contexts:
- name: local
  context: {cluster: local, user: $3, namespace: default}
current-context: local
KUBECONFIG
  chmod 600 "$1"
}
