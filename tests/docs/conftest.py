"""What the docs tests share: a folder laid out like a user's checkout after `make demo`'s setup (the
tiny demo models, safety heads, reference set and blocklist under ``demo-output/``), the demo corpus
served on 127.0.0.1 for the whole session, and its URL list."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest


class DocsEnv:
    def __init__(self, root: Path, base_url: str):
        self.root = root  # run documented commands from here: their relative paths resolve against it
        self.base_url = base_url
        self.out = root / "demo-output"

    @contextmanager
    def cwd(self):
        before = os.getcwd()
        os.chdir(self.root)
        try:
            yield self.root
        finally:
            os.chdir(before)


@pytest.fixture(scope="session")
def docs_env(tmp_path_factory):
    from curate.demo import CORPUS, DemoServer, ensure_models, ensure_safety_inputs, write_url_list

    root = tmp_path_factory.mktemp("docs")
    out = root / "demo-output"
    before = os.getcwd()
    os.chdir(root)  # the heads record the clip model by its relative name, demo-output/models/clip
    try:
        ensure_models(out / "models")
        ensure_safety_inputs(out / "reference" / "demo_eval", out / "blocklists")
    finally:
        os.chdir(before)
    with DemoServer(str(CORPUS), "127.0.0.1", 0) as srv:
        write_url_list(out / "urls.parquet", srv.base_url, 1, str(CORPUS))
        yield DocsEnv(root, srv.base_url)
