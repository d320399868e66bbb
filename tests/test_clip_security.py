"""Audit items 1-2: custom CLIP configs cannot reach a hub, a download or remote code, and a dashboard
job cannot use hf-hub:/local-dir: model names or files outside its roots."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cgd.clip_config import ClipConfigError, check_clip_model_name, register_clip_config, validate_clip_config

TINY = Path(__file__).parent / "data" / "tiny-clip.json"


def _write(tmp_path: Path, cfg: dict, name: str = "my-clip") -> Path:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


def _tiny() -> dict:
    return json.loads(TINY.read_text())


def test_shipped_configs_all_pass():
    """Every architecture open_clip ships without a hub tokenizer or HF text tower passes the allowlist."""
    import open_clip

    folder = Path(open_clip.__file__).parent / "model_configs"
    passed = refused = 0
    for f in sorted(folder.glob("*.json")):
        cfg = json.loads(f.read_text())
        hub = any(k.startswith(("hf_", "tokenizer")) for k in cfg.get("text_cfg", {}))
        try:
            from cgd.clip_config import _check_section

            _check_section(f, "", cfg)
            for sec in ("vision_cfg", "text_cfg", "multimodal_cfg"):
                if sec in cfg:
                    _check_section(f, sec, cfg[sec])
            passed += 1
            assert not hub, f"{f.name} reaches a hub tokenizer/model but passed"
        except ClipConfigError as e:
            refused += 1
            assert hub or "timm_model_pretrained" in str(e), f"{f.name} refused: {e}"
    assert passed > 50 and refused > 0


@pytest.mark.parametrize("section,key,value,words", [
    ("text_cfg", "tokenizer_kwargs", {"trust_remote_code": True}, "trust_remote_code"),
    ("text_cfg", "hf_tokenizer_name", "evil/tokenizer", "Hugging Face tokenizer"),
    ("text_cfg", "hf_model_name", "evil/model", "Hugging Face model"),
    ("text_cfg", "tokenizer_mode", "whatever", "tokenizer"),
    ("vision_cfg", "timm_model_name", "hf-hub:evil/model", "timm model name"),
    ("vision_cfg", "timm_model_pretrained", True, "downloads weights"),
    ("vision_cfg", "width", 10**9, "integer in"),
    ("vision_cfg", "layers", "12", "integer in"),
    ("vision_cfg", "made_up", 1, "not an allowed architecture key"),
    ("", "cast_dtype", "fp16", "not an allowed architecture key"),
])
def test_refused_keys_are_named(tmp_path, section, key, value, words):
    cfg = _tiny()
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(ClipConfigError) as e:
        validate_clip_config(_write(tmp_path, cfg))
    msg = str(e.value)
    assert (f"{section}.{key}" if section else key) in msg and words in msg and "my-clip.json" in msg


def test_bad_files_refused(tmp_path):
    with pytest.raises(ClipConfigError, match="not valid JSON"):
        validate_clip_config(_write_text(tmp_path / "a.json", "{nope"))
    with pytest.raises(ClipConfigError, match="JSON object"):
        validate_clip_config(_write_text(tmp_path / "b.json", "[1, 2]"))
    with pytest.raises(ClipConfigError, match="at most"):
        validate_clip_config(_write_text(tmp_path / "c.json", json.dumps({**_tiny(), "pad": "x" * 70_000})))
    with pytest.raises(ClipConfigError, match="open_clip's own models"):
        validate_clip_config(_write(tmp_path, _tiny(), name="ViT-B-32"))
    with pytest.raises(ClipConfigError, match="missing key"):
        validate_clip_config(_write(tmp_path, {"embed_dim": 8}))


def _write_text(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_register_uses_a_checked_copy(tmp_path):
    """open_clip reads the validated copy: rewriting the file after registration changes nothing."""
    import open_clip

    p = _write(tmp_path, _tiny(), name="cgd-test-copy")
    name = register_clip_config(p)
    assert name == "cgd-test-copy" and name in open_clip.list_models()
    evil = _tiny()
    evil["text_cfg"]["hf_tokenizer_name"] = "evil/tokenizer"
    p.write_text(json.dumps(evil))
    assert "hf_tokenizer_name" not in open_clip.get_model_config(name)["text_cfg"]
    with pytest.raises(ClipConfigError, match="hf_tokenizer_name"):
        register_clip_config(p)  # the changed file itself is checked again and refused


def test_model_names(tiny_clip):
    assert check_clip_model_name("ViT-B-32", allow_remote_names=False) == "ViT-B-32"
    assert check_clip_model_name("hf-hub:org/repo") == "hf-hub:org/repo"  # the CLI: the user typed it
    for name in ("hf-hub:org/repo", "local-dir:/etc"):
        with pytest.raises(ClipConfigError, match="refused here"):
            check_clip_model_name(name, allow_remote_names=False)
    with pytest.raises(ClipConfigError, match="did you mean"):
        check_clip_model_name("ViT-B-33", allow_remote_names=False)


def test_cli_help_says_what_remote_names_do():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "cgd", "score", "--help"], capture_output=True, text=True).stdout
    flat = " ".join(out.split())
    assert "hf-hub:" in flat and "Hugging Face hub" in flat and "local-dir:" in flat


@pytest.mark.parametrize("spec,extra,words", [
    ("clip:hf-hub:org/repo", {}, "refused here"),
    ("clip:local-dir:/tmp", {}, "refused here"),
    ("clip:tiny-clip", {"clip_config": "OUTSIDE"}, "outside the data folder"),
])
def test_dashboard_jobs_refuse_remote_names_and_outside_files(tmp_path, monkeypatch, tiny_clip, spec, extra, words):
    """A job started by the dashboard (CGD_WEB_JOB=1) builds no hub/folder model and reads no file outside
    its roots; the same run from the CLI is allowed to try (and here fails only for want of a network)."""
    from cgd import jobs
    from cgd.config import RunConfig
    from cgd.data import ImageSet, save_npz
    from cgd.pipeline import run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cfgfile = outside / "my-outside-clip.json"
    cfgfile.write_text(TINY.read_text())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    save_npz(data / "set.npz", ImageSet(x, y, ["a", "b", "c", "d"]), ImageSet(x[:8], y[:8], ["a", "b", "c", "d"]))
    monkeypatch.setenv("CGD_DATA_ROOT", str(data))
    monkeypatch.setenv("CGD_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv(jobs.WEB_JOB_ENV, "1")
    kw = {k: (str(cfgfile) if v == "OUTSIDE" else v) for k, v in extra.items()}
    cfg = RunConfig.from_flat(data=f"npz:{data / 'set.npz'}", out=str(tmp_path / "runs" / "r"), reference=spec,
                              pretrained="none", device="cpu", precision="fp32", arch="tiny-cnn", train_epochs=1,
                              suspicious_runs=1, suspicious_epochs=1, **kw)
    with pytest.raises(Exception) as e:
        run_pipeline(cfg, stages=("data", "reference"), progress_bars=False)
    assert words in str(e.value)


def test_a_hostile_config_never_reaches_transformers(tmp_path, monkeypatch, tiny_clip):
    """The audit's exploit: a config whose text tower names a hub tokenizer with trust_remote_code.
    With a stand-in `transformers` installed, neither registering it nor building a reference from
    it calls AutoTokenizer.from_pretrained."""
    import types

    calls = []

    class AutoTokenizer:
        @staticmethod
        def from_pretrained(*a, **k):
            calls.append((a, k))
            raise AssertionError("transformers was called")

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoTokenizer=AutoTokenizer, __version__="9"))
    cfg = _tiny()
    cfg["text_cfg"].update(hf_tokenizer_name="attacker/tokenizer", tokenizer_kwargs={"trust_remote_code": True})
    path = _write(tmp_path, cfg, name="evil-clip")
    with pytest.raises(ClipConfigError, match="hf_tokenizer_name|tokenizer_kwargs"):
        register_clip_config(path)
    from cgd.reference import make_reference

    with pytest.raises(Exception):
        make_reference("clip:evil-clip", ["a", "b"], ["a photo of a {}."], pretrained="none", device="cpu")
    assert calls == []
