"""Sweep throughput: one jit(vmap) over 1000 configurations vs a straightforward NumPy loop.

Workload per configuration (identical in both implementations, checked to agree to 1e-8):
d=64, m=16, K=5 concepts, 5 noise levels; Bayes-optimal theta_0; V-only UCE erasing concept 0
(null anchor, other concepts retained, lambda=0.1); fine-tuning moments of the retained concepts;
block Hessian eigendecomposition; closed-form GD rho(T) at 5 step counts (the law with all
eigenpairs, which is exact for GD). The work is LAPACK-bound (5 eigh of 80x80 per configuration),
so jit/vmap can only remove the interpreter overhead around it.
Also times the whole default figure set (wall time and peak RSS, in a subprocess).

    python -m benchmarks.bench_sweep [--configs 1000] [--skip-figures] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import os

# Single-threaded BLAS for the NumPy reference: on small matrices OpenBLAS threads only add
# contention (measured 3x slower with 2 threads here), and JAX runs on one pool thread too.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import resource
import subprocess
import sys
import time

import numpy as np

D, M, K, L = 64, 16, 5, 5
STEPS = np.array([1, 10, 100, 1000, 10000])
RIDGE = 0.1


def make_inputs(n: int, seed: int = 0):
    """Random generators, covariances, unit embeddings and step sizes (NumPy, untimed)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, D, D)))
    spectrum = np.arange(1, D + 1) ** -1.0
    cov = np.einsum("nij,j,nkj->nik", q, spectrum, q)
    gen = rng.normal(size=(n, D, M)) / np.sqrt(M)
    emb = rng.normal(size=(n, M, K))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lr = rng.uniform(0.05, 0.5, size=n)
    return gen, cov, emb, lr


def _schedule():
    from theory.problem import make_noise_schedule

    s = make_noise_schedule(L)
    return np.asarray(s.alphas), np.asarray(s.sigmas), np.asarray(s.weights)


def numpy_reference(gen, cov, emb, lr):
    """The same computation, one configuration at a time, in NumPy."""
    a, s, w = _schedule()
    n_cfg = gen.shape[0]
    rho = np.empty((n_cfg, STEPS.size))
    for i in range(n_cfg):
        A, S, C = gen[i], cov[i], emb[i]
        theta0 = np.empty((L, D, D + M))
        for t in range(L):
            wt = s[t] * np.linalg.inv(a[t] ** 2 * S + s[t] ** 2 * np.eye(D))
            theta0[t] = np.concatenate([wt, -a[t] * wt @ A], axis=1)
        retained = C[:, 1:]
        gram = RIDGE * np.eye(M) + C @ C.T
        theta_u = theta0.copy()
        theta_u[:, :, D:] = (
            theta0[:, :, D:] @ (RIDGE * np.eye(M) + retained @ retained.T) @ np.linalg.inv(gram)
        )
        mu = A @ retained
        p = np.full(K - 1, 1.0 / (K - 1))
        mx = S + (mu * p) @ mu.T
        mxc = (mu * p) @ retained.T
        mc = (retained * p) @ retained.T
        delta = theta_u - theta0
        num = np.zeros(STEPS.size)
        for t in range(L):
            st = np.block(
                [[a[t] ** 2 * mx + s[t] ** 2 * np.eye(D), a[t] * mxc], [a[t] * mxc.T, mc]]
            )
            target = s[t] * np.eye(D, D + M)
            g = 2 * w[t] * (theta_u[t] @ st - target)
            lam, vec = np.linalg.eigh(2 * w[t] * st)
            gc, dc = g @ vec, delta[t] @ vec
            x = lr[i] * lam
            amp = np.where(
                np.abs(x) < 1e-7,
                lr[i] * STEPS[:, None],
                (1 - (1 - x) ** STEPS[:, None]) / np.where(lam == 0, 1, lam),
            )
            num += amp @ np.sum(gc * dc, axis=0)
        rho[i] = num / np.sum(delta**2)
    return rho


def jax_sweep(gen, cov, emb, lr):
    """One jit(vmap) over all configurations, through the package's theory functions."""
    import jax
    import jax.numpy as jnp

    import theory
    from theory.problem import LinearDiffusionProblem, make_noise_schedule

    schedule = make_noise_schedule(L)
    probs = jnp.asarray([0.0] + [1.0 / (K - 1)] * (K - 1))

    def one(A, S, C, eta):
        problem = LinearDiffusionProblem(A, S, C, schedule)
        theta0 = theory.bayes_optimal_denoiser(problem)
        retained = C * (probs > 0)
        gram = RIDGE * jnp.eye(M) + C @ C.T
        v_u = theta0[..., D:] @ (RIDGE * jnp.eye(M) + retained @ retained.T) @ jnp.linalg.inv(gram)
        theta_u = theta0.at[..., D:].set(v_u)
        data = theory.DataDistribution(C, A @ C, probs, jnp.zeros(()))
        setup = theory.finetune_setup(problem, data, theta_u, theta0)
        return theory.predicted_rho_closed_form(setup, eta, jnp.asarray(STEPS))

    # lax.map in batches of 125 configurations bounds the memory of the vmapped intermediates.
    fn = jax.jit(lambda *xs: jax.lax.map(lambda x: one(*x), xs, batch_size=125))
    args = [jnp.asarray(x) for x in (gen, cov, emb, lr)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return np.asarray(out), first, time.perf_counter() - t0


def figure_set():
    """Wall time and peak RSS of `make_all_figures` in a fresh process (cold runs/ folder)."""
    code = (
        "import time, resource, tempfile; t = time.perf_counter()\n"
        "from experiments.figures_main import make_all_figures\n"
        "d = tempfile.mkdtemp(); make_all_figures(d + '/figures', d + '/runs', progress=False)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall, rss = map(float, done.stdout.split()[-2:])
    return {"figures_wall_s": round(wall, 1), "figures_peak_rss_mb": round(rss)}


def main(argv=None):
    global D, M
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--skip-figures", action="store_true")
    parser.add_argument(
        "--dim", type=int, default=64, help="d (default 64); m = max(dim // 4, K + 1)"
    )
    args = parser.parse_args(argv)
    D, M = args.dim, max(args.dim // 4, K + 1)
    import jax

    jax.config.update("jax_enable_x64", True)
    from theory._backend import init_backend_without_lapack_deadlock

    init_backend_without_lapack_deadlock()
    inputs = make_inputs(args.configs)
    rho_jax, compile_and_run, run = jax_sweep(*inputs)
    t0 = time.perf_counter()
    rho_np = numpy_reference(*inputs)
    numpy_s = time.perf_counter() - t0
    err = float(np.abs(rho_jax - rho_np).max())
    report = {
        "configs": args.configs,
        "shape": {"d": D, "m": M, "K": K, "L": L, "steps": STEPS.tolist()},
        "numpy_loop_s": round(numpy_s, 3),
        "jax_first_call_s (compile+run)": round(compile_and_run, 3),
        "jax_run_s": round(run, 3),
        "speedup_run": round(numpy_s / run, 1),
        "speedup_including_compile": round(numpy_s / compile_and_run, 1),
        "configs_per_s_jax": round(args.configs / run),
        "max_abs_diff_rho": err,
        "peak_rss_mb_this_process": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }
    if not args.skip_figures:
        report.update(figure_set())
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
