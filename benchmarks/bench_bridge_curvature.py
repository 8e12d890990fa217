"""Benchmark of the bridge's curvature code (ratios against references measured in the same run).

    python -m benchmarks.bench_bridge_curvature                      # tiny UNet on CPU (~1 min)
    python -m benchmarks.bench_bridge_curvature --sd --device cuda    # SD-v1.4-shaped UNet, K/V

Reports (1) seconds per HVP / seconds per gradient for each HVP method (issue 12 target: <= 2.0
for the default, ``graph-reuse``), its one-time graph build and the bytes its graphs hold;
(2) HVPs to reach both ends of the spectrum, top-5 each, to tol 1e-3: one Lanczos run vs two
eigsh calls vs deflated power iteration (PyHessian's method), each against a dense Hessian
(target <= 45 HVPs); (3) the determinism check's tolerance per dtype, its measured floor, and
the margin by which re-drawn noise and train-mode dropout exceed it; (4) peak memory.
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

GROUP_K128 = r"down_blocks\.0\..*attn2\.to_k\."
GROUP_KV256 = r"down_blocks\.0\..*attn2\.to_[kv]\."


def _loss(unet, group_spec, *, n, batch_size, seq, seed=0, noise_seed=None):
    from bridge.groups import select_group
    from bridge.loss import FrozenDiffusionLoss, make_probe_batches
    from bridge.tiny import tiny_scheduler

    ref = next(unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    size, chans = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(n, chans, size, size, generator=gen)
    cond = torch.randn(n, seq, unet.config.cross_attention_dim, generator=gen)
    batches = make_probe_batches(
        latents,
        cond,
        tiny_scheduler().alphas_cumprod,
        batch_size=batch_size,
        seed=seed if noise_seed is None else noise_seed,
    )
    batches = [b.to(ref.device, ref.dtype) for b in batches]
    return FrozenDiffusionLoss(unet, select_group(unet, group_spec), batches)


def _operator(loss, **kwargs):
    from bridge.curvature import HessianOperator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the attention fallback's notice
        return HessianOperator(loss, **kwargs)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _interleaved_medians(fns, device, rounds):
    """Median seconds of each callable, timed in turn within every round (after one warm-up).

    Interleaving keeps a change of machine load from favouring whichever was timed first.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def hvp_cost(loss, device, rounds=9):
    """Seconds per gradient and per HVP for each method, their ratios, and graph-reuse's memory."""
    from bridge.curvature import HVP_METHODS

    theta = loss.theta()
    v = torch.randn_like(theta)
    out = {"params": loss.numel, "batches": len(loss.batches)}
    ops = {
        m: _operator(loss, theta=theta, method=m, check_deterministic=False) for m in HVP_METHODS
    }
    for op in ops.values():  # engage the attention fallback once, outside the timings
        op @ v
    ops["graph-reuse"].release_graph()
    _sync(device)
    start = time.perf_counter()
    ops["graph-reuse"] @ v  # graph build + first product
    _sync(device)
    out["graph_build_and_first_hvp_s"] = time.perf_counter() - start
    out["graph_bytes"] = ops["graph-reuse"].graph_bytes
    fns = {"grad": lambda: loss.gradient(theta)}
    fns.update({m: (lambda op=op: op @ v) for m, op in ops.items()})
    medians = _interleaved_medians(fns, device, rounds)
    out["grad_s"] = medians["grad"]
    for method in HVP_METHODS:
        out[f"hvp_{method}_s"] = medians[method]
        out[f"ratio_{method}"] = medians[method] / medians["grad"]
    first, each = out["graph_build_and_first_hvp_s"], out["hvp_graph-reuse_s"]
    out["ratio_graph-reuse_amortised_30"] = (first + 29 * each) / 30 / out["grad_s"]
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


def _sin_theta(vecs, basis):
    return float(np.linalg.norm(vecs - basis @ (basis.T @ vecs), 2))


def spectrum_ends_count(loss, k=5, tol=1e-3, power=True):
    """HVPs for both ends, top-k each, to ``tol``: one Lanczos run vs two eigsh calls (vs power)."""
    from bridge.spectra import dense_hessian, spectrum_ends

    op = _operator(loss)
    dense = dense_hessian(op)
    w, u = np.linalg.eigh(dense)
    scale = np.abs(w).max()
    expected = np.concatenate([w[::-1][:k], w[:k][::-1]])
    top, bottom = u[:, ::-1][:, :k], u[:, :k][:, ::-1]
    out = {"params": int(op.shape[0]), "negative_eigenvalues": int((w < 0).sum())}
    for method in ("lanczos", "eigsh"):
        res = spectrum_ends(op, k, tol=tol, method=method)
        out[f"{method}_hvps"] = res.num_matvecs
        out[f"{method}_max_eig_err_rel"] = float(np.abs(res.eigenvalues - expected).max() / scale)
        out[f"{method}_max_sin_theta"] = max(
            _sin_theta(res.eigenvectors[:, :k], top), _sin_theta(res.eigenvectors[:, k:], bottom)
        )
    out["hvp_ratio_eigsh_over_lanczos"] = out["eigsh_hvps"] / out["lanczos_hvps"]
    if power:  # both ends by magnitude: what PyHessian would report as "top"
        vals, count = deflated_power_iteration(
            lambda x: (op @ torch.from_numpy(x).to(op.dtype)).double().numpy(), len(w), 2 * k
        )
        out["power_hvps"] = count
        out["power_max_eig_err_rel"] = float(
            np.abs(np.sort(vals)[::-1] - np.sort(expected)[::-1]).max() / scale
        )
    return out


def determinism_tolerances():
    """rtol per dtype, its measured floor, and how far real non-determinism lands above it."""
    from bridge.tiny import build_tiny_unet

    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        unet = build_tiny_unet(0, sample_size=8, dropout=0.1).to(dtype)
        loss = _loss(unet, GROUP_K128, n=2, batch_size=2, seq=8)
        op = _operator(loss)
        rep = op.determinism
        eps = float(torch.finfo(dtype).eps)
        v = torch.randn(loss.numel, generator=torch.Generator().manual_seed(1)).to(dtype)
        hv = op @ v
        scale = float(hv.abs().max())
        other = _loss(unet, GROUP_K128, n=2, batch_size=2, seq=8, noise_seed=1)  # new (t, eps)
        redrawn = _operator(other, check_deterministic=False) @ v
        unet.train()
        torch.manual_seed(0)
        dropout = op.fresh_product(v)
        unet.eval()
        name = str(dtype).removeprefix("torch.")
        out[name] = {
            "eps": eps,
            "noise_floor_over_eps": rep.noise_floor / eps,
            "hvp_rtol": rep.hvp_rtol,
            "hvp_rtol_over_eps": rep.hvp_rtol / eps,
            "old_rtol_1e3_eps": 1e3 * eps,
            "redrawn_noise_diff_over_rtol": float((redrawn - hv).abs().max())
            / scale
            / rep.hvp_rtol,
            "dropout_diff_over_rtol": float((dropout - hv).abs().max()) / scale / rep.hvp_rtol,
        }
    return out


def peak_memory(device):
    if torch.device(device).type == "cuda":
        return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def tiny_benchmark(power=True):
    from bridge.tiny import build_tiny_unet

    torch.set_num_threads(1)
    unet = build_tiny_unet(0)  # float32, sample 16x16, cross-attn K/V: 1,280 parameters
    cost = hvp_cost(_loss(unet, "cross-attn-kv", n=4, batch_size=2, seq=8), "cpu")
    small = build_tiny_unet(0, sample_size=8).double()
    k128 = spectrum_ends_count(_loss(small, GROUP_K128, n=2, batch_size=2, seq=8), power=power)
    kv256 = spectrum_ends_count(_loss(small, GROUP_KV256, n=8, batch_size=8, seq=8), power=power)
    return {
        "hvp_cost_tiny_f32_kv1280": cost,
        "ends_top5_tol1e-3_tiny_f64_k128": k128,
        "ends_top5_tol1e-3_tiny_f64_kv256": kv256,
        "determinism_tiny_k128": determinism_tolerances(),
        **peak_memory("cpu"),
    }


def sd_benchmark(device, dtype):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD14_UNET).to(device=device, dtype=dtype).eval()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = _loss(unet, "cross-attn-kv", n=1, batch_size=1, seq=77)
    cost = hvp_cost(loss, device, rounds=3)
    return {"device": device, "dtype": str(dtype), **cost, **peak_memory(device)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", action="store_true", help="SD-v1.4-shaped UNet, cross-attn K/V.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--no-power", action="store_true", help="skip deflated power iteration")
    args = parser.parse_args(argv)
    if args.sd:
        result = sd_benchmark(args.device, getattr(torch, args.dtype))
    else:
        result = tiny_benchmark(power=not args.no_power)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
