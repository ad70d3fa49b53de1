#!/bin/sh
# MPICH hydra "rsh" launcher for hosts simulated by network namespaces.
# NESA_NETNS_MAP="10.77.0.1=ns1,10.77.0.2=ns2" maps each host address to its namespace.
host=$1
shift
for pair in $(echo "$NESA_NETNS_MAP" | tr ',' ' '); do
    if [ "${pair%%=*}" = "$host" ]; then
        exec ip netns exec "${pair#*=}" sh -c "$*"
    fi
done
echo "netns_rsh.sh: unknown host $host" >&2
exit 1
