#!/usr/bin/env bash
# Installs everything the spokelet test suite needs on a Debian 12 machine and builds the real
# peers the tests run against, from the Go module proxy with the machine's Go:
#
#   Kubernetes  kube-apiserver, kube-controller-manager, kubectl   tests/env/go/kubernetes/go.mod
#   etcd        etcd                                              tests/env/go/etcd/go.mod
#   OCM         registration, work, placement, server             tests/env/go/ocm/go.mod
#               (+ OCM's CRDs, copied from the same module)
#
# Each version is pinned in exactly one place, its wrapper module's go.mod, with go.sum pinning
# every module's hash. A wrapper module is needed because Kubernetes and etcd replace their
# sibling modules with local directories, which `go install m@v` refuses; OCM's has none but is
# built the same way so its hashes are pinned too.
#
# Idempotent and cached: each peer is built into $SPOKELET_TEST_ASSETS/<peer>-<key>, where the
# key hashes the wrapper module, the build flags and the Go version, and the names the harness
# looks for ($SPOKELET_TEST_ASSETS/kube-apiserver, ..., ocm-crds) are links into it. A second
# run only checks the links (seconds); changing a pin builds the new version beside the old.
#
# Honours the envtest conventions, in the order the test harness uses them:
# TEST_ASSET_KUBE_APISERVER / TEST_ASSET_KUBE_CONTROLLER_MANAGER / TEST_ASSET_ETCD, then
# $KUBEBUILDER_ASSETS/<name>. When those name both Kubernetes binaries and etcd, no
# Kubernetes or etcd is built (OCM still is: nothing else provides it).
#
# Environment:
#   SPOKELET_TEST_ASSETS  where built binaries go (default ~/.cache/spokelet/test-assets)
#   SPOKELET_GO_CACHE     Go's module and build caches (default ~/.cache/spokelet/go)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ASSETS="${SPOKELET_TEST_ASSETS:-$HOME/.cache/spokelet/test-assets}"
GO_CACHE="${SPOKELET_GO_CACHE:-$HOME/.cache/spokelet/go}"
# The oldest Go that builds every pinned peer (Kubernetes 1.37 says `go 1.26.0`).
GO_MIN_MINOR=26
# Part of every cache key: a change here rebuilds everything.
BUILD_FLAGS="CGO_ENABLED=0 -trimpath -ldflags=-s -w"

log() { printf '[install] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and no sudo: run as root or install sudo"
  SUDO=(sudo)
fi

# --- Debian packages -------------------------------------------------------------------
# docker-registry: an OCI registry. skopeo: an independent OCI client. jq: scripts.
# lshw: hardware inventory tests. procps: kill(1) for stale-run cleanup, pgrep.
# systemd: `systemd-analyze security|verify` for the node service's unit
# (tests/tests/systemd_unit.rs); installing the package does not make it the init system.
packages=(docker-registry skopeo jq lshw procps systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package starts a registry on every interface (:5000) where an init system lets
  # it; the tests run their own on loopback, so stop and disable the packaged one.
  if [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now docker-registry >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/docker-registry ]; then
    "${SUDO[@]}" /etc/init.d/docker-registry stop >/dev/null 2>&1 || true
  fi
else
  log "Debian packages present"
fi

# --- Go ----------------------------------------------------------------------------------
# The machine's Go; never a downloaded toolchain (GOTOOLCHAIN=local), so a go.mod asking for
# a newer Go fails here, loudly, instead of fetching one.
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  PATH="/usr/local/go/bin:$PATH"
fi
command -v go >/dev/null 2>&1 || die "no Go on PATH (nor /usr/local/go/bin): Go 1.$GO_MIN_MINOR or later builds the test peers"
go_version=$(GOTOOLCHAIN=local go env GOVERSION)
go_minor=$(printf '%s\n' "$go_version" | sed -nE 's/^go1\.([0-9]+).*/\1/p')
[ -n "$go_minor" ] && [ "$go_minor" -ge "$GO_MIN_MINOR" ] \
  || die "$go_version is too old: the pinned peers need Go 1.$GO_MIN_MINOR or later"
export GOTOOLCHAIN=local GOMODCACHE="$GO_CACHE/mod" GOCACHE="$GO_CACHE/build" GOFLAGS="-mod=readonly -buildvcs=false"
# Every module is checked against the hashes in the wrapper's go.sum; the checksum database
# does not list some of them (OCM's), and the committed go.sum makes it unnecessary.
export GOSUMDB=off
mkdir -p "$ASSETS" "$GOMODCACHE" "$GOCACHE"
# The Kubernetes 1.20 tree earlier versions of this script built from Debian's source package
# (several GB) is never used again.
rm -rf "$HOME/.cache/spokelet/kubernetes-src"
for old in RECIPE .kube-apiserver.tmp .kube-controller-manager.tmp; do rm -f "$ASSETS/$old"; done

# --- Helpers -----------------------------------------------------------------------------
# The version of `module` that the wrapper in `dir` pins.
pinned() { (cd "$1" && go list -m -f '{{.Version}}' "$2"); }

# A key for everything that decides what a build of the wrapper in `dir` produces.
cache_key() {
  { cat "$1/go.mod" "$1/go.sum"; printf '%s\n%s\n' "$BUILD_FLAGS" "$go_version"; } \
    | sha256sum | cut -c1-12
}

# Points $ASSETS/<name> at <target> (relative to $ASSETS), replacing an old link atomically.
link() {
  ln -sfn "$2" "$ASSETS/.$1.link"
  mv -fT "$ASSETS/.$1.link" "$ASSETS/$1"
}

# build PEER DIR LDFLAGS MODFILE PACKAGE...: builds the packages of the wrapper module in DIR
# into $ASSETS/PEER-<key>/ unless that directory is complete; prints the directory's name.
# MODFILE, when not empty, is an alternative go.mod for `go build -modfile` (a patched copy):
# it and the files it replaces modules with join the key.
build() {
  local peer=$1 dir=$2 ldflags=$3 modfile=$4; shift 4
  local out key modfile_flag=()
  key=$(cache_key "$dir")
  if [ -n "$modfile" ]; then
    key=$( { printf '%s\n' "$key"; cat "$modfile"; patched_sources; } | sha256sum | cut -c1-12)
    modfile_flag=(-modfile "$modfile")
  fi
  out="$peer-$key"
  if [ -f "$ASSETS/$out/.complete" ]; then
    printf '%s\n' "$out"; return
  fi
  log "building $peer ($*) into $ASSETS/$out; log: $ASSETS/$out.log"
  local started=$SECONDS tmp="$ASSETS/.$out.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # Built into a scratch directory and moved into place, so an interrupted build never
  # leaves a directory that a later run would take for a complete one.
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath "${modfile_flag[@]}" -ldflags="-s -w $ldflags" -o "$tmp/" "$@") \
    >"$ASSETS/$out.log" 2>&1 || { tail -n 40 "$ASSETS/$out.log" >&2; die "building $peer failed (log: $ASSETS/$out.log)"; }
  touch "$tmp/.complete"
  rm -rf "${ASSETS:?}/$out" && mv "$tmp" "$ASSETS/$out"
  log "built $peer in $((SECONDS - started))s"
  # Builds of other pins or recipes are not used again: each is a few hundred MB.
  find "$ASSETS" -mindepth 1 -maxdepth 1 -regextype posix-extended -regex ".*/$peer-[0-9a-f]{12}(\.log)?" \
    ! -name "$out" ! -name "$out.log" -exec rm -rf {} +
  printf '%s\n' "$out"
}

# Same lookup as the harness (tests/src/assets.rs) for one binary, minus the cache and PATH.
resolve() { # resolve NAME ENV_VAR -> prints the path, or nothing
  local name=$1 var=$2
  if [ -n "${!var:-}" ]; then
    [ -x "${!var}" ] || die "$var=${!var} is not an executable file"
    printf '%s\n' "${!var}"; return
  fi
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$name" ]; then
    printf '%s\n' "$KUBEBUILDER_ASSETS/$name"
  fi
}

# --- Kubernetes --------------------------------------------------------------------------
k8s_dir="$here/go/kubernetes"
if [ -n "$(resolve kube-apiserver TEST_ASSET_KUBE_APISERVER)" ] \
   && [ -n "$(resolve kube-controller-manager TEST_ASSET_KUBE_CONTROLLER_MANAGER)" ]; then
  log "the tests will run the Kubernetes servers of TEST_ASSET_* / KUBEBUILDER_ASSETS"
fi
# Built either way: the deploy tests need a current kubectl with kustomize, and kubectl shares
# nearly all of its build with the servers.
k8s_version=$(pinned "$k8s_dir" k8s.io/kubernetes)
k8s_minor=$(printf '%s\n' "$k8s_version" | sed -nE 's/^v1\.([0-9]+)\..*/\1/p')
# What `make` would stamp: without it the binaries call themselves v0.0.0-master, and clients
# and the servers' /version would report that.
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
done
k8s_out=$(build kubernetes "$k8s_dir" "$k8s_ldflags" "" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)
for bin in kube-apiserver kube-controller-manager kubectl; do link "$bin" "$k8s_out/$bin"; done
log "Kubernetes $k8s_version: $ASSETS/$k8s_out"

# --- etcd ------------------------------------------------------------------------------------
etcd_dir="$here/go/etcd"
if [ -n "$(resolve etcd TEST_ASSET_ETCD)" ]; then
  log "etcd from TEST_ASSET_ETCD / KUBEBUILDER_ASSETS; not built"
else
  etcd_out=$(build etcd "$etcd_dir" "" "" go.etcd.io/etcd/server/v3)
  # Go names the binary after the module path without its major version: `server`.
  link etcd "$etcd_out/server"
  log "etcd $(pinned "$etcd_dir" go.etcd.io/etcd/server/v3): $ASSETS/$etcd_out"
fi

# --- OCM ---------------------------------------------------------------------------------------
ocm_dir="$here/go/ocm"
# OCM's gRPC server listens on ":" + its port, every interface, and no setting changes the host;
# test servers bind loopback only. The build replaces OCM's sdk-go module (downloaded and checked
# against go.sum first) by a copy with that one line made 127.0.0.1, through an alternative
# go.mod; a new sdk-go whose line differs fails here rather than listening everywhere.
(cd "$ocm_dir" && go mod download open-cluster-management.io/sdk-go)
sdk_src=$(cd "$ocm_dir" && go list -m -f '{{.Dir}}' open-cluster-management.io/sdk-go)
patch_dir="$ASSETS/.ocm-patched"
sdk_patched="$patch_dir/sdk-go@$(pinned "$ocm_dir" open-cluster-management.io/sdk-go)"
listen_line='addr := ":" + b.options.ServerBindPort'
if [ ! -f "$sdk_patched/.complete" ]; then
  rm -rf "$sdk_patched" && mkdir -p "$patch_dir"
  cp -r "$sdk_src" "$sdk_patched" && chmod -R u+w "$sdk_patched"
  grpc_server_go="$sdk_patched/pkg/server/grpc/server.go"
  grep -qF "$listen_line" "$grpc_server_go" || die "$grpc_server_go no longer has the line the loopback patch replaces"
  sed -i "s|$listen_line|addr := \"127.0.0.1:\" + b.options.ServerBindPort|" "$grpc_server_go"
  touch "$sdk_patched/.complete"
fi
patched_sources() { cat "$sdk_patched/pkg/server/grpc/server.go"; }
cp "$ocm_dir/go.mod" "$patch_dir/go.mod" && cp "$ocm_dir/go.sum" "$patch_dir/go.sum"
(cd "$ocm_dir" && go mod edit -modfile="$patch_dir/go.mod" -replace="open-cluster-management.io/sdk-go=$sdk_patched")
ocm_out=$(build ocm "$ocm_dir" "" "$patch_dir/go.mod" \
  open-cluster-management.io/ocm/cmd/registration open-cluster-management.io/ocm/cmd/work \
  open-cluster-management.io/ocm/cmd/placement open-cluster-management.io/ocm/cmd/server)
# OCM's CRDs, as its cluster manager (hub) and klusterlet (spoke) install them, from the same
# module: the tests install them on their API servers and validate what spokelet writes.
if [ ! -f "$ASSETS/$ocm_out/crds/.complete" ]; then
  ocm_src=$(cd "$ocm_dir" && go mod download -json open-cluster-management.io/ocm | jq -r .Dir)
  [ -d "$ocm_src/manifests" ] || die "no manifests/ in $ocm_src"
  mkdir -p "$ASSETS/$ocm_out/crds/hub" "$ASSETS/$ocm_out/crds/spoke"
  cp "$ocm_src"/manifests/cluster-manager/hub/crds/*.crd.yaml "$ASSETS/$ocm_out/crds/hub/"
  cp "$ocm_src"/manifests/klusterlet/managed/*.crd.yaml "$ASSETS/$ocm_out/crds/spoke/"
  # The cluster manager renders two of them as templates (their conversion webhook's CA and
  # namespace, for an addon API server these tests do not run); the API module's plain
  # v1alpha1 file of the same name stands in.
  api_src=$(cd "$ocm_dir" && go mod download -json open-cluster-management.io/api | jq -r .Dir)
  for crd in $(grep -l '{{' "$ASSETS/$ocm_out/crds/hub/"*.yaml); do
    plain="$api_src/addon/v1alpha1/$(basename "$crd")"
    [ -f "$plain" ] || die "$crd is a template and the API module has no plain $plain"
    cp "$plain" "$crd"
  done
  chmod -R u+w "$ASSETS/$ocm_out/crds"
  touch "$ASSETS/$ocm_out/crds/.complete"
fi
for bin in registration work placement server; do link "ocm-$bin" "$ocm_out/$bin"; done
link ocm-crds "$ocm_out/crds"
log "OCM $(pinned "$ocm_dir" open-cluster-management.io/ocm): $ASSETS/$ocm_out"
