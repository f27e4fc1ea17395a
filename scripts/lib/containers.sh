# shellcheck shell=bash
# buildah and podman on one image store, for every script that builds or runs images:
# overlay storage under the CI cache (so images and build layers survive between runs),
# runc and cgroupfs (no systemd here), no default ulimits (raising them needs
# CAP_SYS_RESOURCE, which this machine does not grant).
CACHE="${SHOP_CI_CACHE:-$HOME/.cache/shop-ci}"
CONTAINERS_STORE="$CACHE/containers"
mkdir -p "$CONTAINERS_STORE"
[[ -e "$CONTAINERS_STORE/containers.conf" ]] ||
  printf '[containers]\ndefault_ulimits = []\n' >"$CONTAINERS_STORE/containers.conf"
export CONTAINERS_CONF="$CONTAINERS_STORE/containers.conf"
store_flags=(--root "$CONTAINERS_STORE/storage" --runroot "$CONTAINERS_STORE/run" --storage-driver overlay)
bh() { buildah "${store_flags[@]}" "$@"; }
pm() { podman "${store_flags[@]}" --runtime "$(command -v runc)" --cgroup-manager cgroupfs "$@"; }
# `buildah build` flags for the project's images here: no network namespace of its own
# (chroot), local base images only, and the host's CA bundle for cargo's downloads. One
# list for scripts/build-images and the skaffold run of scripts/test-k8s, so both use the
# same cached layers.
export SHOP_BUILD_FLAGS="--isolation chroot --pull=never -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"
# The same store for tools that take no flags (skaffold's custom builder runs plain buildah).
[[ -e "$CONTAINERS_STORE/storage.conf" ]] ||
  printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
    "$CONTAINERS_STORE/storage" "$CONTAINERS_STORE/run" >"$CONTAINERS_STORE/storage.conf"
export CONTAINERS_STORAGE_CONF="$CONTAINERS_STORE/storage.conf"
