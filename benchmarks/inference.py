"""Whole-volume super-resolution speed on an HCP-sized box (run on demand, not a test).

    .venv/bin/python benchmarks/inference.py [--json FILE] [--threads N] [--device cpu|cuda]
                                             [--precisions float32 bfloat16] [--quick] [--kernels 3 3 3]

LR 72×87×72 → HR 145×174×145 (r = 2; HR cropped to the HCP box when reported), brain an
ellipsoid of ~40 % of the box. For `espcn` and `hetero-var2`: a deterministic whole-brain
pass as the app runs it (the brain and its rim), T = 8 (the app's default: with the 8 test-time
mirrors) and T = 32 Monte-Carlo samples, in each ``--precisions`` arithmetic; the original
implementation's patch-by-patch loop
(11³ patches, stride 7) on the same input, whose output the whole-volume path must equal; the
peak of a large conv3d measured in the same run. Each case runs in a fresh process so its peak
memory (RSS) is its own. Prints HR voxels/s, the convolutions' GFLOP/s (those run: the tiles'
and the hidden layers' blocks) and their fraction of the conv3d peak, and the share of them
the region needs (each of its voxels once per layer, after the receptive field's dilation).
``--kernels`` sets the networks' kernels (default 3 1 3, ``iqt-train``'s; the bundled model's
are 3 3 3).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

LR_SHAPE = (72, 87, 72)
R = 2


def layer_flops(kernels, r=R, widths=(50, 100), channels=6) -> list[float]:
    """Multiply-adds ×2 per output position of each layer of an ESPCN."""
    sizes = (channels, *widths, channels * r**3)
    return [2.0 * sizes[i] * sizes[i + 1] * k**3 for i, k in enumerate(kernels)]


def run_flops(info: dict, kernels) -> float:
    """The convolutions one network ran in a prediction (its ``info``): each hidden layer's
    blocks and the last layer's tiles, t³ output positions each."""
    per = layer_flops(kernels)
    counts = [*info["hidden_blocks"], info["tiles"]]
    return sum(f * n * info["tile"] ** 3 for f, n in zip(per, counts))


def needed_flops(mask, kernels) -> float:
    """The convolutions one network needs for the app's region (the brain dilated by the
    receptive field): each layer over the region dilated by what the layers after it add."""
    from scipy import ndimage

    from iqt_pipe.sr.inference import prediction_region

    region = prediction_region(mask, sum(k - 1 for k in kernels) // 2)
    total = 0.0
    for i, f in enumerate(layer_flops(kernels)):
        rest = sum(k - 1 for k in kernels[i + 1 :]) // 2
        total += f * (ndimage.maximum_filter(region, size=2 * rest + 1) if rest else region).sum()
    return float(total)


def synthetic_case():
    from iqt_pipe.dmri import dti

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in LR_SHAPE], indexing="ij"), -1)
    mask = (grid**2).sum(-1) <= (0.4 / (np.pi / 6)) ** (2 / 3)
    q, _ = np.linalg.qr(rng.normal(size=LR_SHAPE + (3, 3)))
    evals = np.broadcast_to(np.array([1.5e-3, 0.5e-3, 0.4e-3]), LR_SHAPE + (3,))
    return dti.tensors_from_eig(evals, q).astype(np.float32), mask


def conv3d_peak(device, precision: str = "float32") -> float:
    """GFLOP/s of a large 3³ conv3d (100 → 100 channels, channels_last_3d) in ``precision``."""
    dtype = getattr(torch, precision)
    conv = torch.nn.Conv3d(100, 100, 3).to(device, dtype).eval()
    x = torch.randn(1, 100, 40, 40, 40, device=device, dtype=dtype)
    if device.type == "cpu":
        conv, x = conv.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    flops = 2 * 100 * 100 * 27 * 38**3
    with torch.no_grad():
        conv(x)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            conv(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def run_case(variant: str, case: str, precision: str, device: str, threads: int, kernels) -> dict:
    import iqt_pipe.dmri.degrade  # noqa: F401
    import iqt_pipe.sr.baselines  # noqa: F401 - imports are not part of the timing
    from iqt_pipe.models import IQTNet
    from iqt_pipe.sr.inference import predict_brain, predict_patchwise
    from iqt_pipe.sr.options import SYMMETRIES

    torch.set_num_threads(threads)
    lr, mask = synthetic_case()
    torch.manual_seed(0)
    model = IQTNet(variant, R, kernels=kernels)
    dev = torch.device(device)

    def once():
        if case == "patchwise":
            return predict_patchwise(model, lr, mask, device=dev), {}
        T, scalars = {"deterministic": (1, 32), "network-only": (1, 0), "mc8": (8, 32), "mc32": (32, 32)}[case]
        # The app's call: the brain and its rim (the mask dilated by the receptive field).
        pred = predict_brain(
            model,
            lr,
            mask,
            np.eye(4),
            mc_samples=T,
            scalar_samples=scalars,
            device=dev,
            mem_mb=1024,
            precision=precision,
            symmetries=SYMMETRIES["mirrors"] if T > 1 else (0,),
        )
        return pred.mean, pred.info

    t0 = time.perf_counter()
    once()  # the first call also creates oneDNN's kernels for these shapes
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, info = once()
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(f"/tmp/iqt-bench-{variant}-{case}-{precision}.npy", mean)
    return {
        "variant": variant,
        "case": case,
        "precision": precision,
        "seconds": seconds,
        "cold_seconds": cold,
        "peak_mem_mb": peak_mb,
        "info": info,
        "hr_voxels_in_mask": int(mask.sum()) * R**3,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--json", help="also write one variant's figures here (conv3d_peak_fraction from its network-only pass)"
    )
    p.add_argument(
        "--json-variant",
        default="hetero-var2",
        help="the variant --json reports (default: hetero-var2, iqt-train's default)",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=["espcn", "hetero-var2"])
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="the network's arithmetic, each case in each (default: both; bfloat16 is the app's choice on "
        "CPUs with AMX)",
    )
    p.add_argument("--quick", action="store_true", help="skip T = 32")
    p.add_argument("--kernels", nargs=3, type=int, default=[3, 1, 3], help="the networks' kernels (default 3 1 3)")
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        print(json.dumps(run_case(*args._one, args.device, args.threads, tuple(args.kernels))))
        return

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peaks = {prec: conv3d_peak(device, prec) for prec in args.precisions}
    lr, mask = synthetic_case()
    kernels = tuple(args.kernels)
    needed = needed_flops(mask, kernels)
    print(
        f"box LR {LR_SHAPE} → HR {tuple(2 * s for s in LR_SHAPE)}, brain {mask.mean():.0%} of the box, "
        f"{args.threads} threads, device {args.device}, kernels {' '.join(map(str, kernels))}"
    )
    print(
        "conv3d peak: "
        + ", ".join(f"{peak:.0f} GFLOP/s ({prec})" for prec, peak in peaks.items())
        + f"; one ESPCN pass over the region needs {needed / 1e9:.0f} GFLOP"
    )
    print("seconds: second call in a fresh process (the first, in brackets, also creates oneDNN's kernels);")
    print(
        "deterministic: mean weights + 32 tensor samples per voxel for FA sd (hetero); network-only: no FA "
        "samples; mc8/mc32: Monte-Carlo weight samples, one test-time mirror each; 'of peak': of the conv3d peak "
        "in the same arithmetic; needed: the share of the convolutions run that the region needs"
    )
    print(
        f"{'variant':<12} {'case':<14} {'precision':<9} {'seconds':>8} {'(cold)':>8} {'HR vox/s':>10} "
        f"{'GFLOP/s':>8} {'of peak':>8} {'needed':>7} {'RSS MB':>7}"
    )
    results = {}
    cases = ["deterministic", "network-only", "mc8"] + ([] if args.quick else ["mc32"])
    runs = [(case, prec) for prec in args.precisions for case in cases] + [("patchwise", "float32")]
    for variant in args.variants:
        for case, prec in runs:
            if case in ("network-only", "mc8", "mc32") and "var" not in variant and not variant.startswith("hetero"):
                continue  # the same single deterministic pass as "deterministic"
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_one",
                    variant,
                    case,
                    prec,
                    "--threads",
                    str(args.threads),
                    "--device",
                    args.device,
                    "--kernels",
                    *map(str, kernels),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            # Convolutions run, once per network and pass (Monte-Carlo weight sample or mirror).
            nets = 2 if variant.startswith("hetero") else 1
            info = res["info"]
            ran = run_flops(info, kernels) if info else needed  # the patch loop: counted as needed
            passes = info.get("passes", 1) if info else 1
            res["gflops_per_s"] = ran * nets * passes / 1e9 / res["seconds"]
            res["conv3d_peak_fraction"] = res["gflops_per_s"] / peaks.get(prec, peaks[args.precisions[0]])
            res["needed_fraction"] = needed / ran
            results[(variant, case, prec)] = res
            print(
                f"{variant:<12} {case:<14} {prec:<9} {res['seconds']:8.2f} {res['cold_seconds']:8.2f} "
                f"{res['hr_voxels_in_mask'] / res['seconds']:10.3g} "
                f"{res['gflops_per_s']:8.0f} {res['conv3d_peak_fraction']:8.0%} {res['needed_fraction']:7.0%} "
                f"{res['peak_mem_mb']:7.0f}"
            )
        patchwise = np.load(f"/tmp/iqt-bench-{variant}-patchwise-float32.npy")
        inside = np.any(patchwise != 0, axis=-1)  # the patch loop predicts the brain mask only
        for prec in args.precisions:
            whole = np.load(f"/tmp/iqt-bench-{variant}-deterministic-{prec}.npy")
            diff = np.abs(whole[inside] - patchwise[inside])
            fastest = results.get((variant, "network-only", prec), results[(variant, "deterministic", prec)])
            print(
                f"  {variant}, {prec}: whole-volume vs patch-by-patch max |Δ| = {diff.max():.2e} "
                f"({diff.max() / np.abs(patchwise).max():.1e} of max, RMS {np.sqrt((diff**2).mean()):.1e}); "
                f"speed-up over it {results[(variant, 'patchwise', 'float32')]['seconds'] / fastest['seconds']:.2f}× "
                "(network-only pass)"
            )
    if args.json:
        v = args.json_variant if args.json_variant in args.variants else args.variants[-1]
        summary = {
            "variant": v,
            "conv3d_peak_gflops": peaks,
            "patchwise_s": results[(v, "patchwise", "float32")]["seconds"],
            "peak_mem_mb": max(r["peak_mem_mb"] for (var, _, _), r in results.items() if var == v),
        }
        for prec in args.precisions:
            d = {c: results[(v, c, prec)]["seconds"] for c in cases if (v, c, prec) in results}
            net_only = results.get((v, "network-only", prec), results[(v, "deterministic", prec)])
            summary[prec] = {
                "deterministic_s": d["deterministic"],
                "network_only_s": net_only["seconds"],
                "mc8_s": d.get("mc8"),
                "mc32_s": d.get("mc32"),
                "conv3d_peak_fraction": net_only["conv3d_peak_fraction"],
            }
        summary["all"] = {"/".join(key): r for key, r in results.items()}
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
