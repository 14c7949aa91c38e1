#!/usr/bin/env bash
# Installs everything the spokelet test suite needs on a Debian 12 machine and builds
# kube-apiserver + kube-controller-manager from Debian's kubernetes source package
# (v1.20.2; no binary download reaches CI machines, Debian's archive does).
#
# Idempotent and cached: the built binaries land in $SPOKELET_TEST_ASSETS (default
# ~/.cache/spokelet/test-assets) and a second run takes seconds.
#
# Honours the envtest conventions, in the order the test harness uses them:
# TEST_ASSET_KUBE_APISERVER / TEST_ASSET_KUBE_CONTROLLER_MANAGER / TEST_ASSET_ETCD, then
# $KUBEBUILDER_ASSETS/<name>. When both Kubernetes binaries are found that way, nothing is
# built.
#
# Environment:
#   SPOKELET_TEST_ASSETS  where built binaries go (default ~/.cache/spokelet/test-assets)
#   SPOKELET_K8S_SRC      where the source is unpacked and built (default ~/.cache/spokelet/kubernetes-src)
set -euo pipefail

ASSETS="${SPOKELET_TEST_ASSETS:-$HOME/.cache/spokelet/test-assets}"
SRC_ROOT="${SPOKELET_K8S_SRC:-$HOME/.cache/spokelet/kubernetes-src}"
# Identifies how the cached binaries were made; a cache from another recipe is rebuilt.
# Bump it whenever the build below changes what comes out.
RECIPE="kubernetes v1.20.2 (Debian source) + reflect2 v1.0.2 (Debian) + kube-openapi null check, CGO_ENABLED=0"
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
# Debian's package version of the source; the tarball inside is upstream v1.20.2.
K8S_SOURCE_PACKAGE=kubernetes

log() { printf '[install] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and no sudo: run as root or install sudo"
  SUDO=(sudo)
fi

# --- Debian packages -------------------------------------------------------------------
# golang-go, make, gcc, rsync: the Kubernetes build. dpkg-dev, xz-utils: `apt-get source`.
# etcd-server: etcd. docker-registry: an OCI registry. skopeo: an independent OCI client.
# jq: scripts. lshw: hardware inventory tests. procps: kill(1) for stale-run cleanup, pgrep.
# golang-github-modern-go-reflect2-dev: a Go-1.18-safe reflect2 for the build (see below).
# systemd: `systemd-analyze security|verify` for the node service's unit (tests/tests/systemd_unit.rs);
# installing the package does not make it the init system of a container.
packages=(golang-go make gcc rsync dpkg-dev xz-utils etcd-server docker-registry skopeo jq lshw procps
          golang-github-modern-go-reflect2-dev systemd)
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

# --- kubectl ------------------------------------------------------------------------------
# The deploy tests render deploy/kubernetes with `kubectl kustomize` (kustomize v5: Components,
# `labels`) and dry-run it against the test API server. Debian 12's kubernetes-client is 1.20,
# whose kustomize is too old, so a kubectl of 1.27 or later must already be on PATH.
if ! kubectl kustomize --help >/dev/null 2>&1; then
  die "kubectl (1.27 or later, with kustomize) is not on PATH; install it from https://kubernetes.io/docs/tasks/tools/ and run this again"
fi
log "kubectl present: $(kubectl version --client 2>/dev/null | head -n 1)"

# --- Kubernetes binaries ------------------------------------------------------------------
# Same lookup as the harness (tests/src/assets.rs), minus PATH: a kube-apiserver on PATH
# is not assumed to be one the suite was written against.
resolve() { # resolve NAME ENV_VAR -> prints the path, or nothing
  local name=$1 var=$2
  if [ -n "${!var:-}" ]; then
    [ -x "${!var}" ] || die "$var=${!var} is not an executable file"
    printf '%s\n' "${!var}"; return
  fi
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$name" ]; then
    printf '%s\n' "$KUBEBUILDER_ASSETS/$name"; return
  fi
}

works() { "$1" --version >/dev/null 2>&1; }

apiserver=$(resolve kube-apiserver TEST_ASSET_KUBE_APISERVER)
kcm=$(resolve kube-controller-manager TEST_ASSET_KUBE_CONTROLLER_MANAGER)
if [ -n "$apiserver" ] && [ -n "$kcm" ]; then
  log "using $apiserver and $kcm (TEST_ASSET_* / KUBEBUILDER_ASSETS); nothing to build"
  exit 0
fi
if [ -x "$ASSETS/kube-apiserver" ] && [ -x "$ASSETS/kube-controller-manager" ] \
   && [ "$(cat "$ASSETS/RECIPE" 2>/dev/null)" = "$RECIPE" ] \
   && works "$ASSETS/kube-apiserver" && works "$ASSETS/kube-controller-manager"; then
  log "cached: $("$ASSETS/kube-apiserver" --version) in $ASSETS"
  exit 0
fi
if [ -x "$ASSETS/kube-apiserver" ]; then
  log "cached binaries in $ASSETS are from another recipe (RECIPE file); rebuilding"
fi

# --- Source package -------------------------------------------------------------------
# `apt-get source` needs a deb-src entry; add one mirroring the existing binary entries.
enable_deb_src() {
  if grep -rqsE --include='*.sources' --include='*.list' '^(Types:.*deb-src|deb-src[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 1 # already there
  fi
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    # deb822 (Debian 12 default): copy the stanzas with `Types: deb-src`.
    sed -E 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      | "${SUDO[@]}" tee /etc/apt/sources.list.d/spokelet-deb-src.sources >/dev/null
  elif grep -qsE '^deb[[:space:]]' /etc/apt/sources.list; then
    # One-line format (older installs).
    sed -nE 's/^deb([[:space:]])/deb-src\1/p' /etc/apt/sources.list \
      | "${SUDO[@]}" tee /etc/apt/sources.list.d/spokelet-deb-src.list >/dev/null
  else
    die "no Debian apt source found to derive a deb-src entry from"
  fi
}

mkdir -p "$ASSETS" "$SRC_ROOT"
srcdir=$(find "$SRC_ROOT" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
if [ -z "$srcdir" ]; then
  if enable_deb_src; then log "enabled deb-src entries"; fi
  log "fetching the $K8S_SOURCE_PACKAGE source package"
  "${SUDO[@]}" apt-get update -qq
  # Unpack into a scratch directory and move into place, so an interrupted download never
  # leaves a half-unpacked tree that a later run would mistake for a complete one.
  tmp=$(mktemp -d "$SRC_ROOT/.fetch.XXXXXX")
  (cd "$tmp" && apt-get source -qq "$K8S_SOURCE_PACKAGE" >/dev/null 2>"$tmp/apt-source.log") \
    || { cat "$tmp/apt-source.log" >&2; rm -rf "$tmp"; die "apt-get source $K8S_SOURCE_PACKAGE failed"; }
  unpacked=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  [ -n "$unpacked" ] || { rm -rf "$tmp"; die "apt-get source produced no kubernetes-* directory"; }
  mv "$unpacked" "$SRC_ROOT/"
  rm -rf "$tmp"
  srcdir="$SRC_ROOT/$(basename "$unpacked")"
fi

# --- Patch -----------------------------------------------------------------------------
# Kubernetes 1.20 vendors github.com/modern-go/reflect2 v1.0.1, whose map iterator assumes
# the pre-Go-1.18 runtime layout. Built with Debian 12's Go 1.19 the API server then dies
# with SIGSEGV (mapiternext, via json-iterator) on the first custom resource it stores.
# v1.0.2 fixes exactly that and has the same API; Debian packages it, so swap it in.
[ -f "$REFLECT2_SRC/go_above_118.go" ] || die "$REFLECT2_SRC lacks the Go 1.18 fix (package golang-github-modern-go-reflect2-dev >= 1.0.2)"
vendored="$srcdir/vendor/github.com/modern-go/reflect2"
[ -d "$vendored" ] || die "unexpected source layout: no $vendored"
find "$vendored" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
find "$REFLECT2_SRC" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
  -exec cp {} "$vendored/" \;

# The vendored kube-openapi validator treats a value equal to its type's zero value as null:
# `reflect.DeepEqual(reflect.Zero(T), reflect.ValueOf(data))` compared two reflect.Value
# headers, which never matched under the Go it was written for but does under Go 1.19, so
# every empty string in a custom resource ("", e.g. a core kind's `group`) is refused with
# "must be of type string". Reduce the check to what it meant: a real null.
typego="$srcdir/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go"
sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' "$typego"
grep -q 'reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data))' "$typego" \
  && die "could not patch the null check in $typego"

# --- Build ----------------------------------------------------------------------------
# As Debian's debian/rules does: a GOPATH inside the tree with k8s.io/kubernetes linking
# back to it. A plain `go build` does not work: `make` first generates the OpenAPI code.
log "building kube-apiserver and kube-controller-manager in $srcdir (several minutes; log: $SRC_ROOT/build.log)"
export GOPATH="$srcdir/.go"
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$srcdir" "$GOPATH/src/k8s.io/kubernetes"
export CGO_ENABLED=0 PATH="/usr/lib/go/bin:$PATH"
started=$SECONDS
(cd "$GOPATH/src/k8s.io/kubernetes" && make WHAT="cmd/kube-apiserver cmd/kube-controller-manager") \
  >"$SRC_ROOT/build.log" 2>&1 || { tail -n 40 "$SRC_ROOT/build.log" >&2; die "build failed (full log: $SRC_ROOT/build.log)"; }
# Install through a temporary name so a concurrent test run never sees a partial binary.
rm -f "$ASSETS/RECIPE"
for bin in kube-apiserver kube-controller-manager; do
  install -m 0755 "$srcdir/_output/bin/$bin" "$ASSETS/.$bin.tmp"
  mv -f "$ASSETS/.$bin.tmp" "$ASSETS/$bin"
done
printf '%s\n' "$RECIPE" >"$ASSETS/RECIPE"
log "built $("$ASSETS/kube-apiserver" --version) in $((SECONDS - started))s into $ASSETS"
