"""Fixtures for the recaption tests: tiny real VLMs saved to disk once per session.

``tiny_vlms``: a BLIP and a LLaVA model built by ``curate.testing.tiny_vlms`` and loaded by every test
through the same from_pretrained path as a hub model.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory) -> dict[str, str]:
    from curate.testing.tiny_vlms import ARCHES, build

    root = tmp_path_factory.mktemp("tiny-vlms")
    return {arch: str(build(arch, root / arch)) for arch in ARCHES}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models are all per-op overhead: with the machine shared, OpenMP's spinning threads make a
    two-thread matmul of a 32-wide layer hundreds of times slower than one thread. Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
