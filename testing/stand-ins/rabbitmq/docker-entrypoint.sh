#!/usr/bin/env bash
# Entrypoint of the RabbitMQ stand-in image (see Containerfile): the behaviour of the
# official image's entrypoint (docker-library/rabbitmq, 4.0), written for this project.
#
# Started as root for a rabbitmq* command, it hands $RABBITMQ_DATA_DIR to the rabbitmq user
# (only what is not already its own) and runs itself again as that user (setpriv stands in
# for gosu). Started as any other UID (a pod's runAsUser), it runs as that UID. The
# environment variables the image once turned into configuration are refused with the
# reason: the server reads RABBITMQ_DEFAULT_USER, RABBITMQ_DEFAULT_PASS and
# RABBITMQ_DEFAULT_VHOST itself, and everything else belongs in /etc/rabbitmq/conf.d/*.conf.
# When the host name has a domain, the node is named with it (RABBITMQ_USE_LONGNAME).
set -euo pipefail

if [[ "${1:-}" == rabbitmq* && "$(id -u)" == 0 ]]; then
  if [[ "$1" == rabbitmq-server ]]; then
    find "$RABBITMQ_DATA_DIR" \! -user rabbitmq -exec chown rabbitmq '{}' +
  fi
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "${BASH_SOURCE[0]}" "$@"
fi

deprecated=(
  RABBITMQ_DEFAULT_PASS_FILE RABBITMQ_DEFAULT_USER_FILE
  RABBITMQ_MANAGEMENT_SSL_CACERTFILE RABBITMQ_MANAGEMENT_SSL_CERTFILE
  RABBITMQ_MANAGEMENT_SSL_DEPTH RABBITMQ_MANAGEMENT_SSL_FAIL_IF_NO_PEER_CERT
  RABBITMQ_MANAGEMENT_SSL_KEYFILE RABBITMQ_MANAGEMENT_SSL_VERIFY
  RABBITMQ_SSL_CACERTFILE RABBITMQ_SSL_CERTFILE RABBITMQ_SSL_DEPTH
  RABBITMQ_SSL_FAIL_IF_NO_PEER_CERT RABBITMQ_SSL_KEYFILE RABBITMQ_SSL_VERIFY
  RABBITMQ_VM_MEMORY_HIGH_WATERMARK
)
refused=
for name in "${deprecated[@]}"; do
  if [[ -n "${!name:-}" ]]; then
    echo "error: $name is set but deprecated" >&2
    refused=1
  fi
done
if [[ -n "$refused" ]]; then
  echo "error: deprecated environment variables detected; put the setting in a configuration file" >&2
  echo "       under /etc/rabbitmq/conf.d/ instead (https://www.rabbitmq.com/configure.html)" >&2
  exit 1
fi

if [[ -z "${RABBITMQ_USE_LONGNAME:-}" && "$(hostname)" != "$(hostname -s)" ]]; then
  export RABBITMQ_USE_LONGNAME=true
fi

exec "$@"
