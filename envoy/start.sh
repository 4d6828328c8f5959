#!/bin/sh
# Starts Envoy with quotagate's Envoy token in its config (docker-compose.yml runs it in the envoy container).
# Envoy's static config cannot read environment variables, so envoy.yaml carries @QUOTAGATE_ENVOY_TOKEN@ where
# the token goes (the `authorization` initial_metadata of each gRPC call to quotagate); this puts
# $QUOTAGATE_ENVOY_TOKEN there in a private copy and runs Envoy on that copy. Arguments go on to Envoy.
set -eu
template="${QUOTAGATE_ENVOY_TEMPLATE:-/etc/envoy/envoy.yaml}"
config="${QUOTAGATE_ENVOY_CONFIG:-/tmp/envoy.yaml}"
token="${QUOTAGATE_ENVOY_TOKEN:-}"
# The characters of hex and base64 tokens only: nothing that sed or YAML would read as anything but text.
case "$token" in
  "" | *[!A-Za-z0-9._~+/=-]*)
    echo "envoy/start.sh: QUOTAGATE_ENVOY_TOKEN must be set, with letters, digits and . _ ~ + / = - only" >&2
    exit 2 ;;
esac
if [ "${#token}" -lt 16 ]; then
  echo "envoy/start.sh: QUOTAGATE_ENVOY_TOKEN must have at least 16 characters" >&2
  exit 2
fi
grep -q "@QUOTAGATE_ENVOY_TOKEN@" "$template" || {
  echo "envoy/start.sh: $template has no @QUOTAGATE_ENVOY_TOKEN@ to replace" >&2
  exit 2
}
umask 077
sed "s|@QUOTAGATE_ENVOY_TOKEN@|$token|g" "$template" > "$config"
exec envoy -c "$config" "$@"
