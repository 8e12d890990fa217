"""Figure 8: fine-tuning that does not bring the concept back, and what it costs (issue 13, item 3).

Exact linear model: erase concept 0 with UCE, fine-tune with GD on one constructed prompt at a
given overlap angle with the erased direction r = M^-1 c_f and a given curvature (the phase
diagram's axes), with every update projected off a guard subspace (theory/guard.py). Left: the
erased concept's presence regained; right: the share of plain GD's benign-loss decrease kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.figures._style import FigureResult, figure, save

NAME = "theory_guard"
SIZES = {"dim": 8, "embed_dim": 6, "num_concepts": 4, "num_levels": 4}
ANGLES = np.linspace(0.0, np.pi / 2, 7)
CURVATURES = (0.3, 3.0)
STEPS = 200
SEED = 0
GUARDS = ("none", "readouts", "forget outputs", "PGU-style retain core")
COLORS = {"none": "0.3", "readouts": "#1f77b4", "forget outputs": "#2ca02c", "PGU-style retain core": "#d62728"}


def _kernel():
    from theory._backend import FAST_COMPILE_OPTIONS
    from theory.finetune import finetune_setup
    from theory.guard import (
        forget_output_bases,
        guarded_gd,
        guarded_gd_rows,
        readout_guard,
        retain_core_bases,
    )
    from theory.presence import presence
    from theory.pretrain import bayes_optimal_denoiser
    from theory.problem import DataDistribution
    from theory.quadratic import second_moments, split_params
    from theory.readouts import readouts
    from theory.sweep import DYNAMIC_KNOBS, ScenarioStatic, scenario_problem
    from theory.unlearning import get_method, unlearn_with

    static = ScenarioStatic(**SIZES)

    def setup(seed):
        knobs = {k: jnp.asarray(v, jnp.float64) for k, v in DYNAMIC_KNOBS.items()}
        problem = scenario_problem(static, {**knobs, "seed": seed})
        theta_0 = bayes_optimal_denoiser(problem)
        theta_u, _ = unlearn_with(problem, theta_0, get_method("uce"), (0,), (1, 2, 3))
        # The erased direction r: the top right-singular vector of the V edit (= M^-1 c_f, UCE).
        dv = split_params(theta_u - theta_0, problem.dim)[1].reshape(-1, problem.embed_dim)
        r = jnp.linalg.svd(dv, full_matrices=False)[2][0]
        other = jax.random.normal(jax.random.PRNGKey(seed + 1), r.shape, r.dtype)
        other = other - (other @ r) * r
        other = other / jnp.linalg.norm(other)
        ro = readouts(problem, theta_0, theta_u, 0, check=False)
        width = theta_u.shape[-1]
        guards = (  # row guards as per-level bases (guarded_gd_rows), the readout guard dense
            jnp.zeros((theta_u.shape[0], width, width), theta_u.dtype),
            readout_guard([ro.gradient[n] for n in ("rho", "output_rho", "sample_shift", "forget_loss_recovery")]),
            forget_output_bases(problem, 0),
            retain_core_bases(problem, (1, 2, 3)),
        )
        presence_u = presence(problem, theta_u, problem.embeddings[:, 0], 0)
        return problem, theta_0, theta_u, r, other, guards, presence_u

    # One compiled setup at optimisation level 0 instead of ~200 op-by-op compiles (it runs once).
    problem, theta_0, theta_u, r, other, guards, presence_u = jax.jit(
        setup, compiler_options=FAST_COMPILE_OPTIONS
    )(jnp.asarray(SEED))
    emb = problem.embeddings[:, 0]

    def run(angle, curvature, problem, theta_0, theta_u, r, other, guards):
        # Everything arrives as an argument: closed-over arrays would be constant-folded by XLA
        # (a 448 x 448 product folded at compile time took minutes).
        prompt = jnp.sqrt(curvature) * (jnp.cos(angle) * r + jnp.sin(angle) * other)
        data = DataDistribution(
            prompt[:, None], (problem.generator @ prompt)[:, None], jnp.ones(1), jnp.zeros(())
        )
        moments = second_moments(problem, data)
        lam_max = finetune_setup(problem, data, theta_u, theta_0).eigen.lambda_max
        out = []
        for guard in guards:
            gd = guarded_gd_rows if guard.ndim == 3 else guarded_gd  # same result (tested)
            result = gd(problem, moments, theta_u, guard, 0.9 / lam_max, [0, STEPS])
            out.append(
                (
                    presence(problem, result.params[-1], emb, 0) - presence_u,
                    result.finetune_loss[0] - result.finetune_loss[-1],
                    result.removed_fraction,
                )
            )
        return jax.tree.map(lambda *xs: jnp.stack(xs), *out)  # each (guards,)

    batched = jax.jit(jax.vmap(jax.vmap(run, (0, None) + (None,) * 6), (None, 0) + (None,) * 6))
    return (lambda a, c: batched(a, c, problem, theta_0, theta_u, r, other, guards)), presence_u


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """Presence regained and benign-loss decrease kept, per guard, over the overlap angle."""
    from theory._backend import init_backend_without_lapack_deadlock

    jax.config.update("jax_enable_x64", True)
    init_backend_without_lapack_deadlock()
    kernel, presence_u = _kernel()
    regained, decrease, removed = jax.tree.map(
        np.asarray, kernel(jnp.asarray(ANGLES), jnp.asarray(CURVATURES))
    )  # each (curvature, angle, guard)
    plain = decrease[..., :1]
    # At 90 degrees plain GD has nothing to fine-tune (no overlap, no benign loss to reduce).
    kept = np.where(np.abs(plain) > 1e-12, decrease / np.where(plain == 0, 1.0, plain), np.nan)
    fig, (ax, ax_k) = figure(1, 2, height=3.8, sharex=True)
    degrees = np.degrees(ANGLES)
    for j, guard in enumerate(GUARDS):
        for c, ls in enumerate(("-", "--")[: len(CURVATURES)]):
            label = guard if c == 0 else None
            ax.plot(
                degrees, regained[c, :, j], ls=ls, marker="o", ms=3, lw=2.2 - 0.4 * j,
                color=COLORS[guard], label=label,
            )
            ax_k.plot(degrees, kept[c, :, j], ls=ls, marker="o", ms=3, color=COLORS[guard])
    ax.set_xlabel("overlap angle between r and the fine-tuning prompt (degrees)")
    ax.set_ylabel(f"presence regained after T={STEPS} GD steps")
    handles, labels = ax.get_legend_handles_labels()
    ax_k.legend(  # the right panel's lower half is empty: no curve is hidden there
        handles, labels, frameon=False, fontsize=8, loc="lower right",
        title="guard (solid: curvature 0.3, dashed: 3)", title_fontsize=8,
    )
    ax_k.set_xlabel("overlap angle (degrees)")
    ax_k.set_ylabel("benign-loss decrease kept\n(guarded / plain GD)")
    ax_k.set_ylim(0, 1.05)
    worst_plain = float(np.max(regained[..., 0]))
    worst_forget = float(np.max(np.abs(regained[..., 2])))
    fig.suptitle(
        "Guarding fine-tuning off the erased prompt's outputs stops resurgence\n"
        f"(presence regained at most {worst_plain:.2f} unguarded, {worst_forget:.2f} guarded) "
        "at no benign-loss cost here",
        y=1.06,
    )
    fig.subplots_adjust(wspace=0.35)
    png, pdf = save(fig, out, NAME)
    summary = {
        "presence_unlearned": float(presence_u),
        "max_presence_regained": {g: float(np.max(regained[..., j])) for j, g in enumerate(GUARDS)},
        "min_loss_decrease_kept": {g: float(np.nanmin(kept[..., j])) for j, g in enumerate(GUARDS)},
        # only where plain GD has an update to guard: at 90 degrees it is round-off, and the
        # share of round-off that a projection removes differs between CPUs
        "max_update_removed": {
            g: float(np.max(np.where(np.abs(plain[..., 0]) > 1e-12, removed[..., j], -np.inf)))
            for j, g in enumerate(GUARDS)
        },
    }
    return FigureResult(png, pdf, {"regained": regained, "kept": kept}, None, summary)
