"""The GPU check of issue 12 (item 5): one run, one JSON line on stdout. Run it through gpu_check.sh.

On a UNet of Stable Diffusion v1.4's size with random weights (benchmarks/_sd14.py; nothing is
downloaded), for bfloat16 and float32 weights:
- seconds per gradient of the frozen diffusion loss over cross-attention K/V (default attention
  kernels, and the math SDPA kernel the HVPs fall back to) and per HVP for ``graph-reuse`` and
  ``double-backward``, with their ratios and the bytes graph-reuse retains;
- the determinism check's report (differences, measured floor, tolerance) or its message;
- Lanczos, top-20 at each end of the K/V spectrum (HVPs, wall time, peak memory);
- one UCE edit of all 32 K/V matrices (bridge.unlearn.apply_uce);
- one AdamW fine-tuning step: batch 4, 64x64 latents, 77-token conditioning, bf16 autocast,
  gradient checkpointing;
- peak memory per section and overall.

Each section is timed against a budget (``--budget-s``) and records its error instead of
stopping the run, so the line always comes out. ``--tiny`` runs the same sections on the tiny
CPU UNet in seconds (the smoke test of this script).

    benchmarks/gpu_check.sh                  # SD v1.4 size, CUDA, under 8 minutes
    benchmarks/gpu_check.sh --tiny           # tiny UNet on CPU, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._sd14 import SD14_UNET_CONFIG  # noqa: E402


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Check:
    """Wall-clock budget, device synchronisation and peak memory of one run."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.deadline = device, time.perf_counter() + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS

    def time(self, fn, repeats: int = 3) -> float:
        """Median seconds of ``fn`` after one warm-up call."""
        fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def section(self, out: dict, name: str, fn, *, min_left_s: float = 20.0) -> None:
        """Run one section into ``out[name]``: its numbers, or the error / the skip reason."""
        if self.left() < min_left_s:
            out[name] = {"skipped": f"time budget ({self.left():.0f} s left)"}
            return
        _log(f"{name} ({self.left():.0f} s left)")
        self.reset_peak()
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                result = fn()
            result["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in seen})
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
            result = {
                "error": f"{type(err).__name__}: {str(err)[:600]}",
                "where": traceback.format_exc(limit=-3)[-800:],
            }
        result["section_wall_s"] = round(time.perf_counter() - start, 3)
        result["section_peak_mib"] = round(self.peak_mib(), 1)
        out[name] = result


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from bridge.tiny import tiny_unet_config

    config = tiny_unet_config() if tiny else SD14_UNET_CONFIG
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype).eval()


def probe_loss(unet, *, batch: int, seq: int, seed: int = 0):
    """Frozen diffusion loss over cross-attention K/V on random latents and conditioning."""
    from bridge.groups import select_group
    from bridge.loss import FrozenDiffusionLoss, make_probe_batches
    from bridge.tiny import tiny_scheduler

    ref = next(unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    size, chans = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(batch, chans, size, size, generator=gen)
    cond = torch.randn(batch, seq, unet.config.cross_attention_dim, generator=gen)
    batches = make_probe_batches(
        latents, cond, tiny_scheduler().alphas_cumprod, batch_size=batch, seed=seed
    )
    batches = [b.to(ref.device, ref.dtype) for b in batches]
    return FrozenDiffusionLoss(unet, select_group(unet, "cross-attn-kv"), batches)


def curvature(check: Check, loss, *, top_k: int, tol: float) -> dict:
    """Gradient and HVP timings, the determinism report, and Lanczos at both ends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bridge.curvature import HessianOperator, NonDeterministicError
    from bridge.spectra import spectrum_ends

    out: dict = {"params": loss.numel}
    theta = loss.theta()
    v = torch.randn(loss.numel, generator=torch.Generator().manual_seed(1)).to(theta)
    out["grad_s"] = check.time(lambda: loss.gradient(theta))
    with sdpa_kernel(SDPBackend.MATH):
        out["grad_math_sdpa_s"] = check.time(lambda: loss.gradient(theta))
    try:
        op = HessianOperator(loss, theta)
        out["determinism"] = vars(op.determinism)
    except NonDeterministicError as err:
        out["determinism"] = {"failed": str(err)[:900]}
        op = HessianOperator(loss, theta, check_deterministic=False)
    out["attention_fallback"] = op.attention_fallback
    out["graph_bytes"] = op.graph_bytes
    out["hvp_graph-reuse_s"] = check.time(lambda: op @ v)
    double = HessianOperator(loss, theta, method="double-backward", check_deterministic=False)
    out["hvp_double-backward_s"] = check.time(lambda: double @ v)  # retains no graph
    for name in ("graph-reuse", "double-backward"):
        out[f"ratio_{name}"] = out[f"hvp_{name}_s"] / out["grad_s"]
        out[f"ratio_{name}_vs_math_grad"] = out[f"hvp_{name}_s"] / out["grad_math_sdpa_s"]
    check.reset_peak()
    # Lanczos budget: what fits in 40 % of the time left at the measured cost per product.
    budget = max(3 * top_k, min(600, int(0.4 * check.left() / out["hvp_graph-reuse_s"])))
    start = time.perf_counter()
    ends = spectrum_ends(op, top_k, tol=tol, max_matvecs=budget)
    check.sync()
    scale = float(abs(ends.eigenvalues).max())
    out["lanczos"] = {
        "top_k_per_end": top_k,
        "tol": tol,
        "tol_effective": max(tol, 4 * float(torch.finfo(op.dtype).eps)),  # the dtype's floor
        "hvps": ends.num_matvecs,
        "max_matvecs": budget,
        "converged": ends.converged,
        "wall_s": time.perf_counter() - start,
        "peak_mib": check.peak_mib(),
        "max_residual_rel": float(ends.residual_norms.max()) / scale,
        "eigenvalues_top": ends.eigenvalues[:3].tolist(),
        "eigenvalues_bottom": ends.eigenvalues[-3:].tolist(),
    }
    op.release_graph()
    return out


def uce_edit(check: Check, unet) -> dict:
    from bridge.unlearn import UCEConcepts, apply_uce

    d = unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    seq = 77 if d == 768 else 8
    concepts = UCEConcepts(  # one erased prompt, its anchor, ten preserved prompts
        torch.randn(seq, d, generator=gen, dtype=torch.float64),
        torch.randn(seq, d, generator=gen, dtype=torch.float64),
        torch.randn(10 * seq, d, generator=gen, dtype=torch.float64),
    )
    edited = []

    def edit():
        edited[:] = [apply_uce(unet, concepts)]
        check.sync()

    seconds = check.time(edit, repeats=2)
    changed = sum(
        int(not torch.equal(a, b))
        for (name, a), b in zip(unet.named_parameters(), edited[0].parameters(), strict=True)
        if "attn2.to_" in name
    )
    return {"uce_edit_s": seconds, "matrices_changed": changed}


def finetune_step(check: Check, unet, *, batch: int, seq: int) -> dict:
    """Seconds per AdamW step with bf16 autocast and gradient checkpointing."""
    unet.train()
    unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    ref = next(unet.parameters())
    gen = torch.Generator().manual_seed(0)
    size, chans = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(batch, chans, size, size, generator=gen).to(ref)
    eps = torch.randn(batch, chans, size, size, generator=gen).to(ref)
    cond = torch.randn(batch, seq, unet.config.cross_attention_dim, generator=gen).to(ref)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(ref.device)
    losses = []

    def step():
        with torch.autocast(check.device.type, dtype=torch.bfloat16):
            pred = unet(x, t, encoder_hidden_states=cond).sample
        loss = ((pred.float() - eps.float()) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    seconds = check.time(step, repeats=3)
    unet.disable_gradient_checkpointing()
    unet.eval()
    return {"batch": batch, "latent": f"{size}x{size}", "step_s": seconds, "loss": losses[-1]}


def run(tiny: bool, device: torch.device, budget_s: float) -> dict:
    import diffusers

    check = Check(device, budget_s)
    report: dict = {
        "mode": "tiny" if tiny else "sd14",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    seq = 8 if tiny else 77
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        out: dict = {}
        unet = build_unet(tiny, device, dtype)
        out["unet_parameters"] = sum(p.numel() for p in unet.parameters())
        loss = probe_loss(unet, batch=1, seq=seq)
        check.section(
            out,
            "curvature",
            lambda loss=loss: curvature(check, loss, top_k=5 if tiny else 20, tol=1e-3),
            min_left_s=60,
        )
        del loss
        check.section(out, "uce", lambda unet=unet: uce_edit(check, unet))
        check.section(
            out, "finetune", lambda unet=unet: finetune_step(check, unet, batch=4, seq=seq)
        )
        report[name] = out
        del unet
        check.reset_peak()
    report["wall_s"] = round(budget_s - check.left(), 1)
    report["peak_mib_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget")
    args = parser.parse_args(argv)
    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    )
    if args.tiny:
        torch.set_num_threads(1)  # seconds-long on one core; leaves the others alone
    report = run(args.tiny, device, args.budget_s)
    print(json.dumps(report, separators=(",", ":"), default=float))
    return report


if __name__ == "__main__":
    main()
