#!/bin/bash
# What a veth's link up costs against the size of the namespace's routing
# tables: in a scratch network namespace, ROUTES /128 (family 6), /32
# (family 4) or both (46) routes, then 200 veth pairs brought up (both
# ends), given an IPv4 /32 host route each, and deleted, each step timed
# over one `ip -batch`. With UPLINK `uplink`, a link holding an IPv4
# address is created first, as a node's own uplink is: without one, the
# kernel looks for each new route's source address on every link of the
# namespace (inet_select_addr), and the route's cost grows with the
# links. Needs root; touches nothing outside the namespace it creates
# and deletes.
#
#   scripts/link-up-probe.sh ROUTES [4|6|46] [uplink|none]
set -euo pipefail
routes=${1:?usage: $0 ROUTES [4|6|46] [uplink|none]}
family=${2:-46}
uplink=${3:-none}
ns=linkprobe$$
work=$(mktemp -d)
ip netns add "$ns"
trap 'ip netns del "$ns"; rm -rf "$work"' EXIT
if [[ $uplink == uplink ]]; then
    ip -n "$ns" link add up0 type veth peer name up1
    ip -n "$ns" addr add 192.0.2.1/24 dev up0
    ip -n "$ns" link set up0 up
fi
ip -n "$ns" link add d0 type veth peer name d1
ip -n "$ns" link set d0 up
ip -n "$ns" link set d1 up
for ((i = 0; i < routes; i++)); do
    [[ $family == *6* ]] && printf 'route add 2001:db8:1::%x/128 dev d0\n' "$i"
    [[ $family == *4* ]] && printf 'route add 10.%d.%d.1/32 dev d0\n' $((i >> 8)) $((i & 255))
done > "$work/routes"
ip -n "$ns" -batch "$work/routes"
for i in $(seq 0 199); do echo "link add va$i type veth peer name vb$i"; done > "$work/add"
for i in $(seq 0 199); do echo "link set va$i addrgenmode none"; echo "link set vb$i addrgenmode none"; done >> "$work/add"
ip -n "$ns" -batch "$work/add"
for i in $(seq 0 199); do echo "link set va$i up"; echo "link set vb$i up"; done > "$work/up"
for i in $(seq 0 199); do echo "route add 198.18.$((i >> 8)).$((i & 255))/32 dev va$i"; done > "$work/host"
for i in $(seq 0 199); do echo "link del va$i"; done > "$work/del"
started=$(date +%s%N); ip -n "$ns" -batch "$work/up"; ended=$(date +%s%N)
echo "routes=$routes family=$family: $(((ended - started) / 400000)) µs per link up"
started=$(date +%s%N); ip -n "$ns" -batch "$work/host"; ended=$(date +%s%N)
echo "routes=$routes family=$family uplink=$uplink: $(((ended - started) / 200000)) µs per IPv4 host route"
started=$(date +%s%N); ip -n "$ns" -batch "$work/del"; ended=$(date +%s%N)
echo "routes=$routes family=$family: $(((ended - started) / 200000)) µs per veth deletion"
