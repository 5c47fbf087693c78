"""``curate models``: fetch every model a pipeline names into this machine's cache, ahead of a run.

Model stages load weights through the Hugging Face hub client: open_clip's pretrained tags and
``hf-hub:`` names, and transformers models, all land in ``HF_HOME``. On a cluster that directory lies
on a volume of the node (infra/), so fetching once per node is enough; this command does it before
any actor starts, and fails with one line for a model that does not exist. A local model folder or
checkpoint file is checked, never copied. With ``HF_HUB_OFFLINE=1`` it only looks in the cache.
"""

from __future__ import annotations

import logging
import os

from curate.config import ConfigError

log = logging.getLogger(__name__)


def fetch(kind: str, model: str, extra: str | None) -> str:
    """Where ``model``'s files are on this machine, downloading them into HF_HOME when needed."""
    try:
        if kind == "open_clip":
            return _open_clip(model, extra)
        return _hub(model, extra)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds; the user needs one line
        offline = " (HF_HUB_OFFLINE is set: not in the cache)" if _offline() else ""
        raise ConfigError(f"{kind} model {model!r}{f' ({extra})' if extra else ''} cannot be fetched{offline}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _open_clip(model: str, pretrained: str | None) -> str:
    import open_clip

    from curate.models.clip import LOCAL_DIR, resolve_model

    name, pre = resolve_model(model, pretrained)
    if name.startswith(LOCAL_DIR):
        return name[len(LOCAL_DIR):]
    if name.startswith("hf-hub:"):
        return _hub(name[len("hf-hub:"):], None)
    if name not in open_clip.list_models():
        raise ConfigError(f"open_clip has no model {name!r}, and no folder of that name exists here")
    if pre is None:
        return "(random weights: no pretrained tag)"
    if os.path.isfile(pre):
        return pre
    cfg = open_clip.get_pretrained_cfg(name, pre)
    if not cfg:
        tags = ", ".join(t for m, t in open_clip.list_pretrained() if m == name)
        raise ConfigError(f"open_clip model {name} has no pretrained tag {pre!r} (it has: {tags})")
    return open_clip.download_pretrained(cfg)


def _hub(repo: str, revision: str | None) -> str:
    if os.path.isdir(repo):
        return os.path.abspath(repo)
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, revision=revision)


def pipeline_models(steps) -> list[tuple[str, str, str, str | None]]:
    """(step name, kind, model, pretrained or revision) for every model the steps load, each once."""
    import posixpath

    from curate.config import stage_and_config

    seen, out = set(), []
    for stage, _inp, step_out, config, sets in steps:
        cls, cfg = stage_and_config(stage, None, config, sets)
        for kind, model, extra in cls(cfg).models():
            if (kind, model, extra) not in seen:
                seen.add((kind, model, extra))
                out.append((posixpath.basename(step_out), kind, model, extra))
    return out
