#!/bin/bash
# build-image.sh - builds the drainer's container image (deploy/Containerfile)
# without a container daemon and writes it as an OCI archive:
#
#     target/image/nova-kubernetes-drain.oci.tar
#
# It builds the static binary (the gnu target with +crt-static), stages the
# image's files in target/image/context and runs `buildah bud` in a private
# vfs store under target/image (removed again), so the machine's container
# storage is left alone. Needs cargo, git and buildah (Debian: apt-get install
# buildah); BUILDER=docker builds the same Containerfile into Docker instead.
#
# Reproducible: the same commit, toolchain and CA bundle give the same image
# digest (printed last); every timestamp is the commit's time.
#
# env: IMAGE     the image's name in the archive (nova-kubernetes-drain:<version>)
#      BUILDER   buildah (default) or docker
#      CA_BUNDLE the CA bundle the image trusts (/etc/ssl/certs/ca-certificates.crt)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
IMAGE=${IMAGE:-nova-kubernetes-drain:$VERSION}
BUILDER=${BUILDER:-buildah}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
OUT=$ROOT/target/image
ARCHIVE=$OUT/nova-kubernetes-drain.oci.tar

die() { echo "build-image.sh: $*" >&2; exit 2; }
command -v "$BUILDER" >/dev/null || die "$BUILDER not found (Debian: apt-get install buildah; or BUILDER=docker)"
[ -s "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE (Debian: apt-get install ca-certificates; or set CA_BUNDLE)"

# The revision and time of the commit: labels and every timestamp in the image.
if REVISION=$(git rev-parse HEAD 2>/dev/null); then
    [ -z "$(git status --porcelain --untracked-files=no)" ] || REVISION="$REVISION-dirty"
    EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
else
    [ -n "${SOURCE_DATE_EPOCH:-}" ] || die "not a git checkout: set SOURCE_DATE_EPOCH (and REVISION)"
    REVISION=${REVISION:-unknown}
    EPOCH=$SOURCE_DATE_EPOCH
fi
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)

# The static binary. --remap-path-prefix keeps the checkout's and cargo's
# paths out of it, so two clones of one commit build the same bytes.
TARGET=$(uname -m)-unknown-linux-gnu
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
echo "== cargo build --release --target $TARGET (static)"
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$ROOT=/src --remap-path-prefix=$CARGO_HOME=/cargo" \
    cargo build --release --locked --quiet --target "$TARGET" --bin drainer
BINARY=$ROOT/target/$TARGET/release/drainer
"$BINARY" --version >/dev/null || die "the static binary does not run"

# The image's files, with fixed modes (the umask must not leak into the image).
CONTEXT=$OUT/context
rm -rf "$CONTEXT"
install -d -m 0755 "$CONTEXT/rootfs/etc/ssl/certs"
install -m 0755 "$BINARY" "$CONTEXT/rootfs/drainer"
install -m 0644 "$CA_BUNDLE" "$CONTEXT/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' \
    > "$CONTEXT/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$CONTEXT/rootfs/etc/group"
chmod 0644 "$CONTEXT/rootfs/etc/passwd" "$CONTEXT/rootfs/etc/group"
install -d -m 1777 "$CONTEXT/rootfs/tmp"
find "$CONTEXT" -exec touch -h -d "@$EPOCH" {} +

ARGS=(--build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED"
      -f "$ROOT/deploy/Containerfile" -t "$IMAGE")
echo "== $BUILDER: $IMAGE ($VERSION, $REVISION, $CREATED)"
if [ "$BUILDER" = docker ]; then
    SOURCE_DATE_EPOCH=$EPOCH docker build "${ARGS[@]}" "$CONTEXT"
    exit 0
fi
STORE=$(mktemp -d "$OUT/store.XXXXXX")
trap 'rm -rf "$STORE"' EXIT
B=(buildah --root "$STORE/root" --runroot "$STORE/run" --storage-driver vfs)
"${B[@]}" bud --quiet --isolation chroot --timestamp "$EPOCH" "${ARGS[@]}" "$CONTEXT" >/dev/null
rm -f "$ARCHIVE"
"${B[@]}" push --quiet "$IMAGE" "oci-archive:$ARCHIVE:$IMAGE"
echo "== $ARCHIVE"
if command -v skopeo >/dev/null; then
    echo "digest: $(skopeo inspect --format '{{.Digest}}' "oci-archive:$ARCHIVE")"
fi
