"""`cgd run` end to end on real CIFAR-10 images with an attack; stage reuse; exports."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cgd.cli import main
from cgd.runs import RunDir
from cgd.separation import Subset, label_nll, rank_normalise, separate

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")


def _run_args(cifar_root, out, *extra):
    return ["run", "--data", f"imagefolder:{cifar_root}", "--subset", "400", "--attack", "badnets", "--poison-rate", "0.1",
            "--target", "0", "--reference", "clip:tiny-clip", "--clip-config", TINY, "--pretrained", "none",
            "--arch", "small-cnn", "--train-epochs", "2", "--suspicious-runs", "1", "--suspicious-epochs", "1",
            "--epochs", "2", "--max-batches", "2", "--device", "cpu", "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def small_run(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r1"
    assert main(_run_args(cifar_root, out)) == 0
    return out


def test_run_writes_every_artefact(small_run):
    run = RunDir(small_run)
    info = run.read_run()
    assert info["config"]["seed"] == 0 and info["config"]["attack"] == "badnets"
    assert {"torch", "open_clip", "cgd", "numpy"} <= set(info["versions"])
    assert info["device"]["device"] == "cpu"
    assert len(info["dataset"]["fingerprint"]) == 16 and info["dataset"]["n_train"] == 400
    assert set(info["stages"]) == {"data", "victim", "reference", "suspicious", "separate", "retrain", "export"}
    assert all(s["seconds"] >= 0 for s in info["stages"].values())
    assert run.read_status()["state"] == "done"
    clip = np.load(small_run / "clip_logits.npy")
    emb = np.load(small_run / "embeddings.npy")
    assert clip.shape == (400, 10) and emb.shape == (400, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3)
    assert np.load(small_run / "data" / "poison_mask.npy").sum() == 40
    for f in ("models/victim.safetensors", "models/repaired.safetensors", "models/suspicious_0.safetensors",
              "metrics.csv", "separation.json", "exports/clean_indices.csv", "exports/suspect_indices.json", "exports/scores.csv"):
        assert (small_run / f).is_file(), f
    metrics = run.read_metrics()
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert all(0 <= m["ca"] <= 100 and 0 <= m["asr"] <= 100 for m in metrics)
    assert info["summary"]["before"]["asr"] == metrics[0]["asr"]


def test_scores_table_is_consistent(small_run):
    df = pd.read_parquet(small_run / "scores.parquet")
    assert list(df.columns[:8]) == ["index", "source_index", "label", "clip_nll", "model_nll", "clip_rank", "model_rank", "subset"]
    assert {"clip_pred", "poison", "original_label", "clip_rank_class", "model_rank_class"} <= set(df.columns)
    y = np.load(small_run / "data" / "train_y.npy")
    np.testing.assert_allclose(df["clip_nll"], label_nll(np.load(small_run / "clip_logits.npy"), y))
    np.testing.assert_allclose(df["model_nll"], label_nll(np.load(small_run / "model_logits.npy"), y))
    np.testing.assert_allclose(df["clip_rank"], rank_normalise(df["clip_nll"].to_numpy()))
    sub = separate(df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), 0.2, 0.1)
    assert (df["subset"].to_numpy() == sub).all()  # Subset codes: 0 unused, 1 clean, 2 suspect
    sep = json.loads((small_run / "separation.json").read_text())
    assert sep["clean"] + sep["suspect"] + sep["unused"] == 400
    assert sep["detection"]["n_poison"] == 40


def test_exports_have_provenance_and_match(small_run):
    df = pd.read_parquet(small_run / "scores.parquet")
    for pol in ("clean", "suspect"):
        doc = json.loads((small_run / "exports" / f"{pol}_indices.json").read_text())
        assert doc["polarity"] == pol
        assert doc["indices"] == sorted(df.loc[df["subset"] == int(Subset[pol.upper()]), "index"].tolist())
        assert len(set(doc["indices"])) == len(doc["indices"])
        prov = doc["provenance"]
        assert prov["sigma1"] == 0.2 and prov["sigma2"] == 0.1 and prov["seed"] == 0
        assert prov["dataset_fingerprint"] == RunDir(small_run).read_run()["dataset"]["fingerprint"]
        # plain CSV (pandas and spreadsheets read it as is); the provenance sits beside it
        table = pd.read_csv(small_run / "exports" / f"{pol}_indices.csv")
        assert list(table.columns[:4]) == ["index", "source_index", "label", "label_name"] and len(table) == doc["count"]
        assert table["index"].tolist() == doc["indices"]
        assert table["file"].str.endswith(".jpg").all() and not table["file"].str.startswith("/").any()
        assert json.loads((small_run / "exports" / "provenance.json").read_text())["sigma1"] == 0.2


def test_rerun_reuses_finished_stages_and_threshold_change_reruns_only_later(small_run, cifar_root):
    before = RunDir(small_run).read_run()["stages"]
    assert main(_run_args(cifar_root, small_run)) == 0
    same = RunDir(small_run).read_run()["stages"]
    assert {k: v["finished"] for k, v in same.items()} == {k: v["finished"] for k, v in before.items()}
    assert main(["separate", "--out", str(small_run), "--sigma1", "0.3", "--sigma2", "0.15", "--quiet"]) == 0
    after = RunDir(small_run).read_run()["stages"]
    for st in ("data", "reference", "suspicious", "victim"):
        assert after[st]["finished"] == before[st]["finished"], st
    assert after["separate"]["key"] != before["separate"]["key"]
    sep = json.loads((small_run / "separation.json").read_text())
    assert sep["config"]["sigma1"] == 0.3
    # `cgd run --out RUN` alone resumes with the recorded configuration (the new thresholds included):
    # everything up to the separation is reused, retraining follows the new split
    assert main(["run", "--out", str(small_run), "--quiet"]) == 0
    again = RunDir(small_run).read_run()["stages"]
    for st in ("data", "reference", "suspicious", "victim", "separate"):
        assert again[st]["finished"] == after[st]["finished"], st
    assert again["retrain"]["key"] != before["retrain"]["key"]
    assert json.loads((small_run / "separation.json").read_text())["config"]["sigma1"] == 0.3


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["run", "--data", "nosuch:/x", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "unknown kind 'nosuch'" in capsys.readouterr().err
    assert main(["run", "--data", f"imagefolder:{tmp_path / 'missing'}", "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--data is required"):
        main(["run", "--out", str(tmp_path / "fresh"), "--quiet"])


def test_python_m_cgd_subprocess(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cgd", "attack", "--list"], capture_output=True, text=True, check=True)
    assert "badnets" in out.stdout and "dirty-label" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "cgd", "train", "--data", f"npz:{tmp_path / 'none.npz'}", "--out", str(tmp_path / "m.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "none.npz: no such .npz file" in bad.stderr


def test_trusted_classifier_reference_detects_badnets(cifar_root, tmp_path):
    """A weak classifier trained on a trusted slice of the test split is the reference; the
    suspicious model's loss separates BadNets poisons; the trusted images are kept out of evaluation."""
    ref = tmp_path / "ref.safetensors"
    assert main(["train", "--data", f"imagefolder:{cifar_root}", "--split", "test", "--trusted-fraction", "0.1",
                 "--arch", "small-cnn", "--epochs", "3", "--device", "cpu", "--out", str(ref), "--quiet"]) == 0
    used = json.loads(ref.with_suffix(".json").read_text())["trained_on"]["indices"]
    assert len(used) == 1000 and len(set(np.array(used) // 1000)) == 10  # a spread sample, not one class
    out = tmp_path / "run"
    assert main(["run", "--data", f"imagefolder:{cifar_root}", "--subset", "2000", "--attack", "badnets",
                 "--reference", f"classifier:{ref}", "--arch", "small-cnn", "--train-epochs", "2",
                 "--suspicious-runs", "1", "--suspicious-epochs", "5", "--epochs", "1", "--max-batches", "4",
                 "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    info = RunDir(out).read_run()
    assert any("excluded 1000 test images" in n for n in info["dataset"]["notes"])
    det = json.loads((out / "separation.json").read_text())["detection"]
    assert det["n_poison"] == 200
    assert det["auroc_model"] > 0.9, det
    assert det["suspect"]["tpr"] > 0.8, det
    assert det["auroc_clip"] > 0.6, det


def test_presets_set_the_retraining_recipe_and_explicit_flags_win(tmp_path):
    from cgd.cli import build_parser, config_from_args
    from cgd.retrain import PRESETS, RetrainConfig

    def cfg(*extra):
        return config_from_args(build_parser().parse_args(["retrain", "--data", "npz:x.npz", "--out", str(tmp_path / "r"), *extra]))

    assert cfg().retrain.lr == RetrainConfig().lr == PRESETS["cgd"].lr == 0.003
    assert cfg("--preset", "paper").retrain.lr == PRESETS["paper"].lr == 0.01
    assert cfg("--preset", "paper", "--lr", "0.02").retrain.lr == 0.02
    assert cfg("--unlearn", "log_1mp").retrain_config().unlearn == "log_1mp"
    assert cfg().retrain_config().unlearn_floor == RetrainConfig().unlearn_floor == 1e-4
    assert cfg("--preset", "paper").retrain_config().unlearn_floor == 0.0  # the paper's unbounded term
    assert cfg("--preset", "paper", "--unlearn-floor", "0.05").retrain_config().unlearn_floor == 0.05
    assert cfg().separation_config().sigma3 == 0.1 and cfg("--preset", "paper").separation_config().sigma3 == 0.0
    assert cfg("--preset", "paper", "--sigma3", "0.2").separation_config().sigma3 == 0.2
    assert cfg().retrain_config().patience == 2 and cfg("--preset", "paper").retrain_config().patience == 1
    assert cfg().retrain_config().split_target == "leave" and cfg("--preset", "paper").retrain_config().split_target == "none"
    assert cfg("--patience", "4").retrain_config().patience == 4


def test_reference_training_images_are_excluded_wherever_the_dataset_lies(synthetic_set, tmp_path):
    """A reference trained on half of a test split keeps those images out of evaluation also when the
    dataset was copied to another path (matched by the split's fingerprint); an older checkpoint
    without the fingerprint says plainly that nothing was excluded; another dataset is left alone."""
    import shutil

    from cgd.config import RunConfig
    from cgd.data import save_npz
    from cgd.rundata import prepare_dataset

    a = save_npz(tmp_path / "a" / "set.npz", synthetic_set.subset(np.arange(120)), synthetic_set.subset(np.arange(120, 200)))
    ref = tmp_path / "ref.safetensors"
    assert main(["train", "--data", f"npz:{a}", "--split", "test", "--trusted-fraction", "0.5", "--arch", "tiny-cnn",
                 "--epochs", "1", "--device", "cpu", "--out", str(ref), "--quiet"]) == 0
    b = tmp_path / "b" / "moved.npz"
    b.parent.mkdir()
    shutil.copy(a, b)

    def prepared(path):
        cfg = RunConfig.from_flat(data=f"npz:{path}", reference=f"classifier:{ref}", out=str(tmp_path / "run"))
        return prepare_dataset(cfg)

    for path in (a, b):
        p = prepared(path)
        assert len(p.test) == 40 and any("excluded 40 test images" in n for n in p.notes), (path, p.notes)
    other = save_npz(tmp_path / "c" / "other.npz", synthetic_set.subset(np.arange(80, 200)), synthetic_set.subset(np.arange(80)))
    p = prepared(other)
    assert len(p.test) == 80 and not any("excluded" in n for n in p.notes)
    meta_path = ref.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["trained_on"]["split_fingerprint"]
    meta_path.write_text(json.dumps(meta))
    p = prepared(b)
    assert len(p.test) == 80 and any("no test images were excluded" in n for n in p.notes)
