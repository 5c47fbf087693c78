"""A real local Ray cluster (head + 1 worker on 127.0.0.1) started by infra/local-cluster.sh.

Every client call to it (``curate run --address``, the job API) runs in a subprocess with the
cluster's environment, so this test process's embedded Ray (``ray_session``) and its auth settings
are never touched by the cluster's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "local-cluster.sh"


class Cluster:
    def __init__(self, env: dict[str, str]):
        self.env = env  # the cluster's own variables (RAY_ADDRESS=http://..., token, ports)
        self.address = env["RAY_ADDRESS"]
        self.metrics_ports = [int(p) for p in env["METRICS_PORTS"].split(",")]

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}

    def curate(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """``curate ARGS`` as a separate client process talking to the cluster."""
        return subprocess.run([sys.executable, "-m", "curate.cli", *args], env=self.client_env(),
                              capture_output=True, text=True, timeout=timeout)

    def popen_curate(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "curate.cli", *args], env=self.client_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def jobs_api(self, code: str) -> object:
        """Run ``code`` with ``client`` (a JobSubmissionClient) bound; it assigns ``result``."""
        script = "import json\nfrom ray.job_submission import JobSubmissionClient\n" \
                 f"client = JobSubmissionClient({self.address!r})\n" + textwrap.dedent(code) + \
                 "\nprint('RESULT=' + json.dumps(result, default=str))\n"
        proc = subprocess.run([sys.executable, "-c", script], env=self.client_env(), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")][-1]
        return json.loads(line[len("RESULT="):])

    def jobs(self) -> list[dict]:
        """Submitted jobs (driver-only entries left out): id, status, entrypoint, metadata."""
        return self.jobs_api("""
            result = [dict(id=j.submission_id, status=str(j.status), entrypoint=j.entrypoint,
                           metadata=j.metadata or {}, message=j.message)
                      for j in client.list_jobs() if j.submission_id]
        """)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "CURATE_CLUSTER_DIR": str(state), "PYTHON": sys.executable,
           "HEAD_CPUS": "1", "WORKER_CPUS": "1", "OBJECT_STORE_MB": "200"}
    # The cluster must not inherit an address meant for some other Ray.
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "start", "1"], env=env, capture_output=True, text=True,
                          timeout=240)
    try:
        assert proc.returncode == 0, f"cluster did not start:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        values = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
        yield Cluster(values)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
