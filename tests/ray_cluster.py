"""A multi-node Ray cluster on this one host, for the cluster tests — run as a subprocess.

``ray.cluster_utils.Cluster`` starts a real head (GCS) and real raylets, one per node, each
with its own declared resources (logical GPUs included), and can kill a node's processes
the way a lost machine would. Running it in its own process keeps it apart from the test
session's local Ray. Protocol: the first stdout line is ``{"address": ..., "nodes": [...]}``;
then one JSON command per stdin line, one JSON reply per stdout line:

    {"cmd": "add", "num_cpus": 2, "num_gpus": 1}   -> {"node_id": "...", "index": 1}
    {"cmd": "remove", "index": 1}                  -> {"removed": "..."}
    {"cmd": "quit"}                                -> (shuts the cluster down, exits)
"""

from __future__ import annotations

import json
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from ray.cluster_utils import Cluster

    head_cpus = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    cluster = Cluster(initialize_head=True, head_node_args={
        "gcs_server_port": free_port(), "num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False})
    nodes = [cluster.head_node]

    def say(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"address": cluster.address, "nodes": [cluster.head_node.node_id]})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "add":
                node = cluster.add_node(num_cpus=cmd.get("num_cpus", 1),
                                        num_gpus=cmd.get("num_gpus", 0))
                cluster.wait_for_nodes()
                nodes.append(node)
                say({"node_id": node.node_id, "index": len(nodes) - 1})
            elif cmd["cmd"] == "remove":
                node = nodes[cmd["index"]]
                cluster.remove_node(node, allow_graceful=False)
                say({"removed": node.node_id})
            elif cmd["cmd"] == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
