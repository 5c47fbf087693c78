"""Reject reasons are data: the same bytes give the same reason on every run, with no object reprs."""

from __future__ import annotations

import io
import re

from PIL import Image

from curate.images import ImageConfig, process_image
from curate.stages.import_ import ImportConfig, _decode, _Reject

REPR = re.compile(r"object at 0x[0-9a-f]+")


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()[:60]


def test_download_reason_of_undecodable_bytes_is_reproducible():
    for data in (b"<html>not an image</html>", _truncated_png()):
        first = process_image(data, ImageConfig())
        second = process_image(bytes(data), ImageConfig())
        assert first.status == "failed_to_decode"
        assert first.error == second.error and not REPR.search(first.error), first.error


def test_import_reason_of_undecodable_bytes_is_reproducible():
    reasons = []
    for _ in range(2):
        try:
            _decode(b"GIF89a garbage that is no image", ImportConfig(), None)
        except _Reject as e:
            reasons.append(str(e.args))
    assert len(reasons) == 2 and reasons[0] == reasons[1] and not REPR.search(reasons[0]), reasons
