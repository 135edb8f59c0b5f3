"""Self-test of tests/cluster.py: a head and two worker nodes on this host; a SIGKILLed node is reported dead."""

import os
import time

from tests.cluster import FAST_HEALTH_CHECKS, ray_cluster, session_pids


def test_cluster_starts_three_nodes_and_reports_a_killed_one_dead(tmp_path):
    start = time.time()
    with ray_cluster(tmp_path, dict(os.environ), nodes=[1, 1], head_env=FAST_HEALTH_CHECKS) as cluster:
        alive = [info for info in cluster.list_nodes() if info["state"] == "ALIVE"]
        assert len(alive) == 3
        assert {node.name for node in cluster.nodes} == {"head", "w1", "w2"}
        assert len({node.node_id for node in cluster.nodes}) == 3
        by_id = {info["node_id"]: info for info in alive}
        for node in cluster.nodes:  # each node carries its own resource and label, for pinning work to it
            assert by_id[node.node_id]["resources_total"][node.name] == 1
            assert by_id[node.node_id]["labels"]["cluster-node"] == node.name
        assert len({node.pgid for node in cluster.nodes}) == 3
        started = time.time() - start

        victim = cluster.workers[0]
        cluster.kill(victim)
        seconds = cluster.wait_dead(victim, timeout=30)
        assert cluster.states() == {"head": "ALIVE", "w1": "DEAD", "w2": "ALIVE"}
        assert session_pids(victim.pgid) == []  # nothing of the node survives
    assert not any(session_pids(node.pgid) for node in cluster.nodes)
    print(f"cluster up in {started:.1f} s, killed node dead after {seconds:.1f} s")
    assert seconds < 10  # FAST_HEALTH_CHECKS: ~1-3 s; Ray's defaults: ~15 s
