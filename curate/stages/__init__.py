"""Stage registry. Modules are imported only when their stage is used, so `curate --help` stays fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from curate.stage import Stage

# stage name -> "module:Class"
REGISTRY: dict[str, str] = {
    "import": "curate.stages.import_:ImportStage",
    "download": "curate.stages.download:DownloadStage",
    "filter": "curate.stages.filter:FilterStage",
    "dedup": "curate.stages.dedup:DedupStage",
    "clip": "curate.stages.clip:ClipStage",
    "semdedup": "curate.stages.semdedup:SemDedupStage",
    "recaption": "curate.stages.recaption:RecaptionStage",
    "export": "curate.stages.export:ExportStage",
    "safety": "curate.stages.safety:SafetyStage",
    "decontaminate": "curate.stages.decontaminate:DecontaminateStage",
}


class UnknownStage(ValueError):
    pass


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> type[Stage]:
    """The stage class for a registered name, or for ``package.module:Class`` (a user's own stage)."""
    target = REGISTRY.get(name) or (name if ":" in name else None)
    if target is None:
        raise UnknownStage(f"unknown stage {name!r}; known stages: {', '.join(REGISTRY)}")
    module, cls = target.split(":", 1)
    try:
        found = getattr(importlib.import_module(module), cls)
    except AttributeError:
        raise UnknownStage(f"unknown stage {name!r}: {module} has no {cls}") from None
    from curate.stage import Stage

    if not (isinstance(found, type) and issubclass(found, Stage)):
        raise UnknownStage(f"{name!r} is not a curate Stage")
    return found
