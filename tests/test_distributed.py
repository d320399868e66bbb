"""cgd.distributed: index sharding, in-order gathering, and a real 2-process gloo run under torchrun
whose gathered scores must equal a single-process run and whose DDP replicas must stay identical."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cgd.distributed import gather_in_order, is_distributed, rank, shard_range, unwrap, world_size, wrap_ddp

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP_CONFIG = ROOT / "tests" / "data" / "tiny-clip.json"
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]
CLASSES = ["cat", "dog", "ship"]


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (13, 2), (100, 3), (7, 8), (50_000, 4)])
def test_shard_range_covers_in_order_and_balanced(n, world):
    parts = [shard_range(n, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous, rank order
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def test_shard_range_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard_range(10, 2, 2)


def test_single_process_helpers_are_no_ops():
    assert not is_distributed() and rank() == 0 and world_size() == 1
    assert shard_range(10) == (0, 10)
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert gather_in_order(a) is a or np.array_equal(gather_in_order(a), a)
    m = torch.nn.Linear(2, 2)
    assert wrap_ddp(m) is m and unwrap(m) is m


WORKER = textwrap.dedent(r"""
    import json, sys
    import numpy as np, torch
    import open_clip
    from safetensors.torch import save_file
    from cgd import distributed as D
    from cgd.reference import ClipReference, ClassifierReference
    from cgd.models import SmallCNN
    from cgd.train import TrainConfig, train_classifier

    cfg, work = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    assert D.is_distributed(), "torchrun environment not picked up"
    r, w = D.rank(), D.world_size()
    import torch.distributed as dist
    info = {"rank": r, "world": w, "backend": dist.get_backend()}
    open_clip.add_model_config(cfg)
    z = np.load(f"{work}/data.npz")
    images, labels = z["images"], z["labels"]
    clip = ClipReference("tiny-clip", %(classes)r, %(templates)r, checkpoint=f"{work}/clip.safetensors",
                         device="cpu", precision="fp32", batch_size=4)
    calls = []
    s = clip.score(images, progress=lambda d, t: calls.append((d, t)))
    cls = ClassifierReference(f"{work}/cls.safetensors", num_classes=3, device="cpu", precision="fp32", batch_size=4).score(images)
    torch.manual_seed(0)
    model = SmallCNN(3, width=8)
    hist = train_classifier(model, images, labels, TrainConfig(epochs=2, batch_size=8, precision="fp32", seed=0), "cpu")
    np.savez(f"{work}/rank{r}.npz", clip_logits=s.logits, clip_emb=s.embeddings, cls_logits=cls.logits, cls_emb=cls.embeddings,
             params=torch.cat([p.detach().flatten() for p in model.parameters()]).numpy())
    info.update(hist=hist, last_progress=calls[-1] if calls else None, training=model.training)
    with open(f"{work}/rank{r}.json", "w") as f:
        json.dump(info, f)
    D.shutdown()  # leave no process group alive at exit
""") % {"classes": CLASSES, "templates": TEMPLATES}


@pytest.mark.slow
def test_torchrun_two_processes_gloo_match_single_process(tiny_clip, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from cgd.models import SmallCNN, build_model, save_checkpoint
    from cgd.reference import ClassifierReference, ClipReference


    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)  # odd: the two shards differ in size
    labels = np.arange(13) % 3
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in open_clip.create_model(tiny_clip).state_dict().items()}, str(tmp_path / "clip.safetensors"))
    torch.manual_seed(2)
    save_checkpoint(build_model("small-cnn", 3, width=8), tmp_path / "cls.safetensors", "small-cnn", CLASSES)
    (tmp_path / "worker.py").write_text(WORKER)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "CGD_DIST_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(TINY_CLIP_CONFIG), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    outs = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert [i["rank"] for i in infos] == [0, 1] and all(i["world"] == 2 and i["backend"] == "gloo" for i in infos)

    # single-process scores with the same weights
    single = ClipReference(tiny_clip, CLASSES, TEMPLATES, checkpoint=tmp_path / "clip.safetensors", device="cpu",
                           precision="fp32", batch_size=4).score(images)
    cls = ClassifierReference(tmp_path / "cls.safetensors", num_classes=3, device="cpu", precision="fp32").score(images)
    for o in outs:  # every rank holds the whole result, in index order
        assert o["clip_logits"].shape == (13, 3)
        np.testing.assert_allclose(o["clip_logits"], single.logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(o["clip_emb"], single.embeddings, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(o["cls_logits"], cls.logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(o["cls_emb"], cls.embeddings, rtol=1e-4, atol=1e-5)
    assert infos[0]["last_progress"][1] == 13

    # DDP: replicas end identical, statistics are global (all 13 samples, same on both ranks)
    np.testing.assert_array_equal(outs[0]["params"], outs[1]["params"])
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in SmallCNN(3, width=8).parameters()]).numpy()
    assert not np.allclose(outs[0]["params"], init)  # it trained
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 and a["train_acc"] == b["train_acc"]
               for a, b in zip(infos[0]["hist"], infos[1]["hist"]))
    assert len(infos[0]["hist"]) == 2 and all(np.isfinite(h["loss"]) for h in infos[0]["hist"])
    assert not infos[0]["training"]
