#!/usr/bin/env bash
# Builds ferry's Debian package into target/debian/: the release binary, its
# man pages and shell completions, the daemons' systemd units (checked with
# systemd-analyze where it exists) and the example configs. Installs
# cargo-deb from crates.io if it is missing. Prints the package's contents.
#
#   scripts/package-deb.sh && sudo apt install ./target/debian/ferry_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release

assets=target/package-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
target/release/ferry man --out "$assets/man"
gzip -9n "$assets"/man/*.1
target/release/ferry completions bash > "$assets/completions/ferry"
target/release/ferry completions zsh > "$assets/completions/_ferry"
target/release/ferry completions fish > "$assets/completions/ferry.fish"

if command -v systemd-analyze >/dev/null; then
  # Verified as installed, with the binary where the units expect it.
  check=$(mktemp -d)
  trap 'rm -rf "$check"' EXIT
  for unit in packaging/systemd/*.service; do
    sed "s|/usr/bin/ferry|$PWD/target/release/ferry|" "$unit" > "$check/$(basename "$unit")"
  done
  # Their Documentation= man pages, as the package installs them.
  mkdir -p "$check/man/man1"
  cp "$assets"/man/*.1.gz "$check/man/man1/"
  MANPATH="$check/man" systemd-analyze verify "$check"/*.service
  echo "systemd units verified"
fi

cargo deb --no-build --strip
deb=$(ls -t target/debian/ferry_*.deb | head -1)
dpkg-deb --info "$deb" | sed -n '1,/Description/p'
dpkg-deb --contents "$deb"
echo "built $deb"
