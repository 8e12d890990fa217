"""Theory core speed: problem + pretraining + closed-form fine-tuning at d=256, m=64, 10 levels,
and `predict_rho` throughput on 10^5 random configurations (vmapped), each against NumPy.

Law throughput is counted in two units: configurations/s (one configuration = 64 eigenpairs x 5
step counts) and rho values/s (configurations x step counts: one rho(T) per configuration and T),
the unit of issue 12's reference (1.4e6/s: the kernel before the exactness fix, jit + vmap, with
JAX's default CPU client). It is measured twice: with the package's one-thread XLA pool
(:func:`theory._backend.init_backend_without_lapack_deadlock`, as the CLI runs) and, in a
subprocess, with JAX's default client (a pool thread a CPU), which reproduces that reference.

    python -m benchmarks.bench_theory [--configs 100000] [--law-only] [--jax-default-client]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# Single-threaded BLAS for the NumPy reference: on small matrices OpenBLAS threads only add
# contention (measured 3x slower with 2 threads here), and JAX runs on one pool thread too.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import time

import numpy as np


def _timed(fn, repeat=3):
    fn()  # compile / warm up
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def core_pipeline(dim=256, embed_dim=64, levels=10):
    """Seconds for each stage of the exact pipeline (jitted, after compilation)."""
    import jax
    import jax.numpy as jnp

    import theory

    key = jax.random.PRNGKey(0)
    k = 8
    t0 = time.perf_counter()
    problem = theory.make_problem(
        key, dim=dim, embed_dim=embed_dim, num_concepts=k, num_levels=levels
    )
    jax.block_until_ready(problem.covariance)
    make_s = time.perf_counter() - t0
    pre = theory.concept_distribution(problem, np.full(k, 1.0 / k))
    ft = theory.concept_distribution(problem, np.r_[0.0, np.full(k - 1, 1.0 / (k - 1))])
    steps = jnp.asarray([1, 10, 100, 1000])
    pretrain = jax.jit(theory.pretrain_closed_form)
    theta0 = pretrain(problem, pre)
    theta_u = theta0.at[..., dim:].multiply(0.9)

    @jax.jit
    def finetune(problem, ft, theta_u, theta0):
        setup = theory.finetune_setup(problem, ft, theta_u, theta0)
        return theory.gd_closed_form(setup, theta_u, 0.1, steps), theory.predicted_rho_closed_form(
            setup, 0.1, steps
        )

    pre_s = _timed(lambda: jax.block_until_ready(pretrain(problem, pre)))
    ft_s = _timed(lambda: jax.block_until_ready(finetune(problem, ft, theta_u, theta0)))
    # NumPy reference for the fine-tuning stage: moments, eigh per level, closed-form GD.
    sched = problem.schedule
    moments = np.asarray(theory.second_moments(problem, ft))
    w, th_u = np.asarray(sched.weights), np.asarray(theta_u)
    target = np.asarray(theory.target_moments(sched, dim, embed_dim))

    def numpy_ft():
        out = []
        for t in range(levels):
            lam, vec = np.linalg.eigh(2 * w[t] * moments[t])
            g = 2 * w[t] * (th_u[t] @ moments[t] - target[t]) @ vec
            amp = (1 - (1 - 0.1 * lam) ** np.asarray(steps)[:, None]) / lam
            out.append(th_u[t][None] - (amp[:, None, :] * g[None]) @ vec.T)
        return out

    np_s = _timed(numpy_ft)
    return {
        "shape": {
            "d": dim,
            "m": embed_dim,
            "L": levels,
            "params": levels * dim * (dim + embed_dim),
        },
        "make_problem_s (eager, incl. first-call compile)": round(make_s, 3),
        "pretrain_closed_form_s": round(pre_s, 4),
        "finetune_setup+gd_closed_form+law_s": round(ft_s, 4),
        "numpy_finetune_s": round(np_s, 4),
        "finetune_speedup_vs_numpy": round(np_s / ft_s, 2),
    }


def law_throughput(n_configs=100_000, n_eig=64, n_steps=5):
    """`predict_rho` throughput, vmapped, vs a NumPy loop over 2,000 configs (units: module doc)."""
    import jax
    import jax.numpy as jnp

    from theory import predict_rho

    rng = np.random.default_rng(0)
    lam = rng.uniform(0, 2, (n_configs, n_eig))
    g = rng.normal(size=(n_configs, n_eig))
    d = rng.normal(size=(n_configs, n_eig))
    lr = rng.uniform(0.01, 0.9, n_configs)
    steps = jnp.asarray([1, 10, 100, 1000, 10000][:n_steps])
    fn = jax.jit(jax.vmap(lambda a, b, c, e: predict_rho(a, b, c, e, steps)))
    args = [jnp.asarray(x) for x in (lam, g, d, lr)]
    run_s = _timed(lambda: jax.block_until_ready(fn(*args)))
    n_ref = 2000

    def numpy_loop():
        for i in range(n_ref):
            amp = (1 - (1 - lr[i] * lam[i]) ** np.asarray(steps)[:, None]) / lam[i]
            (amp * g[i] * d[i]).sum(-1) / (d[i] ** 2).sum()

    ref_s = _timed(numpy_loop, repeat=1)

    # The kernel before the exactness fix, (1 - (1 - eta lambda)^T) / lambda (cancels as
    # eta lambda -> 0): the same jit + vmap, so the ratio says what exactness cost on this machine.
    def pre_fix(lam_i, g_i, d_i, lr_i):
        amp = (1 - (1 - lr_i * lam_i) ** steps[:, None].astype(lam_i.dtype)) / lam_i
        return (amp * g_i * d_i).sum(-1) / (d_i**2).sum()

    pre_fn = jax.jit(jax.vmap(pre_fix))
    pre_s = _timed(lambda: jax.block_until_ready(pre_fn(*args)))
    # The same exact law with the step counts traced (a jit argument): the expm1/log1p form,
    # which the binary powering chain replaces wherever the step counts are known when tracing.
    traced_fn = jax.jit(jax.vmap(predict_rho, in_axes=(0, 0, 0, 0, None)))
    traced_s = _timed(lambda: jax.block_until_ready(traced_fn(*args, steps)))
    # The memory floor: one pass over the inputs (a weighted sum), no kernel at all.
    read_fn = jax.jit(lambda a, b, c, e: jnp.sum(a * b * c, axis=-1) * e)
    read_s = _timed(lambda: jax.block_until_ready(read_fn(*args)))
    return {
        "configs": n_configs,
        "eigenpairs_per_config": n_eig,
        "steps_per_config": n_steps,
        "jax_s": round(run_s, 4),
        "rho_values_per_s_jax": round(n_configs * n_steps / run_s),
        "rho_values_per_s_pre_fix_kernel": round(n_configs * n_steps / pre_s),
        "configurations_per_s_jax": round(n_configs / run_s),
        "configurations_per_s_numpy_loop": round(n_ref / ref_s),
        "configurations_per_s_pre_fix_kernel": round(n_configs / pre_s),
        "exact_over_pre_fix_throughput": round(pre_s / run_s, 2),
        "configurations_per_s_expm1_form": round(n_configs / traced_s),
        "chain_over_expm1_form_throughput": round(traced_s / run_s, 2),
        "configurations_per_s_input_read": round(n_configs / read_s),
        "speedup": round((n_configs / run_s) / (n_ref / ref_s), 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=100_000)
    parser.add_argument("--law-only", action="store_true", help="only the predict_rho throughput")
    parser.add_argument(
        "--jax-default-client",
        action="store_true",
        help="keep JAX's default CPU client (a pool thread a CPU) instead of the package's "
        "one-thread pool",
    )
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    if not args.jax_default_client:
        from theory._backend import init_backend_without_lapack_deadlock

        init_backend_without_lapack_deadlock()
    report = {} if args.law_only else {"pipeline": core_pipeline()}
    report["predict_rho"] = law_throughput(args.configs)
    if not args.law_only and not args.jax_default_client:
        report["predict_rho_jax_default_client"] = _default_client_law(args.configs)
    print(json.dumps(report, indent=2))
    return report


def _default_client_law(n_configs: int) -> dict:
    """The law throughput with JAX's default client, in a fresh process (the client is made once
    per process, so this one cannot switch)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_theory", "--law-only", "--jax-default-client"]
    done = subprocess.run(
        [*cmd, "--configs", str(n_configs)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout[done.stdout.index("{") :])["predict_rho"]


if __name__ == "__main__":
    main()
