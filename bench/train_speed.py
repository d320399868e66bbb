"""Training speed: the paper's DataLoader loop vs cgd's device-resident trainer, same process and data.

Two loops (``--loop``):

* ``suspicious`` — cross-entropy training with Adam (lr 3e-4, weight decay 5e-4), the suspicious-
  model recipe: reference = a DataLoader over PIL images with torchvision RandomCrop(32, padding 4)
  + RandomHorizontalFlip + ToTensor, ``--workers`` worker processes, fp32, batch 256;
  cgd = :func:`cgd.train.train_classifier` (uint8 data on the device, batched augmentation,
  bf16 autocast, channels_last).
* ``retrain`` — guided retraining (clean CE + KL to reference logits + unlearning, SGD + cosine):
  reference = the same DataLoader pattern feeding :func:`cgd.retrain.guided_losses` in fp32;
  cgd = :func:`cgd.retrain.guided_retrain` (its per-epoch evaluation replaced by a constant, so
  only training is timed).

Ceiling: forward + backward + optimiser step of the bare network in cgd's precision and memory
format on pre-augmented float batches already on the device.

Examples::

    python bench/train_speed.py --device cpu --model small-cnn --loop both --n 10240 \\
        --data imagefolder:/tmp/assets/CIFAR-10-images
    python bench/train_speed.py --device cuda --model preact-resnet18 --n 50000 --loop both
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--model", default="small-cnn", choices=["small-cnn", "preact-resnet18"])
    p.add_argument("--loop", default="both", choices=["suspicious", "retrain", "both"])
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed pass")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pattern")
    a = p.parse_args(argv)
    if a.n is None:
        a.n = 5120
    return a


class _PilDataset(torch.utils.data.Dataset):
    """PIL images + labels (+ per-sample extras), torchvision transform per sample: the paper's data path."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, extras: tuple[torch.Tensor, ...] = ()):
        from PIL import Image

        self.pil = [Image.fromarray(x) for x in images]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.extras = extras

    def __len__(self) -> int:
        return len(self.pil)

    def __getitem__(self, i: int):
        return (self.transform(self.pil[i]), self.labels[i], *(e[i] for e in self.extras))


def _tv_transform():
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])


def _loader(ds, batch_size: int, workers: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, generator=g,
                                       pin_memory=device.type == "cuda", drop_last=False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup_threads(args.threads)
    from cgd.distributed import init_from_env

    init_from_env()  # under torchrun: process group + this process's GPU before anything touches CUDA
    from cgd.device import autocast, resolve_device, resolve_precision
    from cgd.models import build_model
    from cgd.retrain import RetrainConfig, guided_losses, guided_retrain
    from cgd.train import TrainConfig, augment_batch, to_device_u8, train_classifier, u8_to_float

    dev = resolve_device(args.device)
    prec = resolve_precision(args.precision, dev)
    images, labels, classes, data_desc = common.load_images(args.data, args.n, args.seed)
    k = len(classes)
    bs = args.batch_size
    loops = ["suspicious", "retrain"] if args.loop == "both" else [args.loop]
    print(f"train_speed: {args.model} on {dev} ({prec}), {data_desc}, batch {bs}, loops {', '.join(loops)}")

    def fresh(seed: int = 0):
        torch.manual_seed(args.seed + seed)
        return build_model(args.model, k)

    # retraining inputs: 10% suspect, the rest clean (the pipeline oversamples per class; speed only)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(images))
    suspect_idx = np.sort(perm[: len(images) // 10])
    clean_idx = np.sort(perm[len(images) // 10:])
    ref_logits = rng.normal(0, 3, (len(images), k)).astype(np.float32)
    rcfg_steps = math.ceil(len(images) / bs)

    # ceiling: pre-augmented float batches on the device, bare model fwd/bwd/step in cgd's setup
    x_dev = to_device_u8(images, dev)
    y_dev = torch.as_tensor(labels, device=dev)
    n_ceil = min(len(images), 16 * bs)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    ceil_batches = [(u8_to_float(augment_batch(x_dev[i:i + bs], g), True), y_dev[i:i + bs]) for i in range(0, n_ceil, bs)]

    def make_ceiling(loop: str):
        m = fresh(1).to(dev).to(memory_format=torch.channels_last).train()
        opt = (torch.optim.Adam(m.parameters(), lr=3e-4, weight_decay=5e-4) if loop == "suspicious"
               else torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4))

        def step(xb, yb):
            with autocast(dev, prec):
                out = m(xb)
            loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def run():
            for _ in range(args.epochs):
                for xb, yb in ceil_batches:
                    step(xb, yb)
        return run, step, m

    tf = _tv_transform()
    out: dict = {"model": args.model, "precision": prec, "device": str(dev), "data": data_desc, "n": len(images),
                 "batch_size": bs, "epochs": args.epochs, "workers": args.workers, "loops": {}}
    rows = []
    for loop in loops:
        if loop == "suspicious":
            ds = _PilDataset(images, labels, tf)
            ref_model = fresh(2).to(dev)
            ref_opt = torch.optim.Adam(ref_model.parameters(), lr=3e-4, weight_decay=5e-4)
            cgd_model = fresh(2)
            cfg = TrainConfig(epochs=args.epochs, batch_size=bs, lr=3e-4, weight_decay=5e-4, optimizer="adam",
                              schedule="none", precision=prec, seed=args.seed)
            imgs_per_pass = args.epochs * len(images)

            def run_ref(ds=ds, m=ref_model, opt=ref_opt):
                m.train()
                for _ in range(args.epochs):
                    for xb, yb in _loader(ds, bs, args.workers, dev, args.seed):
                        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                        loss = F.cross_entropy(m(xb), yb)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()

            def run_cgd(m=cgd_model, cfg=cfg):
                train_classifier(m, x_dev, y_dev, cfg, dev)
        else:
            pool = np.concatenate([clean_idx, suspect_idx])
            is_susp = np.r_[np.zeros(len(clean_idx), bool), np.ones(len(suspect_idx), bool)]
            ds = _PilDataset(images[pool], labels[pool], tf,
                             (torch.from_numpy(ref_logits[pool]), torch.from_numpy(is_susp)))
            # one recipe for both paths: RetrainConfig's defaults (min_batches=0: both see the same images)
            rcfg = RetrainConfig(epochs=args.epochs, max_batches=rcfg_steps, min_batches=0, batch_size=bs, precision=prec,
                                 seed=args.seed, log_every=0)
            ref_model = fresh(3).to(dev)
            ref_opt = torch.optim.SGD(ref_model.parameters(), lr=rcfg.lr, momentum=rcfg.momentum, weight_decay=rcfg.weight_decay)
            ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=max(1, 10 * rcfg_steps))
            cgd_model = fresh(3)
            imgs_per_pass = args.epochs * len(pool)

            def run_ref(ds=ds, m=ref_model, opt=ref_opt, sched=ref_sched, rcfg=rcfg):
                m.train()
                for _ in range(args.epochs):
                    for xb, yb, rb, sb in _loader(ds, bs, args.workers, dev, args.seed):
                        xb, yb, rb, sb = (t.to(dev, non_blocking=True) for t in (xb, yb, rb, sb))
                        losses = guided_losses(m(xb), rb, yb, sb, temperature=rcfg.temperature, alpha=rcfg.alpha,
                                               beta=rcfg.beta, unlearn=rcfg.unlearn, unlearn_floor=rcfg.unlearn_floor)
                        opt.zero_grad(set_to_none=True)
                        losses["total"].backward()
                        opt.step()
                        sched.step()

            def run_cgd(m=cgd_model, rcfg=rcfg):
                for _ in guided_retrain(m, images, labels, clean_idx, suspect_idx, ref_logits,
                                        lambda _m: {"ca": 50.0, "asr": 0.0, "ra": 0.0}, rcfg, dev):
                    pass

        run_ceil, ceil_step, ceil_model = make_ceiling(loop)
        # warm-up: a few steps of each (oneDNN primitives, allocator), not timed
        ceil_step(*ceil_batches[0])
        small = min(len(images), 2 * bs)
        train_classifier(fresh(4), x_dev[:small], y_dev[:small], TrainConfig(epochs=1, batch_size=bs, precision=prec), dev)
        # FLOPs of one training step (forward + backward) per image
        xb0, yb0 = ceil_batches[0]
        flops_img = common.count_flops(lambda: ceil_step(xb0, yb0)) / len(yb0)
        res = common.interleaved({"reference": (run_ref, imgs_per_pass), "cgd": (run_cgd, imgs_per_pass),
                                  "ceiling": (run_ceil, args.epochs * n_ceil)}, dev, args.repeats)
        for v in res.values():
            v["tflops"] = v["images_per_s"] * flops_img / 1e12
        r_ref, r_ceil = common.ratio(res, "cgd", "reference"), common.ratio(res, "cgd", "ceiling")
        out["loops"][loop] = {"results": res, "speedup_vs_reference": r_ref, "ceiling_fraction": r_ceil,
                              "gflop_per_image_step": flops_img / 1e9, "images_per_pass": imgs_per_pass}
        rows += [(f"[{loop}] reference loop", f"{res['reference']['images_per_s']:9.1f} img/s  {res['reference']['tflops']:.3f} TFLOP/s  (fp32, DataLoader, {args.workers} workers)"),
                 (f"[{loop}] cgd", f"{res['cgd']['images_per_s']:9.1f} img/s  {res['cgd']['tflops']:.3f} TFLOP/s  ({prec}, device-resident)"),
                 (f"[{loop}] bare-model ceiling", f"{res['ceiling']['images_per_s']:9.1f} img/s  {res['ceiling']['tflops']:.3f} TFLOP/s"),
                 (f"[{loop}] speed-up vs reference", f"{r_ref:.2f}x (median of per-round ratios)"),
                 (f"[{loop}] fraction of ceiling", f"{r_ceil:.2f}")]
        if dev.type == "cuda":
            rows.append((f"[{loop}] peak GPU memory (GiB)", ", ".join(f"{kk} {v.get('peak_mem_gib', float('nan')):.2f}" for kk, v in res.items())))
        del ceil_model
    rows.append(("GFLOP / image / step", f"{next(iter(out['loops'].values()))['gflop_per_image_step']:.3f}"))
    from cgd.distributed import is_main_process

    if is_main_process():
        common.print_summary(f"train_speed {args.model} on {dev}", rows)
        path = common.append_result("train_speed", {"hardware": common.hardware(dev), "versions": common.versions(),
                                                    "settings": vars(args), **out}, args.results)
        print(f"  result line appended to {path}")
    return out


if __name__ == "__main__":
    main()
