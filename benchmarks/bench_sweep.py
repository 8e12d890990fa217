"""Sweep throughput (issue 12): no wasted work, measured against references in the same run.

Workload per configuration (identical in the NumPy and JAX implementations, checked to agree to
1e-8): d=64, m=16, K=5 concepts, 5 noise levels; Bayes-optimal theta_0; V-only UCE erasing
concept 0 (null anchor, other concepts retained, lambda=0.1); fine-tuning moments of the retained
concepts; block Hessian eigendecomposition (5 eigh of 80x80); closed-form GD rho(T) at 5 step
counts (the law with all eigenpairs, exact for GD).

* ``lr_grid``: configurations = P fixed problems x R learning rates. The NumPy loop redoes every
  configuration; the JAX sweep prepares each problem once (theta_0, unlearning, eigh) and
  evaluates the law for every (lr, T) from it, as :func:`theory.sweep.run_grid` does. Target:
  >= 30x the NumPy loop.
* ``problem_axes``: every configuration a distinct problem (nothing to share), against the
  eigendecompositions alone (the same batched LAPACK eigh on the same Hessian blocks): the LAPACK
  floor. Target: floor / sweep >= 0.8. The report also splits the sweep into its stages
  (theta_0's inverses, unlearning + moments, eigh, gradient + coordinates + law) and gives the
  ratio to all of its LAPACK work (eigh + theta_0's inverses).
* ``engine``: the sweep engine itself (:func:`theory.sweep.run_grid`, all observables, d=12 m=8,
  the default figure sizes): time per configuration of an 8-method grid (8 compiled variants) vs
  single-method grids (one method's unlearning per configuration: the ratio to their mean is ~1),
  vs the pre-issue-12 kernel that ran all 8 methods for every configuration (if
  tests/theory/test_sweep_equivalence.py is importable); and of an lr grid vs one lr.

Also times the whole default figure set (wall time and peak RSS, in a subprocess).

    python -m benchmarks.bench_sweep [--configs 1000] [--lrs 50] [--skip-figures] [--skip-engine]
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
import tempfile
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

    prepare = _prepared()

    def one(A, S, C, eta):
        return theory.predicted_rho_closed_form(prepare(A, S, C), eta, jnp.asarray(STEPS))

    fn = _mapped(one)
    args = [jnp.asarray(x) for x in (gen, cov, emb, lr)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return np.asarray(out), first, time.perf_counter() - t0


def _best(fn, repeat=2):
    """(first call s (compile + run), best later call s, last result)."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def _mapped(one):
    """jit of ``one`` over the configurations' leading axis; lax.map in batches of 125
    configurations bounds the memory of the vmapped intermediates."""
    import jax

    return jax.jit(lambda *xs: jax.lax.map(lambda x: one(*x), xs, batch_size=125))


def _unlearned(A, S, C):
    """The bench workload up to the unlearning, for one configuration: (problem, fine-tuning
    data, theta_0, theta_u)."""
    import jax.numpy as jnp

    import theory
    from theory.problem import LinearDiffusionProblem, make_noise_schedule

    probs = jnp.asarray([0.0] + [1.0 / (K - 1)] * (K - 1))
    problem = LinearDiffusionProblem(A, S, C, make_noise_schedule(L))
    theta0 = theory.bayes_optimal_denoiser(problem)
    retained = C * (probs > 0)
    gram = RIDGE * jnp.eye(M) + C @ C.T
    v_u = theta0[..., D:] @ (RIDGE * jnp.eye(M) + retained @ retained.T) @ jnp.linalg.inv(gram)
    theta_u = theta0.at[..., D:].set(v_u)
    data = theory.DataDistribution(C, A @ C, probs, jnp.zeros(()))
    return problem, data, theta0, theta_u


def _prepared():
    """The bench workload split as the sweep engine splits it: problem work, then the law."""
    import theory

    def prepare(A, S, C):
        problem, data, theta0, theta_u = _unlearned(A, S, C)
        return theory.finetune_setup(problem, data, theta_u, theta0)

    return prepare


def jax_lr_grid(gen, cov, emb, lrs):
    """P problems x R learning rates: each problem prepared once, the law vmapped over lr."""
    import jax
    import jax.numpy as jnp

    import theory

    prepare = _prepared()
    steps = jnp.asarray(STEPS)

    def one(A, S, C):
        setup = prepare(A, S, C)
        return jax.vmap(lambda eta: theory.predicted_rho_closed_form(setup, eta, steps))(lrs)

    fn = _mapped(one)
    args = [jnp.asarray(x) for x in (gen, cov, emb)]
    first, run, out = _best(lambda: fn(*args))
    return np.asarray(out), first, run


def eigh_floor(gen, cov, emb):
    """Seconds of the eigendecompositions alone: the same batched eigh on the same Hessian blocks
    (built untimed), in the same lax.map batches as the sweep."""
    import jax.numpy as jnp

    from theory.problem import make_noise_schedule

    prepare = _prepared()
    w = make_noise_schedule(L).weights
    blocks = _mapped(lambda A, S, C: 2 * w[:, None, None] * prepare(A, S, C).moments)(
        *(jnp.asarray(x) for x in (gen, cov, emb))
    )
    fn = _mapped(jnp.linalg.eigh)
    _, run, _ = _best(lambda: fn(blocks))
    return run


def stage_seconds(gen, cov, emb):
    """Where the problem-axes sweep's time goes: each stage as the difference of two programs,
    the sweep cut after that stage and after the one before (same lax.map batches). theta_0's
    5 SPD inverses of d x d are LAPACK work the eigh-only floor leaves out."""
    import jax.numpy as jnp

    import theory
    from theory.problem import LinearDiffusionProblem, make_noise_schedule

    def cut(stage):
        def one(A, S, C):
            if stage == "theta_0":
                problem = LinearDiffusionProblem(A, S, C, make_noise_schedule(L))
                return jnp.sum(theory.bayes_optimal_denoiser(problem))
            problem, data, _, theta_u = _unlearned(A, S, C)
            moments = theory.second_moments(problem, data)
            if stage == "unlearning+moments":
                return jnp.sum(moments) + jnp.sum(theta_u)
            eigen = theory.hessian_eigen(moments, problem.schedule)
            return jnp.sum(eigen.eigenvalues) + jnp.sum(eigen.eigenvectors) + jnp.sum(theta_u)

        return _mapped(one)

    args = [jnp.asarray(x) for x in (gen, cov, emb)]
    upto = {
        stage: _best(lambda f=cut(stage): f(*args))[1]
        for stage in ("theta_0", "unlearning+moments", "eigh")
    }
    return {
        "theta_0 (SPD inverses)": upto["theta_0"],
        "unlearning+moments": upto["unlearning+moments"] - upto["theta_0"],
        "eigh": upto["eigh"] - upto["unlearning+moments"],
        "upto_eigh": upto["eigh"],
    }


def numpy_factored(gen, cov, emb, lrs):
    """The NumPy loop over P problems, each eigh once, every lr from it (an extra reference)."""
    a, s, w = _schedule()
    out = np.empty((gen.shape[0], lrs.size, STEPS.size))
    for i in range(gen.shape[0]):
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
        mx, mxc, mc = S + (mu * p) @ mu.T, (mu * p) @ retained.T, (retained * p) @ retained.T
        delta = theta_u - theta0
        lam_all, gd_all = [], []
        for t in range(L):
            st = np.block(
                [[a[t] ** 2 * mx + s[t] ** 2 * np.eye(D), a[t] * mxc], [a[t] * mxc.T, mc]]
            )
            g = 2 * w[t] * (theta_u[t] @ st - s[t] * np.eye(D, D + M))
            lam, vec = np.linalg.eigh(2 * w[t] * st)
            lam_all.append(lam)
            gd_all.append(np.sum((g @ vec) * (delta[t] @ vec), axis=0))
        lam, gd = np.concatenate(lam_all), np.concatenate(gd_all)
        for r, eta in enumerate(lrs):
            amp = (1 - (1 - eta * lam) ** STEPS[:, None]) / np.where(lam == 0, 1, lam)
            amp = np.where(np.abs(eta * lam) < 1e-7, eta * STEPS[:, None], amp)
            out[i, r] = amp @ gd / np.sum(delta**2)
    return out


ENGINE_METHODS = ("uce", "mace", "esd_x", "esd_u", "sdd", "salun", "scissorhands", "erasediff")
ENGINE_SIZES = {"dim": 12, "embed_dim": 8, "num_concepts": 5, "num_levels": 6}


def engine(problems: int, lrs: int):
    """The sweep engine (all observables): per-configuration seconds of method and lr grids."""
    import jax
    import jax.numpy as jnp

    from theory.sweep import DYNAMIC_KNOBS, PROBLEM_KNOBS, ScenarioStatic, run_grid

    fixed = {"finetune": "new_concepts", "steps": (0, 300), "truncation_ranks": (1,)}
    knobs = {k: jnp.full(problems, DYNAMIC_KNOBS[k], jnp.float64) for k in PROBLEM_KNOBS}
    knobs["seed"] = jnp.arange(problems)
    lr1 = jnp.asarray([0.3])

    def grid(method, lr_values):
        static = ScenarioStatic(**ENGINE_SIZES, **fixed, method=method)
        fn = jax.jit(lambda k, lr: run_grid(static, k, lr))
        first, run, _ = _best(lambda: fn(knobs, lr_values), repeat=1)
        return first, run / (problems * lr_values.size)

    per_method = {m: grid(m, lr1) for m in ENGINE_METHODS}
    # the 8-method grid is the 8 variants, P configurations each, run one after the other
    new8 = float(np.mean([v[1] for v in per_method.values()]))
    lr_grid = jnp.linspace(0.01, 0.3, lrs)
    _, uce_lr = grid("uce", lr_grid)
    report = {
        "problems": problems,
        "new_8method_grid_per_config_s": new8,
        "new_1method_grid_per_config_s": {m: round(v[1], 6) for m, v in per_method.items()},
        "new_8method_compile_s_total": round(
            sum(v[0] - v[1] * problems for v in per_method.values()), 1
        ),
        "uce_1lr_per_config_s": per_method["uce"][1],
        f"uce_{lrs}lr_per_config_s": uce_lr,
        "lr_grid_speedup_per_config": round(per_method["uce"][1] / uce_lr, 2),
    }
    try:  # the pre-issue-12 kernel, kept as the reference of the equivalence test
        from tests.theory import test_sweep_equivalence as old
    except ImportError:
        return report
    for tag, methods in (("8method", ENGINE_METHODS), ("1method", ("uce",))):
        static = old.ScenarioStatic(**ENGINE_SIZES, **fixed, methods=methods)
        n = problems * len(methods)
        cfg = {k: jnp.full(n, v, jnp.float64) for k, v in old.DYNAMIC_KNOBS.items()}
        cfg.update(
            seed=jnp.tile(jnp.arange(problems), len(methods)),
            lr=jnp.full(n, 0.3),
            method_index=jnp.repeat(jnp.arange(len(methods)), problems),
            optimizer_index=jnp.zeros(n, int),
            num_erased_index=jnp.zeros(n, int),
        )
        fn = jax.jit(jax.vmap(lambda k, static=static: old.run_scenario(static, k)))
        _, run, _ = _best(lambda fn=fn, cfg=cfg: fn(cfg), repeat=1)
        report[f"old_{tag}_grid_per_config_s"] = run / n
    old8 = report["old_8method_grid_per_config_s"]
    report["old_over_new_8method_per_config"] = round(old8 / new8, 2)
    report["old_8method_over_old_1method"] = round(
        report["old_8method_grid_per_config_s"] / report["old_1method_grid_per_config_s"], 2
    )
    return report


def figure_set():
    """Wall time and peak RSS of `make_all_figures` in fresh processes with an empty JAX compile
    cache and runs/ folder (cold, as a new machine): with the default jobs (one a CPU) and,
    as the reference in the same run, with one job."""
    from experiments.figures_main import default_jobs

    code = (
        "import sys, time, resource, tempfile; t = time.perf_counter()\n"
        "from experiments.figures_main import make_all_figures\n"
        "d = tempfile.mkdtemp()\n"
        "make_all_figures(d + '/figures', d + '/runs', jobs=int(sys.argv[1]), progress=False)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = {"figures_jobs": default_jobs()}
    for jobs, key in ((default_jobs(), "figures_wall_s"), (1, "figures_wall_s_jobs1")):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "RESURGENCE_JAX_CACHE": cache}
            done = subprocess.run([sys.executable, "-c", code, str(jobs)], capture_output=True,
                                  text=True, check=True, env=env)  # fmt: skip
        wall, rss = map(float, done.stdout.split()[-2:])
        out[key] = round(wall, 1)
        if jobs == default_jobs():
            out["figures_peak_rss_mb"] = round(rss)  # the parent's; workers have their own
    return out


def main(argv=None):
    global D, M
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--lrs", type=int, default=50, help="learning rates of the lr grid")
    parser.add_argument("--engine-problems", type=int, default=32)
    parser.add_argument("--skip-figures", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument(
        "--dim", type=int, default=64, help="d (default 64); m = max(dim // 4, K + 1)"
    )
    args = parser.parse_args(argv)
    D, M = args.dim, max(args.dim // 4, K + 1)
    import jax

    jax.config.update("jax_enable_x64", True)
    from theory._backend import init_backend_without_lapack_deadlock

    init_backend_without_lapack_deadlock()
    load_start = os.getloadavg()
    # problem_axes: every configuration its own problem
    inputs = make_inputs(args.configs)
    rho_jax, compile_and_run, run = jax_sweep(*inputs)
    floor = eigh_floor(*inputs[:3])
    stages = stage_seconds(*inputs[:3])
    t0 = time.perf_counter()
    rho_np = numpy_reference(*inputs)
    numpy_s = time.perf_counter() - t0
    err = float(np.abs(rho_jax - rho_np).max())
    # lr_grid: P fixed problems x R learning rates, the same number of configurations
    n_lr = min(args.lrs, args.configs)
    n_prob = max(1, args.configs // n_lr)
    gen, cov, emb, _ = make_inputs(n_prob, seed=1)
    lrs = np.linspace(0.05, 0.5, n_lr)
    rho_grid, grid_first, grid_run = jax_lr_grid(gen, cov, emb, lrs)
    rep = lambda x: np.repeat(x, n_lr, axis=0)  # noqa: E731 (configuration order: problem-major)
    t0 = time.perf_counter()
    rho_grid_np = numpy_reference(rep(gen), rep(cov), rep(emb), np.tile(lrs, n_prob))
    grid_numpy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rho_grid_np2 = numpy_factored(gen, cov, emb, lrs)
    grid_numpy_factored_s = time.perf_counter() - t0
    grid_err = max(
        float(np.abs(rho_grid.reshape(-1, STEPS.size) - rho_grid_np).max()),
        float(np.abs(rho_grid - rho_grid_np2).max()),
    )
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
        "problem_axes": {
            "sweep_s": round(run, 3),
            "eigh_floor_s": round(floor, 3),
            "floor_over_sweep": round(floor / run, 3),
            "stages_s": {
                "theta_0 (SPD inverses)": round(stages["theta_0 (SPD inverses)"], 3),
                "unlearning+moments": round(stages["unlearning+moments"], 3),
                "eigh": round(stages["eigh"], 3),
                "gradient+coordinates+law": round(run - stages["upto_eigh"], 3),
            },
            # the LAPACK work of the workload: the eigh floor and theta_0's inverses
            "lapack_floor_s": round(floor + stages["theta_0 (SPD inverses)"], 3),
            "lapack_floor_over_sweep": round((floor + stages["theta_0 (SPD inverses)"]) / run, 3),
        },
        "lr_grid": {
            "problems": n_prob,
            "lrs": n_lr,
            "numpy_loop_s": round(grid_numpy_s, 3),
            "numpy_factored_loop_s": round(grid_numpy_factored_s, 3),
            "jax_first_call_s (compile+run)": round(grid_first, 3),
            "jax_run_s": round(grid_run, 4),
            "speedup_vs_numpy_loop": round(grid_numpy_s / grid_run, 1),
            "speedup_vs_numpy_factored": round(grid_numpy_factored_s / grid_run, 1),
            "max_abs_diff_rho": grid_err,
        },
        "peak_rss_mb_this_process": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }
    if not args.skip_engine:
        report["engine"] = engine(args.engine_problems, 16)
    if not args.skip_figures:
        report.update(figure_set())
    report["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
