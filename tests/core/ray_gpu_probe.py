"""Run clip stages on an embedded Ray that declares 2 GPUs, and print what every task asked Ray for.

Run as a subprocess by test_runner.py (it needs its own Ray: the test session's has no GPUs). Ray
schedules declared GPUs like real ones and sets CUDA_VISIBLE_DEVICES for them; the models still run on
the CPU here (torch sees no CUDA), which does not change what was requested. The requests are read
back from Ray's own task table (state API), so they are what Ray saw, not what the runner meant.

    python ray_gpu_probe.py WORKDIR  ->  one JSON object on the last line of stdout
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path


def main(workdir: str) -> None:
    import ray

    from curate.runner import run_stage
    from curate.testing.tiny_models import write_tiny_clip

    root = Path(workdir)
    with socket.socket() as s:  # the state API lives on the dashboard: a port of our own
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=True, dashboard_port=port,
                    logging_level="WARNING")
    api = "http://" + info.dashboard_url
    model = str(write_tiny_clip(root / "model", seed=0))
    src = str(root / "src")
    run_stage("curate.testing.stages:Synth", str(root), src, config={"shards": 3, "rows_per_shard": 3})
    base = {"model": model, "pretrained": None, "batch_size": 4, "resources": {"num_cpus": 1}}
    runs = {
        "top_fraction_auto": {**base, "top_fraction": 0.5},
        "pool_auto": base,
        "pool_cpu": {**base, "device": "cpu"},
        "pool_auto_zero_gpus": {**base, "resources": {"num_cpus": 1, "num_gpus": 0}},
    }
    windows = {}
    for name, cfg in runs.items():
        start = time.time() * 1000
        run_stage("clip", src, str(root / name), config=cfg)
        windows[name] = (start, time.time() * 1000)
    from ray.util.state import list_tasks

    tasks: list = []
    for _ in range(30):  # task events reach the state API in batches; wait until the last run's are in
        tasks = list_tasks(address=api, detail=True, limit=10_000, raise_on_missing_output=False)
        if sum(1 for t in tasks if t.creation_time_ms and t.creation_time_ms >= windows["pool_auto_zero_gpus"][0]
               and t.name.endswith(".run")) >= 3:
            break
        time.sleep(1)
    out: dict[str, list] = {name: [] for name in runs}
    for t in tasks:
        for name, (lo, hi) in windows.items():
            if t.creation_time_ms and lo <= t.creation_time_ms <= hi:
                env = json.loads((t.runtime_env_info or {}).get("serialized_runtime_env") or "{}")
                out[name].append({"name": t.name, "type": str(t.type), "resources": t.required_resources,
                                  "env": env.get("env_vars", {})})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
