"""Figure 7: which readout of the law predicts what users measure, concept presence (theory.md s.4b).

Eight unlearning presets x random problems x three step counts in the exact linear model: erase
concept 0 (retain 1, 2), fine-tune with GD at lr = 1 / lambda_max on concepts 3, 4, 5. For each
readout, the Spearman correlation of its law prediction with the exact change of presence; and
presence predicted from the top-k + closure displacement against the exact presence, as k grows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from experiments.figures._style import METHOD_COLORS, FigureResult, figure, save

NAME = "theory_readouts"
STEPS = (10, 100, 1000)
SEEDS = 4
RANKS = (1, 4, 16, 64, 120)  # top-k eigenspaces of the block Hessian; 120 = L (d + m): all of them
PRESENCE_SAMPLES = 1024  # Monte-Carlo samples per presence value (fixed key), as in the sweeps
SIZES = {"dim": 12, "embed_dim": 8, "num_concepts": 6, "num_levels": 6}


def _stages():
    """Jitted stages seed -> (problem, theta_0); (problem, theta_0) -> theta_u per method; and the
    analysis -> law predictions, exact readouts and presence, shared by every method.

    Only the unlearning is compiled once per method: compiling the whole study per method took
    8 x 12 s, most of this figure's cold time.
    """
    from theory._backend import FAST_COMPILE_OPTIONS
    from theory.finetune import finetune_setup, gd_closed_form, top_k_closure
    from theory.law import gd_amplification, predict_readout_change
    from theory.pretrain import bayes_optimal_denoiser
    from theory.problem import DataDistribution
    from theory.quadratic import eigen_coordinates, from_eigen_coordinates
    from theory.readouts import READOUT_NAMES, presence_readout, readouts
    from theory.sweep import DYNAMIC_KNOBS, ScenarioStatic, scenario_problem
    from theory.unlearning import get_method, unlearn_with

    static = ScenarioStatic(**SIZES)
    steps = jnp.asarray(STEPS)
    ft_probs = jnp.array([0.0, 0.0, 0.0, 1 / 3, 1 / 3, 1 / 3])

    def base(seed):
        knobs = {k: jnp.asarray(v, jnp.float64) for k, v in DYNAMIC_KNOBS.items()}
        problem = scenario_problem(static, {**knobs, "seed": seed})
        return problem, bayes_optimal_denoiser(problem)

    def unlearn(method):
        def run(problem, theta_0):
            return unlearn_with(problem, theta_0, get_method(method), (0,), (1, 2))[0]

        return jax.jit(jax.vmap(run), compiler_options=FAST_COMPILE_OPTIONS)

    def analyse(problem, theta_0, theta_u):
        ft = DataDistribution(problem.embeddings, problem.concept_means, ft_probs, jnp.zeros(()))
        setup = finetune_setup(problem, ft, theta_u, theta_0)
        lr = 1.0 / setup.eigen.lambda_max
        ro = readouts(problem, theta_0, theta_u, 0, check=False)
        lam, g, _ = setup.law_inputs()
        law = {
            n: predict_readout_change(
                lam, g, eigen_coordinates(ro.gradient[n], setup.eigen).reshape(-1), lr, steps
            )
            for n in READOUT_NAMES
        }
        thetas = gd_closed_form(setup, theta_u, lr, steps)
        score = presence_readout(problem, 0, num_samples=PRESENCE_SAMPLES)
        presence = jax.vmap(score)(thetas)
        # Presence from the truncated displacement: top-k eigenspaces exactly, the rest of g as one
        # closure direction with its Rayleigh-quotient curvature (theory.md s.4).
        coords = eigen_coordinates(setup.grad, setup.eigen)  # (L, d, n)
        amp = gd_amplification(setup.eigen.eigenvalues, lr, steps)  # (S, L, n)
        truncated = []
        for top, lam_perp in top_k_closure(setup.eigen, coords, RANKS):
            amp_perp = gd_amplification(lam_perp, lr, steps)  # (S,)
            moved = -jnp.where(top, amp[:, :, None, :], amp_perp[:, None, None, None]) * coords
            truncated.append(jax.vmap(score)(theta_u + from_eigen_coordinates(moved, setup.eigen)))
        exact = {n: jax.vmap(ro.value[n])(thetas) for n in READOUT_NAMES}
        return law, exact, presence - score(theta_u), jnp.stack(truncated), presence

    fast = {"compiler_options": FAST_COMPILE_OPTIONS}  # 32 configurations: compile time dominates
    return jax.jit(jax.vmap(base), **fast), unlearn, jax.jit(jax.vmap(analyse), **fast)


def _tie_stable(values: np.ndarray) -> np.ndarray:
    """Values rounded to 1e-9 before ranking: many configurations change presence (or a readout)
    by round-off only, and the order of those near-zero values is set by the CPU's BLAS kernels,
    so an unrounded Spearman moves by ~1e-3 between machines (measured: AMD EPYC vs CI)."""
    return np.round(values, 9)


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """Left: Spearman(readout prediction, presence change) per readout. Right: median |presence
    from the top-k + closure displacement - exact presence| against k."""
    from theory._backend import init_backend_without_lapack_deadlock
    from theory.readouts import READOUT_NAMES
    from theory.unlearning import METHOD_NAMES

    jax.config.update("jax_enable_x64", True)
    init_backend_without_lapack_deadlock()
    base, unlearn, analyse = _stages()
    problems, theta_0 = base(jnp.arange(SEEDS))
    per_method = {
        m: jax.tree.map(np.asarray, analyse(problems, theta_0, unlearn(m)(problems, theta_0)))
        for m in METHOD_NAMES
    }
    change = np.concatenate([r[2].ravel() for r in per_method.values()])
    spearman_law, spearman_exact = {}, {}
    for n in READOUT_NAMES:
        law = np.concatenate([r[0][n].ravel() for r in per_method.values()])
        exact = np.concatenate([r[1][n].ravel() for r in per_method.values()])
        spearman_law[n] = float(spearmanr(_tie_stable(law), _tie_stable(change))[0])
        spearman_exact[n] = float(spearmanr(_tie_stable(exact), _tie_stable(change))[0])
    trunc_err = {
        m: np.median(np.abs(r[3] - r[4][:, None]), axis=(0, 2)) for m, r in per_method.items()
    }  # (ranks,) per method

    fig, (ax, ax_k) = figure(1, 2, height=3.9, gridspec_kw={"width_ratios": [1.2, 1]})
    x = np.arange(len(READOUT_NAMES))
    ax.bar(x - 0.2, [spearman_law[n] for n in READOUT_NAMES], 0.4, label="first-order law")
    ax.bar(
        x + 0.2,
        [spearman_exact[n] for n in READOUT_NAMES],
        0.4,
        label="readout at the GD θ_T",
        color="0.6",
    )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [n.replace("_", "\n") for n in READOUT_NAMES])
    ax.set_ylabel("Spearman with the change of presence")
    ax.set_ylim(-0.2, 1.0)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.set_title(f"{len(METHOD_NAMES)} methods x {SEEDS} problems x T in {list(STEPS)}", fontsize=10)
    for m, err in trunc_err.items():
        ax_k.plot(RANKS, err, marker="o", ms=3, color=METHOD_COLORS.get(m), label=m)
    ax_k.set_xscale("log")
    ax_k.set_xlabel("k (Hessian eigenspaces kept, + closure)")
    ax_k.set_ylabel("median |presence_k − presence|")
    ax_k.set_title("predicted presence vs exact", fontsize=10)
    ax_k.legend(frameon=False, fontsize=7, ncol=2)
    best = max(READOUT_NAMES, key=lambda n: spearman_law[n])
    fig.suptitle(
        f"rho barely tracks presence (Spearman {spearman_law['rho']:.2f}); "
        f"{best} does best ({spearman_law[best]:.2f}),\n"
        "presence at the predicted θ_T needs the low-curvature eigenspaces (exact at k = all)",
        y=1.06,
    )
    fig.subplots_adjust(wspace=0.35)
    png, pdf = save(fig, out, NAME)
    summary = {
        "spearman_law": spearman_law,
        "spearman_at_gd_theta": spearman_exact,
        "median_presence_error_by_rank": {
            m: {str(k): float(e) for k, e in zip(RANKS, err, strict=True)}
            for m, err in trunc_err.items()
        },
        "points": int(change.size),
    }
    data = {"change": change, "truncated_error": trunc_err}
    return FigureResult(png, pdf, data, None, summary)
