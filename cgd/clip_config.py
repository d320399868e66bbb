"""Custom open_clip architectures, checked before open_clip sees them.

open_clip builds a model from a JSON config, and some of its keys do more than describe an
architecture: ``text_cfg.hf_tokenizer_name`` / ``tokenizer_kwargs`` reach
``transformers.AutoTokenizer.from_pretrained`` (with ``trust_remote_code`` among the kwargs, remote
code runs), ``hf_model_name`` downloads a Hugging Face model, ``timm_model_pretrained`` downloads
timm weights and a ``hf-hub:`` timm name fetches a hub config. A config from an untrusted source (a
dashboard upload) must therefore pass :func:`validate_clip_config`: every key on an allowlist, every
value of its expected type and within bounds; anything else is refused with an error naming the key.

:func:`register_clip_config` registers a validated copy (not the file itself, which could change
after the check) with open_clip. :func:`check_clip_model_name` decides which model names a caller
may use: open_clip's own names always, ``hf-hub:``/``local-dir:`` names only where remote names are
allowed (the CLI; never a dashboard job).

No torch import: the dashboard validates uploads with this module in its server process.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["ClipConfigError", "validate_clip_config", "register_clip_config", "check_clip_model_name",
           "REMOTE_PREFIXES", "MAX_CONFIG_BYTES", "ALLOWED_KEYS"]

MAX_CONFIG_BYTES = 64 * 1024
REMOTE_PREFIXES = ("hf-hub:", "local-dir:")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")  # a model name open_clip can register
_TIMM_NAME = re.compile(r"^[A-Za-z0-9_.]{1,100}$")  # timm's built-in names: no hub prefix, no path


class ClipConfigError(ValueError):
    """A model config or model name that cgd will not hand to open_clip."""


def _int(lo: int, hi: int):
    def check(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
    check.what = f"an integer in [{lo}, {hi}]"  # type: ignore[attr-defined]
    return check


def _num(lo: float, hi: float, none: bool = False):
    def check(v: Any) -> bool:
        if v is None:
            return none
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
    check.what = f"a number in [{lo:g}, {hi:g}]" + (" or null" if none else "")  # type: ignore[attr-defined]
    return check


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


_bool.what = "true or false"  # type: ignore[attr-defined]


def _false(v: Any) -> bool:
    return v is False


_false.what = "false (true downloads weights)"  # type: ignore[attr-defined]


def _choice(*values):
    def check(v: Any) -> bool:
        return v in values
    check.what = "one of " + ", ".join(repr(x) for x in values)  # type: ignore[attr-defined]
    return check


def _int_or_pair(lo: int, hi: int, n: int):
    one = _int(lo, hi)

    def check(v: Any) -> bool:
        return one(v) or (isinstance(v, list) and len(v) == n and all(one(x) for x in v))
    check.what = f"an integer in [{lo}, {hi}] or a list of {n} of them"  # type: ignore[attr-defined]
    return check


def _small_kwargs(v: Any) -> bool:
    """act_kwargs / norm_kwargs: a few numeric or boolean keyword arguments (eps, approximate...)."""
    return v is None or (isinstance(v, dict) and len(v) <= 4 and all(
        isinstance(k, str) and _NAME.match(k) and (isinstance(x, (bool, int, float)) or x in ("tanh", "none"))
        for k, x in v.items()))


_small_kwargs.what = "null or up to 4 numeric keyword arguments"  # type: ignore[attr-defined]


def _timm_name(v: Any) -> bool:
    return v is None or (isinstance(v, str) and bool(_TIMM_NAME.match(v)))


_timm_name.what = "null or a timm model name (letters, digits, '_' and '.': no hub prefix, no path)"  # type: ignore[attr-defined]

def _word(v: Any) -> bool:
    """A short lower-case identifier (a pooling name handed to timm: 'avg', 'map', 'token', '')."""
    return isinstance(v, str) and bool(re.fullmatch(r"[a-z_]{0,20}", v))


_word.what = "a short lower-case word (letters and '_')"  # type: ignore[attr-defined]


def _optional(check):
    def opt(v: Any) -> bool:
        return v is None or check(v)
    opt.what = check.what + " or null"  # type: ignore[attr-defined]
    return opt


_WIDTH, _LAYERS, _HEADS = _int(1, 16384), _int(1, 256), _int(1, 256)
_BLOCK = {"qk_norm": _bool, "scaled_cosine_attn": _bool, "scale_heads": _bool, "scale_attn_inner": _bool,
          "scale_attn": _bool, "scale_fc": _bool, "block_type": _choice(None, "default", "custom")}

# section -> key -> check; a key absent here is refused
ALLOWED_KEYS: dict[str, dict] = {
    "": {"embed_dim": _int(1, 16384), "quick_gelu": _bool, "custom_text": _bool, "init_logit_scale": _num(-100, 100),
         "init_logit_bias": _num(-100, 100, none=True), "vision_cfg": dict, "text_cfg": dict, "multimodal_cfg": dict},
    "vision_cfg": {"layers": _int_or_pair(1, 256, 4), "width": _WIDTH, "head_width": _int(1, 4096), "mlp_ratio": _num(0.1, 64),
                   "patch_size": _optional(_int(1, 1024)), "image_size": _int_or_pair(1, 4096, 2), "ls_init_value": _num(0, 10, none=True),
                   "patch_dropout": _num(0, 0.99), "attentional_pool": _bool, "attn_pooler_queries": _int(1, 4096),
                   "attn_pooler_heads": _HEADS, "no_ln_pre": _bool, "pos_embed_type": _choice("learnable", "sin_cos_2d"),
                   "final_ln_after_pool": _bool, "pool_type": _choice("tok", "avg", "none"), "output_tokens": _bool,
                   "act_kwargs": _small_kwargs, "norm_kwargs": _small_kwargs, **_BLOCK,
                   "timm_model_name": _timm_name, "timm_model_pretrained": _false,
                   "timm_pool": _word,
                   "timm_proj": _choice(None, "linear", "mlp", "none", ""), "timm_proj_bias": _bool,
                   "timm_drop": _num(0, 0.99), "timm_drop_path": _num(0, 0.99, none=True)},
    "text_cfg": {"context_length": _int(1, 4096), "vocab_size": _int(1, 1_000_000), "width": _WIDTH, "heads": _HEADS,
                 "layers": _LAYERS, "mlp_ratio": _num(0.1, 64), "ls_init_value": _num(0, 10, none=True), "embed_cls": _bool,
                 "pad_id": _int(0, 1_000_000), "eos_id": _int(0, 1_000_000), "no_causal_mask": _bool, "final_ln_after_pool": _bool,
                 "pool_type": _choice("argmax", "first", "last", "eos", "none"), "proj_bias": _bool,
                 "proj_type": _choice("linear", "none", "mlp"), "output_tokens": _bool, "act_kwargs": _small_kwargs,
                 "norm_kwargs": _small_kwargs, **_BLOCK},
    "multimodal_cfg": {"context_length": _int(1, 4096), "vocab_size": _int(1, 1_000_000), "width": _WIDTH, "heads": _HEADS,
                       "layers": _LAYERS, "mlp_ratio": _num(0.1, 64), "dim_head": _int(1, 4096), "n_queries": _int(1, 4096),
                       "attn_pooler_heads": _HEADS, "ls_init_value": _num(0, 10, none=True)},
}
# keys that reach a hub, a download or transformers' remote code: named in the error
_DANGEROUS = {"hf_tokenizer_name": "names a Hugging Face tokenizer (downloaded; may run remote code)",
              "tokenizer_kwargs": "passes keyword arguments to transformers' tokenizer loader (trust_remote_code)",
              "tokenizer_mode": "selects a tokenizer loader",
              "hf_model_name": "names a Hugging Face model (downloaded)",
              "hf_model_pretrained": "downloads Hugging Face weights",
              "hf_proj_type": "belongs to a Hugging Face text tower", "hf_pooler_type": "belongs to a Hugging Face text tower"}


def validate_clip_config(path: str | os.PathLike) -> dict:
    """Read and check an open_clip model config; return it as a dict.

    The file's stem is the model's name: letters, digits and ``_.+-``, not one of open_clip's own
    names (a config must not redefine ``ViT-B-32``). Raises :class:`ClipConfigError` naming the file
    and the key for anything outside :data:`ALLOWED_KEYS`, a value of the wrong type or out of
    bounds, a file over :data:`MAX_CONFIG_BYTES`, or text that is not a JSON object.
    """
    p = Path(path)
    if p.suffix.lower() != ".json":
        raise ClipConfigError(f"{p}: a model config must be a .json file")
    if not _NAME.match(p.stem):
        raise ClipConfigError(f"{p}: the file name is the model's name; use letters, digits and _.+- only")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ClipConfigError(f"{p}: {size:,} bytes; a model config is at most {MAX_CONFIG_BYTES:,}")
        cfg = json.loads(p.read_bytes()[: MAX_CONFIG_BYTES + 1])
    except OSError as e:
        raise ClipConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise ClipConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ClipConfigError(f"{p}: expected a JSON object with embed_dim, vision_cfg and text_cfg")
    for need in ("embed_dim", "vision_cfg", "text_cfg"):
        if need not in cfg:
            raise ClipConfigError(f"{p}: missing key {need!r} (an open_clip config needs embed_dim, vision_cfg, text_cfg)")
    _check_section(p, "", cfg)
    for sec in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        if sec in cfg:
            if not isinstance(cfg[sec], dict):
                raise ClipConfigError(f"{p}: {sec} must be a JSON object")
            _check_section(p, sec, cfg[sec])
    if p.stem in _builtin_names():
        raise ClipConfigError(f"{p}: {p.stem!r} is one of open_clip's own models; rename the file to define a custom "
                              "architecture")
    return cfg


def _check_section(p: Path, section: str, d: dict) -> None:
    allowed = ALLOWED_KEYS[section]
    for k, v in d.items():
        where = f"{section}.{k}" if section else str(k)
        if k in _DANGEROUS:
            raise ClipConfigError(f"{p}: key {where!r} is not allowed: it {_DANGEROUS[k]}")
        check = allowed.get(k)
        if check is None:
            raise ClipConfigError(f"{p}: key {where!r} is not an allowed architecture key (allowed in "
                                  f"{section or 'the top level'}: {', '.join(sorted(allowed))})")
        if check is dict:
            continue
        if not check(v):
            raise ClipConfigError(f"{p}: {where} = {json.dumps(v)[:80]}: expected {check.what}")


def _builtin_names() -> set[str]:
    """The model names open_clip ships configs for (its package's model_configs folder)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return set()
    if spec is None or not spec.origin:
        return set()
    return {f.stem for f in (Path(spec.origin).parent / "model_configs").glob("*.json")}


_registered: dict[str, str] = {}  # model name -> digest of the registered config


def register_clip_config(path: str | os.PathLike) -> str:
    """Validate ``path`` and register a private copy of it with open_clip; return the model name.

    The copy (not the file that was checked) is what open_clip reads, so a file changed after the
    check cannot slip through. Registering the same content twice is a no-op; another config under a
    name already registered in this process is refused.
    """
    import open_clip

    cfg = validate_clip_config(path)
    name = Path(path).stem
    blob = json.dumps(cfg, sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    if name in _registered:
        if _registered[name] != digest:
            raise ClipConfigError(f"{path}: another config named {name!r} is already registered in this process")
        return name
    from .arrays import atomic_write_bytes, cache_dir

    copy = cache_dir() / "clip-configs" / digest / f"{name}.json"  # content-addressed: one copy per config
    copy.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(copy, blob)
    open_clip.add_model_config(copy)
    _registered[name] = digest
    return name


def check_clip_model_name(name: str, allow_remote_names: bool = True) -> str:
    """Return ``name`` if a caller may build it, else raise :class:`ClipConfigError`.

    ``hf-hub:ORG/REPO`` (fetched from the Hugging Face hub) and ``local-dir:PATH`` (a model folder read
    from anywhere) are allowed only with ``allow_remote_names`` (the CLI, where the user types them);
    dashboard jobs pass False, leaving open_clip's own names and configs registered with
    :func:`register_clip_config`.
    """
    if name.startswith(REMOTE_PREFIXES):
        if allow_remote_names:
            return name
        raise ClipConfigError(f"model name {name!r}: hf-hub: and local-dir: names are refused here (they fetch from a "
                              "hub or read a folder outside the data root); use an open_clip model name, or a weights "
                              "file with a model config under the data folder")
    import open_clip

    if name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ClipConfigError(f"unknown open_clip model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                              + " (see open_clip.list_models())")
    return name
