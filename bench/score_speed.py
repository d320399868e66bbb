"""CLIP zero-shot scoring speed: the paper's pattern vs cgd's ClipReference, same process and data.

Reference pattern (the CGD authors' code): the images as a DataLoader of float tensors normalised
to [-1, 1], batch 256; per batch torchvision Resize(bicubic) + CenterCrop + Normalize on the host,
the fp32 model under ``torch.no_grad``, logits = scale * cos(image, class).

cgd: ``ClipReference.score`` — uint8 images in, logits + embeddings out (resize/normalise on the
device, bf16 weights where chosen, per-device batch size).

Ceiling: the bare ``encode_image`` in cgd's precision and batch size on pre-resized,
pre-normalised input already on the device — what the hardware gives for this model.

Examples::

    python bench/score_speed.py --device cpu --model ViT-B-32 --checkpoint W.safetensors \\
        --data imagefolder:/tmp/assets/CIFAR-10-images --n 512 --spearman
    python bench/score_speed.py --device cuda --model ViT-B-32 --n 20000 --batch-size 1024
    python bench/score_speed.py --model tiny-clip --model-config tests/data/tiny-clip.json --n 16
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (or the name of --model-config)")
    p.add_argument("--model-config", default=None,
                   help="open_clip model config JSON to register first (its file name, minus .json, is the model name)")
    p.add_argument("--checkpoint", default=None, help="local weights file (default: random weights)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (downloads; default: none)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cgd batch size (default: 1024 on CUDA, 256 on CPU, where forward passes run 64 at a time)")
    p.add_argument("--ref-batch-size", type=int, default=256, help="reference pattern batch size")
    p.add_argument("--ref-n", type=int, default=None,
                   help="images for the (slow) reference pattern (default: n; its rate is per image)")
    p.add_argument("--spearman", action="store_true",
                   help="also score the images in fp32 and bf16 with cgd and report the Spearman correlation of the label NLL")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile cgd's image tower (auto: ClipReference's rule, on for CPU jobs >= 4096 images); "
                        "compile time is excluded from the rates and reported")
    p.add_argument("--templates", type=int, default=1, help="prompt templates per class (text side is not timed)")
    a = p.parse_args(argv)
    if a.n is None:
        a.n = 512
    return a


def register_config(path: str | None) -> None:
    if not path:
        return
    import open_clip

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--model-config {p}: file not found")
    if p.stem not in open_clip.list_models():
        open_clip.add_model_config(p)


def reference_pattern(model, text_classifier: torch.Tensor, logit_scale: float, images_pm1: torch.Tensor,
                      size: tuple[int, int], mean, std, device: torch.device, batch_size: int):
    """The paper's loop: DataLoader over [-1, 1] floats, torchvision transforms per batch, fp32."""
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(size[0], interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(size), T.Normalize(mean, std)])
    dl = DataLoader(TensorDataset(images_pm1), batch_size=batch_size, shuffle=False)
    txt = text_classifier.to(device)
    out = []
    with torch.no_grad():
        for (xb,) in dl:
            xb = tf((xb + 1) / 2).to(device)
            e = F.normalize(model.encode_image(xb).float(), dim=-1)
            out.append((logit_scale * e @ txt).cpu())
    return torch.cat(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup_threads(args.threads)
    from cgd.distributed import init_from_env

    init_from_env()  # under torchrun: process group + this process's GPU before anything touches CUDA
    register_config(args.model_config)
    import open_clip

    from cgd.device import resolve_device, resolve_precision
    from cgd.distributed import is_main_process
    from cgd.reference import ClipReference, gpu_preprocess
    from cgd.separation import label_nll

    dev = resolve_device(args.device)
    prec = resolve_precision(args.precision, dev, "matmul_infer")
    say = print if is_main_process() else (lambda *a, **k: None)
    images, labels, classes, data_desc = common.load_images(args.data, args.n, args.seed)
    bs = args.batch_size or (1024 if dev.type == "cuda" else 256)
    templates = ["a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of the {}.", "a good photo of a {}."][:max(1, args.templates)]
    say(f"score_speed: {args.model} on {dev} ({prec}), {data_desc}, cgd batch {bs}")
    torch.manual_seed(args.seed)
    cgd_ref = ClipReference(args.model, classes, templates, pretrained=args.pretrained, checkpoint=args.checkpoint,
                            device=dev, precision=prec, batch_size=bs,
                            compile={"auto": None, "on": True, "off": False}[args.compile])
    # the baseline's model: the same weights (same file, or the same seeded random init), fp32
    torch.manual_seed(args.seed)
    base = open_clip.create_model(args.model, pretrained=args.checkpoint or args.pretrained, device="cpu", weights_only=True)
    base = base.float().to(dev).eval()
    size, mean, std = cgd_ref.input_size, cgd_ref.mean, cgd_ref.std
    ref_n = min(args.ref_n or args.n, args.n)
    imgs_pm1 = torch.from_numpy(images[:ref_n]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # the paper's dataset

    # ceiling input: pre-resized, pre-normalised, on the device, in cgd's dtype
    fb = cgd_ref.forward_batch_size
    n_ceil = min(args.n, max(fb, 2048 if dev.type == "cuda" else 256))
    n_ceil = n_ceil // fb * fb if n_ceil >= fb else n_ceil  # whole batches (a compiled graph has one size)
    pre = torch.cat([gpu_preprocess(torch.from_numpy(images[i:i + fb]).permute(0, 3, 1, 2).to(dev), size, mean, std,
                                    cgd_ref.interpolation, cgd_ref.dtype) for i in range(0, n_ceil, fb)])
    if cgd_ref.channels_last:
        pre = pre.contiguous(memory_format=torch.channels_last)

    def ceiling():  # the same encoder cgd uses (compiled when cgd compiles)
        enc = cgd_ref._encoder(len(images))
        with torch.inference_mode():
            for i in range(0, n_ceil, fb):
                enc(pre[i:i + fb])

    def run_ref():
        return reference_pattern(base, cgd_ref.text_classifier, cgd_ref.logit_scale, imgs_pm1, size, mean, std, dev,
                                 args.ref_batch_size)

    def run_cgd():
        return cgd_ref.score(images)

    # warm-up (allocator, oneDNN kernels, cuDNN autotune) on a few images
    with torch.inference_mode():
        cgd_ref.model.encode_image(pre[:fb])
    t_c = time.perf_counter()
    cgd_ref._encoder(len(images))  # builds the compiled graph now when cgd would compile for this job
    compile_s = time.perf_counter() - t_c
    compiled = cgd_ref._compiled not in (None, False)
    cgd_ref.score(images[:min(len(images), fb)])
    reference_pattern(base, cgd_ref.text_classifier, cgd_ref.logit_scale, imgs_pm1[:min(ref_n, 8)], size, mean, std, dev, 8)

    # FLOPs of the image tower per image (one forward in cgd's precision)
    # (the fused attention fast path of nn.MultiheadAttention is invisible to the counter: count
    # the same maths on the unfused path)
    k = min(2, n_ceil)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            flops_img = common.count_flops(lambda: cgd_ref.model.encode_image(pre[:k])) / k
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)

    res = common.interleaved({"reference": (run_ref, ref_n), "cgd": (run_cgd, args.n), "ceiling": (ceiling, n_ceil)},
                             dev, args.repeats, log=say)
    r_cgd_ref = common.ratio(res, "cgd", "reference")
    r_cgd_ceil = common.ratio(res, "cgd", "ceiling")
    for v in res.values():
        v["tflops"] = v["images_per_s"] * flops_img / 1e12

    # correctness: cgd's logits against the fp32 reference pattern's (same weights)
    check_n = min(ref_n, 64)
    lg_ref = run_ref()[:check_n].numpy()
    lg_cgd = cgd_ref.score(images[:check_n]).logits
    agree = float((lg_ref.argmax(1) == lg_cgd.argmax(1)).mean())
    spear_ref = common.spearman(label_nll(lg_ref, labels[:check_n]), label_nll(lg_cgd, labels[:check_n])) if check_n > 2 else float("nan")

    out = {"model": args.model, "precision": prec, "device": str(dev), "data": data_desc, "n": args.n, "ref_n": ref_n,
           "cgd_batch_size": bs, "cgd_forward_batch": fb, "compiled": compiled, "compile_seconds": compile_s, "ref_batch_size": args.ref_batch_size,
           "gflop_per_image": flops_img / 1e9, "results": res, "speedup_vs_reference": r_cgd_ref,
           "ceiling_fraction": r_cgd_ceil, "top1_agreement_vs_reference": agree,
           "spearman_nll_vs_reference": spear_ref}

    if args.spearman:
        nll = {}
        for p in ("fp32", "bf16"):
            torch.manual_seed(args.seed)  # same random init as cgd_ref when there is no checkpoint
            r = cgd_ref if p == prec else ClipReference(args.model, classes, templates, pretrained=args.pretrained,
                                                        checkpoint=args.checkpoint, device=dev, precision=p, batch_size=bs)
            nll[p] = label_nll(r.score(images).logits, labels)
        out["spearman_bf16_fp32"] = common.spearman(nll["fp32"], nll["bf16"])

    rows = [("reference pattern", f"{res['reference']['images_per_s']:9.1f} img/s  {res['reference']['tflops']:.3f} TFLOP/s  (fp32, batch {args.ref_batch_size})"),
            ("cgd", f"{res['cgd']['images_per_s']:9.1f} img/s  {res['cgd']['tflops']:.3f} TFLOP/s  ({prec}, batch {bs}, forward {fb}"
                    + (f", compiled in {compile_s:.0f} s)" if compiled else ", eager)")),
            ("bare-model ceiling", f"{res['ceiling']['images_per_s']:9.1f} img/s  {res['ceiling']['tflops']:.3f} TFLOP/s"),
            ("speed-up vs reference", f"{r_cgd_ref:.2f}x (median of per-round ratios)"),
            ("fraction of ceiling", f"{r_cgd_ceil:.2f}"),
            ("GFLOP / image", f"{flops_img / 1e9:.3f}"),
            ("top-1 agreement cgd vs reference", f"{agree:.3f} on {check_n} images"),
            ("Spearman NLL cgd vs reference", f"{spear_ref:.4f}")]
    if dev.type == "cuda":
        rows += [("peak GPU memory (GiB)", ", ".join(f"{k} {v.get('peak_mem_gib', float('nan')):.2f}" for k, v in res.items()))]
    if "spearman_bf16_fp32" in out:
        rows.append(("Spearman NLL bf16 vs fp32", f"{out['spearman_bf16_fp32']:.4f} on {args.n} images"))
    if is_main_process():
        common.print_summary(f"score_speed {args.model} on {dev}", rows)
        path = common.append_result("score_speed", {"hardware": common.hardware(dev), "versions": common.versions(),
                                                    "settings": vars(args), **out}, args.results)
        print(f"  result line appended to {path}")
    if not math.isfinite(r_cgd_ref):
        raise SystemExit("no timing")
    return out


if __name__ == "__main__":
    main()
