#!/usr/bin/env bash
# Build the claudebox sandbox image for the boxlite runtime as a local OCI image layout.
#
#   sudo deploy/image/build.sh [OUT]
#
# OUT defaults to $CLAUDEBOX_HOME/images/claudebox-sandbox (~/.claudebox/...), where the boxlite
# runtime looks when CLAUDEBOX_BOXLITE_IMAGE is unset. No container registry is involved: the
# base comes from a Debian mirror (debootstrap), the Claude Code CLI from the npm registry.
set -euo pipefail

CLI_VERSION="${CLAUDE_CODE_VERSION:-2.1.332}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=python3,git,ca-certificates,socat,nodejs
GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-${CLAUDEBOX_HOME:-$HOME/.claudebox}/images/claudebox-sandbox}"

die() { echo "build.sh: $*" >&2; exit 1; }

# debootstrap needs root, and so do the root-owned files the layer must record as such.
[[ $EUID -eq 0 ]] || die "run as root (sudo)"
for tool in debootstrap npm python3 chroot; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install debootstrap npm python3)"
done

mkdir -p "$(dirname "$out")"
# The root filesystem is built next to OUT, so the final rename stays on one filesystem.
work="$(mktemp -d "$(dirname "$out")/.build.XXXXXX")"
cleanup() {
    mountpoint -q "$work/rootfs/proc" && umount "$work/rootfs/proc"
    rm -rf "$work"
}
trap cleanup EXIT
rootfs="$work/rootfs"

echo "==> debootstrap $SUITE ($PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"

echo "==> Claude Code CLI $CLI_VERSION into /opt/claude-code"
# Installed with the host's npm: the guest then needs neither npm nor its dependency tree. npm
# picks the CLI's native platform package for this host, which is the guest's platform too.
npm install --prefix "$rootfs/opt/claude-code" --no-audit --no-fund --omit=dev \
    "@anthropic-ai/claude-code@$CLI_VERSION"
ln -sf /opt/claude-code/node_modules/.bin/claude "$rootfs/usr/local/bin/claude"
mkdir -p "$rootfs/workspace"

echo "==> smoke test in a chroot"
mount -t proc proc "$rootfs/proc"
# The CLI refuses to run as root unless told it is in a sandbox.
chroot "$rootfs" /usr/bin/env -i PATH="$GUEST_PATH" HOME=/root IS_SANDBOX=1 \
    sh -c 'python3 --version && git --version && socat -V | head -n 2 | tail -n 1 \
        && node --version && claude --version'
umount "$rootfs/proc"

# Package indexes and caches are of no use inside a sandbox without network.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log "$rootfs"/root/.npm

echo "==> OCI image layout"
python3 "$here/oci_layout.py" "$rootfs" "$work/layout" \
    --tag "claude-code-$CLI_VERSION" --workdir /workspace \
    --env "PATH=$GUEST_PATH" --env LANG=C.UTF-8 --env IS_SANDBOX=1
rm -rf "$out.old"
if [[ -e $out ]]; then mv "$out" "$out.old"; fi
mv "$work/layout" "$out"
rm -rf "$out.old"
du -sh "$out"
echo "==> $out (set CLAUDEBOX_BOXLITE_IMAGE=$out, or leave it unset if this is the default)"
