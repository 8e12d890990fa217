"""Every user-facing error of the foundation names the parameter and the allowed range."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import theory as T

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": -3}, "`dim` must be an integer >= 1; got -3."),
        ({"dim": 4.5}, "`dim` must be an integer >= 1; got 4.5."),
        ({"embed_dim": 0}, "`embed_dim` must be an integer >= 1; got 0."),
        ({"num_levels": 0}, "`num_levels` must be an integer >= 1; got 0."),
        ({"spectrum_decay": float("nan")}, "`spectrum_decay` must be finite and in [0.0, inf]; got nan."),
        ({"generator_scale": float("inf")}, "`generator_scale` must be finite and in (0.0, inf]; got inf."),
        ({"common_component": 1.0}, "`common_component` must be finite and in [0.0, 1.0); got 1.0."),
        ({"num_concepts": 8, "embed_dim": 8}, "`num_concepts` + 1 must be <= `embed_dim`"),
    ],
)
def test_make_problem_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        T.make_problem(KEY, **kwargs)


@pytest.fixture(scope="module")
def problem():
    return T.make_problem(KEY, dim=4, embed_dim=5, num_concepts=3, num_levels=2)


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        ([0.5, 0.4, 0.0], "`probs` must sum to 1 (allowed range: entries in [0, 1]); sums to 0.9"),
        ([1.5, -0.5, 0.0], "`probs` must have finite entries >= 0"),
        ([np.nan, 0.5, 0.5], "`probs` must have finite entries >= 0"),
        ([0.5, 0.5], "`probs` must have one entry per prompt (J=3)"),
    ],
)
def test_distribution_rejects_bad_probabilities(problem, probs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        T.concept_distribution(problem, probs)


def test_distribution_rejects_bad_p_null(problem):
    with pytest.raises(ValueError, match=re.escape("`p_null` must be finite and in [0.0, 1.0); got 1.0.")):
        T.concept_distribution(problem, [1.0, 0, 0], p_null=1.0)


def test_covariance_must_be_spd(problem):
    not_spd = jnp.diag(jnp.array([1.0, 1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match=re.escape("`covariance` must be positive definite (SPD); its smallest eigenvalue is -1.")):
        T.problem_from_arrays(problem.generator, not_spd, problem.embeddings, problem.schedule)
    asym = jnp.eye(4).at[0, 1].set(0.5)
    with pytest.raises(ValueError, match=re.escape("`covariance` must be symmetric")):
        T.problem_from_arrays(problem.generator, asym, problem.embeddings, problem.schedule)


def test_gd_step_size_must_be_below_two_over_lambda_max(problem):
    data = T.concept_distribution(problem, [0.0, 0.5, 0.5])
    theta0 = T.pretrain_closed_form(problem, T.concept_distribution(problem, [1 / 3] * 3))
    lam_max = float(T.finetune_setup(problem, data, theta0, theta0).eigen.lambda_max)
    with pytest.raises(ValueError, match=re.escape(f"`lr` must be finite and in (0.0, {2 / lam_max})")):
        T.finetune_gd(problem, data, theta0, theta0, 2.0 / lam_max, [1])
    with pytest.raises(ValueError, match=re.escape("`lr` must be finite and in (0.0,")):
        T.finetune_gd(problem, data, theta0, theta0, -0.1, [1])
    with pytest.raises(ValueError, match=re.escape("`steps` must be a 1-D array of integers >= 0")):
        T.finetune_gd(problem, data, theta0, theta0, 0.5 / lam_max, [-1])


def test_simulation_arguments(problem):
    import optax

    data = T.concept_distribution(problem, [0.0, 0.5, 0.5])
    theta0 = T.pretrain_closed_form(problem, T.concept_distribution(problem, [1 / 3] * 3))
    with pytest.raises(ValueError, match=re.escape("`record_every` must divide `steps`")):
        T.simulate_finetune(problem, data, theta0, theta0, optax.sgd(0.1), 10, record_every=3)
    with pytest.raises(ValueError, match=re.escape("`key` is required for minibatch simulation")):
        T.simulate_finetune(problem, data, theta0, theta0, optax.sgd(0.1), 10, batch_size=4)
