#!/usr/bin/env bash
# scripts/two_hosts.sh 'NODE 0 COMMAND' 'NODE 1 COMMAND': run two commands as two network hosts on this
# machine (needs root and `ip`), the way a two-node cluster job runs one launcher per node.
#
# Two network namespaces joined by a veth pair: node 0 is 10.231.<k>.1, node 1 is 10.231.<k>.2 (a private
# subnet; traffic never leaves this machine). Each command runs in its node's namespace with
#   NODE_RANK, NODE_ADDR, MASTER_ADDR (node 0's address), GLOO_SOCKET_IFNAME (the node's interface: without
#   it gloo advertises 127.0.0.1 and the other host cannot connect), and HOSTFILE (a deepspeed hostfile of
#   both nodes, one slot each)
# exported, and the exit status is the first failing command's (0 when both succeed). Whatever happens
# (success, failure, Ctrl-C, a killed node), every process of both namespaces is killed and the namespaces and
# the veth pair are deleted on exit.
#
# Faults, for the tests:
#   TWO_HOSTS_KILL_NODE=N TWO_HOSTS_KILL_AFTER=GLOB   kill every process of node N (SIGKILL) as soon as a file
#                                                     matching GLOB exists: a node dying mid-run
#   TWO_HOSTS_PRIVATE_DIR=DIR                         node 1 sees its own empty DIR (a private mount over it):
#                                                     storage the nodes do not share
# Example (the README's two-node commands, as tested):
#   scripts/two_hosts.sh 'deepspeed --no_ssh --hostfile $HOSTFILE --node_rank $NODE_RANK --master_addr $MASTER_ADDR \
#       --master_port 29600 --module dpo_ds.train ...' '<the same>'
set -uo pipefail
if [ "$#" -ne 2 ]; then sed -n '2,3p' "$0" >&2; exit 2; fi
if [ "$(id -u)" != 0 ] || ! command -v ip > /dev/null; then echo "two_hosts.sh needs root and ip" >&2; exit 3; fi

k=$(( ($$ % 200) + 20 ))                       # one subnet and name per harness run: runs may overlap
NS=(dpo2h-$$-0 dpo2h-$$-1)
IF=(dpo2h$$a dpo2h$$b)
ADDR=(10.231.$k.1 10.231.$k.2)
TMP=$(mktemp -d)
PIDS=()

cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2> /dev/null; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do  # until no process is left in either namespace (one may fork meanwhile)
    left=$(for ns in "${NS[@]}"; do ip netns pids "$ns" 2> /dev/null; done)
    [ -z "$left" ] && break
    echo "$left" | xargs -r kill -9 2> /dev/null
    sleep 0.2
  done
  for ns in "${NS[@]}"; do ip netns del "$ns" 2> /dev/null; done  # the veth pair goes with its namespaces
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "${NS[0]}" && ip netns add "${NS[1]}" && ip link add "${IF[0]}" type veth peer name "${IF[1]}" || exit 4
for n in 0 1; do
  ip link set "${IF[$n]}" netns "${NS[$n]}"
  ip -n "${NS[$n]}" addr add "${ADDR[$n]}/24" dev "${IF[$n]}"
  ip -n "${NS[$n]}" link set "${IF[$n]}" up
  ip -n "${NS[$n]}" link set lo up
done
printf '%s slots=1\n%s slots=1\n' "${ADDR[0]}" "${ADDR[1]}" > "$TMP/hostfile"

for n in 0 1; do
  cmd="$([ "$n" = 0 ] && echo "$1" || echo "$2")"
  wrap=(bash -c "$cmd")
  if [ "$n" = 1 ] && [ -n "${TWO_HOSTS_PRIVATE_DIR:-}" ]; then  # a mount namespace of its own, DIR replaced
    mkdir -p "$TMP/private" "$TWO_HOSTS_PRIVATE_DIR"
    wrap=(unshare --mount --propagation private bash -c "mount --bind '$TMP/private' '$TWO_HOSTS_PRIVATE_DIR' && $cmd")
  fi
  NODE_RANK=$n NODE_ADDR=${ADDR[$n]} MASTER_ADDR=${ADDR[0]} GLOO_SOCKET_IFNAME=${IF[$n]} HOSTFILE=$TMP/hostfile \
    ip netns exec "${NS[$n]}" "${wrap[@]}" > >(sed -u "s/^/[node $n] /") 2>&1 &
  PIDS+=($!)
done

if [ -n "${TWO_HOSTS_KILL_NODE:-}" ]; then
  (
    until compgen -G "$TWO_HOSTS_KILL_AFTER" > /dev/null; do sleep 0.05; done
    ip netns pids "${NS[$TWO_HOSTS_KILL_NODE]}" | xargs -r kill -9
    echo "[two_hosts] killed every process of node $TWO_HOSTS_KILL_NODE at $(date +%s.%N)"
  ) &
  PIDS+=($!)
fi

# wait for both nodes; once one has failed, the other gets TWO_HOSTS_GRACE seconds (default 60) to stop on its
# own (as a cluster node would, at its next collective or its timeout), then its processes are killed
rc=0; running=(0 1); deadline=""
while [ "${#running[@]}" -gt 0 ]; do
  still=()
  for n in "${running[@]}"; do
    if kill -0 "${PIDS[$n]}" 2> /dev/null; then still+=("$n"); continue; fi
    wait "${PIDS[$n]}"; r=$?
    echo "[two_hosts] node $n exited with $r at $(date +%s.%N)"
    if [ "$r" != 0 ] && [ "$rc" = 0 ]; then rc=$r; deadline=$(( SECONDS + ${TWO_HOSTS_GRACE:-60} )); fi
  done
  running=("${still[@]}")
  if [ -n "$deadline" ] && [ "$SECONDS" -ge "$deadline" ]; then
    for n in "${running[@]}"; do
      echo "[two_hosts] node $n still running ${TWO_HOSTS_GRACE:-60} s after the other failed: killed"
      ip netns pids "${NS[$n]}" | xargs -r kill -9
    done
    deadline=""
  fi
  sleep 0.1
done
exit "$rc"
