"""A run on a real multi-node Ray (Ray's own cluster utilities, all on this machine), with a
worker node killed mid-run. Run by tests/test_cluster.py in its own process, because a
process holds one Ray connection; prints the run's summary as JSON on its last line.

    python tests/multinode_run.py PIPELINE_FILE --set key=value ...
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request

import ray
from ray.cluster_utils import Cluster

from recaption.config import load_config
from recaption.pipeline import run


def main() -> None:
    pipeline, overrides = sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]
    # head: 1 CPU for one worker (the limiter needs none); node 2: room for the other.
    # The driver connects first, so it is attached to the head's raylet, not node 2's.
    # The GCS declares a node dead after failed health checks: 5 of them 3 s apart by default,
    # 15 s of the test spent waiting; a check a second finds it in ~5 s (checks 0.5 s apart, 3
    # failures, declared a busy CI machine's head node dead: its raylet ended, the run hung)
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": 1, "_system_config": health},
    )
    doomed = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    cfg = load_config(pipeline, [*overrides, f"ray.address={cluster.address}"])
    stats_url = cfg.captioner.base_url.removesuffix("/v1") + "/_stats"
    outcome: dict = {}

    def work() -> None:  # the run in a thread: adding Ray nodes needs the main thread
        try:
            outcome["summary"] = run(cfg, show_progress=False)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        with urllib.request.urlopen(stats_url) as resp:
            if len(json.load(resp)["events"]) >= 25:
                break
        time.sleep(0.1)
    cluster.remove_node(doomed, allow_graceful=False)  # a machine dies mid-run
    cluster.add_node(num_cpus=2)  # and the autoscaler brings another
    worker.join()
    ray.shutdown()  # disconnect the driver before the cluster goes
    cluster.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    print(
        json.dumps(
            {
                "finished": [r.model_dump(mode="json") for r in summary.finished],
                "failed": summary.failed,
                "node_killed": True,
            }
        )
    )


if __name__ == "__main__":
    main()
