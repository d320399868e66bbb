"""What a user can pick as the reference, and whether it can run here (offline machines included).

* :data:`REFERENCE_KINDS` — the kinds of reference, each with a label and a one-line description;
* :func:`clip_models` / :func:`clip_tags` — open_clip's model names and pretrained tags;
* :func:`weights_status` — whether a model/tag's weights are in the local Hugging Face cache and,
  when not, whether a download can work at all (:func:`hub_reachable`), with what to do instead.

A CLIP job started offline without cached weights used to retry downloads for a minute and fail
with a long hub error; the pages and ``cgd run`` check first and say what to do.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["ReferenceKind", "REFERENCE_KINDS", "clip_models", "clip_tags", "hub_repo", "weights_cached", "hub_reachable",
           "WeightsStatus", "weights_status", "reference_label"]


@dataclass(frozen=True)
class ReferenceKind:
    key: str
    label: str
    help: str


REFERENCE_KINDS: dict[str, ReferenceKind] = {k.key: k for k in (
    ReferenceKind("clip", "CLIP (open_clip + pretrained tag)",
                  "Zero-shot CLIP, as in the paper; open_clip downloads the weights once (internet needed)."),
    ReferenceKind("clip-file", "CLIP from a local weights file",
                  "The same, with weights you downloaded elsewhere (offline use)."),
    ReferenceKind("classifier", "Reference classifier checkpoint",
                  "A cgd classifier trained on a trusted clean split (`cgd train --trusted-fraction`)."),
    ReferenceKind("demo", "Demo reference classifier (trained on half the demo's test images)",
                  "The built-in demo's offline reference: a small CNN trained on a trusted half of the sample's test split."),
)}


def reference_label(spec: str | None) -> str:
    """How pages name the reference in axis labels and captions: "CLIP" or "reference classifier"."""
    return "CLIP" if (spec or "clip:").startswith("clip:") else "reference classifier"


@lru_cache(maxsize=1)
def clip_models() -> tuple[str, ...]:
    import open_clip

    return tuple(open_clip.list_models())


@lru_cache(maxsize=256)
def clip_tags(model: str) -> tuple[str, ...]:
    import open_clip

    return tuple(open_clip.list_pretrained_tags_by_model(model))


def hub_repo(model: str, tag: str) -> str | None:
    """The Hugging Face repository open_clip downloads ``model``/``tag`` from (None: not a hub download)."""
    try:
        from open_clip.pretrained import get_pretrained_cfg

        return (get_pretrained_cfg(model, tag) or {}).get("hf_hub", "").rstrip("/") or None
    except Exception:  # noqa: BLE001 - unknown model or tag
        return None


def weights_cached(model: str, tag: str) -> bool | None:
    """Whether open_clip's weights for ``model``/``tag`` are in the local Hugging Face cache (None: unknown)."""
    repo = hub_repo(model, tag)
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo, fn), str)
                   for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    except Exception:  # noqa: BLE001
        return None


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Whether the hub can be reached: False at once under HF_HUB_OFFLINE=1, else a TCP connect to port 443."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "yes") or os.environ.get("CGD_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class WeightsStatus:
    """ok: a job can get the weights; cached: they are local; message: what to tell the user."""

    ok: bool
    cached: bool | None
    message: str


def weights_status(model: str, tag: str | None) -> WeightsStatus:
    """Can ``model`` with pretrained ``tag`` be loaded here? Checks the cache, then the hub."""
    if not tag or tag.lower() in ("none", "random"):
        return WeightsStatus(True, None, "random weights (for testing only)")
    cached = weights_cached(model, tag)
    if cached:
        return WeightsStatus(True, True, "weights found in the local cache")
    if hub_reachable():
        return WeightsStatus(True, False, "weights are not cached yet: open_clip downloads them when the job starts")
    return WeightsStatus(False, cached, f"the weights of {model}/{tag} are not in the local cache and the Hugging Face hub "
                                        "cannot be reached (offline). Download them on a connected machine and pass the "
                                        "file with --checkpoint FILE (dashboard: 'CLIP from a local weights file'), or use "
                                        "a reference classifier trained on a trusted clean split (cgd train "
                                        "--trusted-fraction; dashboard: 'Reference classifier checkpoint').")
