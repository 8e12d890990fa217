"""Benchmark of the bridge's curvature code (ratios against references measured in the same run).

    python -m benchmarks.bench_bridge_curvature                 # tiny UNet on CPU (~2 min)
    python -m benchmarks.bench_bridge_curvature --sd --device cuda   # SD-v1.4-shaped UNet, K/V

Reports (1) HVP time / gradient time per HVP method (target <= 3 for the default),
(2) HVPs for the top-5 eigenvalues to 1e-3 relative accuracy: Lanczos (eigsh) vs deflated power
iteration (PyHessian's method), both against a dense Hessian, (3) peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._sd14 import SD14_UNET_CONFIG as SD14_UNET  # noqa: E402


def _loss(unet, group_spec, *, n, batch_size, seq, seed=0):
    from bridge.groups import select_group
    from bridge.loss import FrozenDiffusionLoss, make_probe_batches
    from bridge.tiny import tiny_scheduler

    ref = next(unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    size, chans = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(n, chans, size, size, generator=gen)
    cond = torch.randn(n, seq, unet.config.cross_attention_dim, generator=gen)
    batches = make_probe_batches(
        latents, cond, tiny_scheduler().alphas_cumprod, batch_size=batch_size, seed=seed
    )
    batches = [b.to(ref.device, ref.dtype) for b in batches]
    return FrozenDiffusionLoss(unet, select_group(unet, group_spec), batches)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, repeats):
    fn()  # warm-up (also engages the attention fallback)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hvp_cost(loss, device, repeats=5):
    """Seconds per gradient and per HVP for each method, and the ratios."""
    from bridge.curvature import HVP_METHODS, HessianOperator

    theta = loss.theta()
    v = torch.randn_like(theta)
    out = {"grad_s": _median_time(lambda: loss.gradient(theta), device, repeats)}
    for method in HVP_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = HessianOperator(loss, theta, method=method, check_deterministic=False)
            out[f"hvp_{method}_s"] = _median_time(lambda op=op: op @ v, device, repeats)
        out[f"ratio_{method}"] = out[f"hvp_{method}_s"] / out["grad_s"]
    return out


def deflated_power_iteration(matvec, n, k, *, tol=1e-4, max_iter=200, seed=0):
    """PyHessian's power iteration with deflation (ranks by |lambda|); returns (vals, HVPs)."""
    rng = np.random.default_rng(seed)
    vals, vecs, count = [], [], 0
    for _ in range(k):
        v = rng.standard_normal(n)
        v /= np.linalg.norm(v)
        lam = None
        for _ in range(max_iter):
            for u in vecs:
                v -= (u @ v) * u
            hv = matvec(v)
            count += 1
            new = float(v @ hv)
            v = hv / np.linalg.norm(hv)
            if lam is not None and abs(new - lam) < tol * abs(lam):
                lam = new
                break
            lam = new
        vals.append(lam)
        vecs.append(v)
    return np.array(vals), count


def eigen_count(loss, k=5, rel=1e-3):
    """HVPs to get the top-k (largest algebraic) eigenvalues within ``rel``: Lanczos vs power."""
    from bridge.curvature import HessianOperator
    from bridge.spectra import dense_hessian, top_eigenpairs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(loss)
        dense = dense_hessian(op)
    w = np.linalg.eigvalsh(dense)
    top_la = w[::-1][:k]
    top_lm = w[np.argsort(-np.abs(w))][:k]
    scale = np.abs(w).max()
    lanczos = top_eigenpairs(op, k, which="LA", tol=rel)
    la_err = np.abs(lanczos.eigenvalues - top_la).max() / scale
    before = op.num_matvecs
    import scipy.sparse.linalg as sla

    lm_vals = sla.eigsh(
        op.to_scipy(np.float64),
        k=k,
        which="LM",
        tol=rel,
        v0=np.random.default_rng(0).standard_normal(op.shape[0]),
        return_eigenvectors=False,
    )
    lm_count = op.num_matvecs - before
    lm_err = np.abs(np.sort(lm_vals) - np.sort(top_lm)).max() / scale
    before = op.num_matvecs
    pw_vals, pw_count = deflated_power_iteration(
        lambda x: (op @ torch.from_numpy(x).to(op.dtype)).double().numpy(), op.shape[0], k
    )
    assert op.num_matvecs - before == pw_count
    pw_sorted = np.sort(pw_vals)[::-1]
    return {
        "group_size": int(op.shape[0]),
        "negative_eigenvalues": int((w < 0).sum()),
        "lanczos_hvps": lanczos.num_matvecs,
        "lanczos_max_rel_err_LA": float(la_err),
        "lanczos_hvps_LM": lm_count,
        "lanczos_max_rel_err_LM": float(lm_err),
        "power_hvps": pw_count,
        "power_max_rel_err_vs_LA": float(np.abs(pw_sorted - top_la).max() / scale),
        "power_max_rel_err_vs_magnitude": float(
            np.abs(np.sort(pw_vals) - np.sort(top_lm)).max() / scale
        ),
        "hvp_ratio_power_over_lanczos_LM": pw_count / lm_count,
    }


def peak_memory(device):
    if torch.device(device).type == "cuda":
        return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def tiny_benchmark():
    from bridge.tiny import build_tiny_unet

    torch.set_num_threads(1)
    unet = build_tiny_unet(0)  # float32, sample 16x16, cross-attn K/V: 1,280 parameters
    cost = hvp_cost(_loss(unet, "cross-attn-kv", n=4, batch_size=2, seq=8), "cpu")
    small = build_tiny_unet(0, sample_size=8).double()  # float64, one block's K/V: 256 parameters
    counts = eigen_count(
        _loss(small, r"down_blocks\.0\..*attn2\.to_[kv]\.", n=2, batch_size=2, seq=8)
    )
    return {"hvp_cost_tiny_f32_kv1280": cost, "top5_tiny_f64_kv256": counts, **peak_memory("cpu")}


def sd_benchmark(device, dtype):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD14_UNET).to(device=device, dtype=dtype).eval()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = _loss(unet, "cross-attn-kv", n=1, batch_size=1, seq=77)
    from bridge.curvature import HessianOperator

    theta = loss.theta()
    v = torch.randn_like(theta)
    grad_s = _median_time(lambda: loss.gradient(theta), device, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(loss, theta, check_deterministic=False)
        hvp_s = _median_time(lambda: op @ v, device, 3)
    return {
        "sd14_kv_params": loss.numel,
        "grad_s": grad_s,
        "hvp_s": hvp_s,
        "ratio": hvp_s / grad_s,
        "attention_fallback": op.attention_fallback,
        "device": device,
        "dtype": str(dtype),
        **peak_memory(device),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", action="store_true", help="SD-v1.4-shaped UNet, cross-attn K/V.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    args = parser.parse_args()
    if args.sd:
        result = sd_benchmark(args.device, getattr(torch, args.dtype))
    else:
        result = tiny_benchmark()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
