#!/usr/bin/env bash
# Runs examples/uring_modes.rs across a veth pair between two network
# namespaces (the receiver in one, the sender in the other), so SEND_ZC and
# the receive modes are measured on a path that is not loopback.
# Usage (root): scripts/uring-veth.sh SEND_MODE RECV_MODE [RUNS] [GIB]
#   e.g. scripts/uring-veth.sh zcfixed:1 multi:16:256 5 2
set -euo pipefail
cd "$(dirname "$0")/.."
send=${1:?send mode}; recv=${2:?receive mode}; runs=${3:-5}; gib=${4:-2}
cargo build --release --quiet --example uring_modes
bin=target/release/examples/uring_modes
a=ferry-um-a-$$; b=ferry-um-b-$$
cleanup() { ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$a"; ip netns add "$b"
ip link add umva$$ type veth peer name umvb$$
ip link set umva$$ netns "$a"; ip link set umvb$$ netns "$b"
ip -n "$a" addr add 10.77.0.1/24 dev umva$$; ip -n "$b" addr add 10.77.0.2/24 dev umvb$$
for n in "$a" "$b"; do ip -n "$n" link set lo up; done
ip -n "$a" link set umva$$ up; ip -n "$b" link set umvb$$ up
ip netns exec "$b" "$bin" --recv "$recv" --runs "$runs" --gib "$gib" --listen 10.77.0.2:7000 &
rx=$!
ip netns exec "$a" "$bin" --send "$send" --runs "$runs" --gib "$gib" --connect 10.77.0.2:7000
wait "$rx"
