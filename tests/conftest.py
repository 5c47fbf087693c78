"""Fixtures shared by the whole suite: one embedded Ray per test session, GPU skipping."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A local S3 server (moto) stands in for object storage. Its address must be in the environment
# before Ray starts, so that Ray's worker processes reach it too.
S3_PORT = _free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray with 2 CPUs shared by every test that runs stages through the runner."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            logging_level="WARNING",
        )
    yield ray
    # left running for the rest of the session; ray shuts down at interpreter exit


@pytest.fixture(scope="session")
def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    # The server runs in the test process: its request log (werkzeug, INFO) would land on the
    # stderr that CLI tests read line by line.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"curate-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        # The marker, not item.keywords: keywords also hold every parent folder's name, so a checkout
        # under a folder named "gpu" would skip the whole suite.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
