"""DAPO policy loss (Eq. 8-10) and aggregation (Eq. 12): numpy references, gradients, sharding, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dapo_jax.algo import (
    LOSS_AGG_MODES,
    aggregate_loss,
    compute_policy_loss,
    per_token_policy_loss,
    token_mean_metrics,
)
from dapo_jax.algo import policy_loss as pl

EPS_LOW, EPS_HIGH, CLIP_C = 0.2, 0.28, 10.0
B, T = 8, 6


# ----------------------------------------------------------------------------- numpy reference


def np_per_token(old, new, adv, mask, eps_low, eps_high, c, clamp=None):
    """Plain numpy (float64) DAPO per-token loss and clip indicators, written from the formulas."""
    old, new, mask = (np.asarray(x, np.float64) for x in (old, new, mask))
    adv = np.asarray(adv, np.float64)
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, new.shape)
    log_ratio = np.where(mask > 0, new - old, 0.0)
    if clamp is not None:
        log_ratio = np.clip(log_ratio, -clamp, clamp)
    r = np.exp(log_ratio)
    # objective = min(r A, clip(r) A) (Eq. 10); loss is its negation
    loss = -np.minimum(r * adv, np.clip(r, 1 - eps_low, 1 + eps_high) * adv)
    if c is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * c), loss)
    upper = (adv > 0) & (r > 1 + eps_high)
    lower_bound = (adv < 0) & (r < 1 - eps_low)
    dual = (adv < 0) & (r > c) if c is not None else np.zeros_like(upper)
    ind = {
        "pg_loss": loss,
        "pg_clipfrac": upper | lower_bound,
        "pg_clipfrac_upper": upper,
        "pg_clipfrac_lower_bound": lower_bound,
        "pg_clipfrac_lower": dual,
        "ppo_kl": -log_ratio,
    }
    return loss, ind


def np_aggregate(loss, mask, mode, *, global_token_count=None, global_seq_count=None,
                 loss_scale_length=None, micro_batch_weight=1.0, num_dp_ranks=1):
    """Plain numpy aggregation, row by row."""
    loss = np.asarray(loss, np.float64)
    mask = np.asarray(mask, np.float64)
    rows = [(loss[i][mask[i] > 0]) for i in range(loss.shape[0])]
    nonempty = [r for r in rows if r.size]
    if mode == "token-mean":
        n = global_token_count if global_token_count is not None else sum(r.size for r in rows)
        return sum(r.sum() for r in rows) / n if n else 0.0
    if mode == "verl-legacy-token-mean":
        chunk = len(rows) // num_dp_ranks
        means = []
        for k in range(num_dp_ranks):
            toks = np.concatenate(rows[k * chunk:(k + 1) * chunk])
            means.append(toks.mean() if toks.size else 0.0)
        return micro_batch_weight * np.mean(means)
    n_seq = global_seq_count if global_seq_count is not None else len(nonempty)
    if n_seq == 0:
        return 0.0
    if mode == "seq-mean-token-mean":
        return sum(r.mean() for r in nonempty) / n_seq
    if mode == "seq-mean-token-sum":
        return sum(r.sum() for r in nonempty) / n_seq
    if mode == "seq-mean-token-sum-norm":
        scale = loss.shape[1] if loss_scale_length is None else loss_scale_length
        return sum(r.sum() for r in nonempty) / n_seq / scale
    raise ValueError(mode)


def make_inputs(seed=0, b=B, t=T, adv_per_token=False):
    """Random inputs with an empty row, A = 0 rows, ratios far outside the clip range, and garbage
    (huge log-probs that would overflow exp) at masked positions."""
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.5, size=(b, t)).astype(np.float32)
    new = (old + rng.normal(0, 1.5, size=(b, t))).astype(np.float32)  # ratios ~ e^{+-4}
    new[0, 0], new[0, 1] = old[0, 0] + 4.0, old[0, 1] - 4.0  # r ~ 55 and ~ 0.018
    new[2, 0] = old[2, 0] + 3.0  # r ~ 20 > clip_ratio_c with A < 0: dual clip
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0
    mask[0, :2] = 1.0
    mask[3] = 0.0  # a sequence with no response tokens
    new = np.where(mask > 0, new, 200.0).astype(np.float32)  # exp(200) = inf in float32
    adv = rng.normal(0, 1, size=(b, t) if adv_per_token else (b,)).astype(np.float32)
    adv[1] = 0.0  # A = 0
    adv[0] = 1.0 if not adv_per_token else adv[0]
    adv[2] = -1.5 if not adv_per_token else adv[2]
    return old, new, adv, mask


# ----------------------------------------------------------------------------- 1. numpy equality


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_loss_and_metrics_equal_numpy_reference_in_every_mode(mode):
    old, new, adv, mask = make_inputs(seed=1)
    kw = {"num_dp_ranks": 2, "micro_batch_weight": 0.5} if mode == "verl-legacy-token-mean" else {}
    loss, metrics = compute_policy_loss(old, new, adv, mask, loss_agg_mode=mode,
                                        clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH,
                                        clip_ratio_c=CLIP_C, **kw)
    ref_tok, ind = np_per_token(old, new, adv, mask, EPS_LOW, EPS_HIGH, CLIP_C)
    np.testing.assert_allclose(float(loss), np_aggregate(ref_tok, mask, mode, **kw), rtol=2e-6, atol=1e-7)

    valid = mask > 0
    n_tok = valid.sum()
    assert float(metrics["token_count"]) == n_tok
    assert float(metrics["seq_count"]) == valid.any(axis=1).sum()
    for name, x in ind.items():
        ref_sum = np.where(valid, x, 0).sum()
        np.testing.assert_allclose(float(metrics[name + "_sum"]), ref_sum, rtol=2e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(metrics[name]), ref_sum / n_tok, rtol=2e-6, atol=1e-7, err_msg=name)
    # the inputs really exercise every branch
    assert ind["pg_clipfrac_upper"][valid].any() and ind["pg_clipfrac_lower_bound"][valid].any()
    assert ind["pg_clipfrac_lower"][valid].any()
    np.testing.assert_allclose(
        float(metrics["pg_clipfrac"]), float(metrics["pg_clipfrac_upper"] + metrics["pg_clipfrac_lower_bound"]),
        rtol=1e-6)


def test_per_token_advantages_and_disabled_dual_clip_match_numpy():
    old, new, adv, mask = make_inputs(seed=2, adv_per_token=True)
    loss, metrics = compute_policy_loss(old, new, adv, mask, clip_ratio_c=None)
    ref_tok, _ = np_per_token(old, new, adv, mask, EPS_LOW, EPS_HIGH, None)
    np.testing.assert_allclose(float(loss), np_aggregate(ref_tok, mask, "token-mean"), rtol=2e-6)
    assert float(metrics["pg_clipfrac_lower"]) == 0.0
    got_tok = per_token_policy_loss(old, new, adv, mask, clip_ratio_c=None)
    np.testing.assert_allclose(np.where(mask > 0, got_tok, 0), np.where(mask > 0, ref_tok, 0), rtol=2e-6, atol=1e-7)


def test_global_counts_replace_the_local_denominators():
    old, new, adv, mask = make_inputs(seed=3)
    ref_tok, _ = np_per_token(old, new, adv, mask, EPS_LOW, EPS_HIGH, CLIP_C)
    for mode, kw in [("token-mean", {"global_token_count": 100}),
                     ("seq-mean-token-mean", {"global_seq_count": 20}),
                     ("seq-mean-token-sum", {"global_seq_count": 20}),
                     ("seq-mean-token-sum-norm", {"global_seq_count": 20, "loss_scale_length": 512})]:
        loss, _ = compute_policy_loss(old, new, adv, mask, loss_agg_mode=mode, **kw)
        np.testing.assert_allclose(float(loss), np_aggregate(ref_tok, mask, mode, **kw), rtol=2e-6, err_msg=mode)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_all_empty_mask_gives_zero_loss_and_finite_grad(mode):
    old, new, adv, mask = make_inputs(seed=4)
    mask = np.zeros_like(mask)
    new = np.full_like(new, 200.0)
    f = jax.jit(jax.value_and_grad(lambda lp: compute_policy_loss(old, lp, adv, mask, loss_agg_mode=mode)[0]))
    loss, grad = f(jnp.asarray(new))
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    pg, m = compute_policy_loss(old, new, adv, mask, loss_agg_mode=mode)
    # No tokens: every statistic is an empty sum (0), not 0/0 = NaN and not a stand-in value.
    assert {k: float(v) for k, v in m.items()} == dict.fromkeys(m, 0.0)


def test_garbage_at_masked_positions_does_not_poison_grad():
    old, new, adv, mask = make_inputs(seed=5)
    g = jax.grad(lambda lp: compute_policy_loss(old, lp, adv, mask)[0])(jnp.asarray(new))
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[mask == 0] == 0)


def test_aggregate_loss_equals_numpy_reference_on_arbitrary_loss():
    rng = np.random.default_rng(6)
    loss = rng.normal(size=(B, T)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.5).astype(np.float32)
    mask[5] = 0
    for mode in LOSS_AGG_MODES:
        kw = {"num_dp_ranks": 4, "micro_batch_weight": 0.25} if mode == "verl-legacy-token-mean" else {}
        got = aggregate_loss(loss, mask, mode, **kw)
        np.testing.assert_allclose(float(got), np_aggregate(loss, mask, mode, **kw), rtol=2e-6, err_msg=mode)


def test_log_ratio_clamp_matches_numpy_and_defaults_off():
    old, new, adv, mask = make_inputs(seed=7)
    loss, m = compute_policy_loss(old, new, adv, mask, log_ratio_clamp=1.0)
    ref_tok, ind = np_per_token(old, new, adv, mask, EPS_LOW, EPS_HIGH, CLIP_C, clamp=1.0)
    np.testing.assert_allclose(float(loss), np_aggregate(ref_tok, mask, "token-mean"), rtol=2e-6)
    np.testing.assert_allclose(float(m["ppo_kl_sum"]), np.where(mask > 0, ind["ppo_kl"], 0).sum(), rtol=2e-6)
    assert float(compute_policy_loss(old, new, adv, mask)[0]) != pytest.approx(float(loss))


def test_token_mean_metrics_combine_micro_batches_exactly():
    old, new, adv, mask = make_inputs(seed=8)
    _, full = compute_policy_loss(old, new, adv, mask)
    parts = [compute_policy_loss(old[s], new[s], adv[s], mask[s])[1] for s in (slice(0, 3), slice(3, 8))]
    summed = jax.tree.map(lambda *x: sum(x), *parts)
    combined = token_mean_metrics(summed)
    for name, v in combined.items():
        np.testing.assert_allclose(float(v), float(full[name]), rtol=1e-6, atol=1e-7, err_msg=name)


def test_invalid_arguments_raise_clear_errors():
    old, new, adv, mask = make_inputs()
    with pytest.raises(ValueError, match="clip_ratio_c .* must be > 1.0"):
        compute_policy_loss(old, new, adv, mask, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="Unknown loss_agg_mode"):
        compute_policy_loss(old, new, adv, mask, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="only apply to loss_agg_mode='verl-legacy-token-mean'"):
        compute_policy_loss(old, new, adv, mask, micro_batch_weight=0.5)
    with pytest.raises(ValueError, match="multiple of num_dp_ranks"):
        compute_policy_loss(old, new, adv, mask, loss_agg_mode="verl-legacy-token-mean", num_dp_ranks=3)
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        compute_policy_loss(old, new, adv[:3], mask)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        compute_policy_loss(old, new, adv, mask, clip_ratio_low=1.0)


# ----------------------------------------------------------------------------- 2. exactness of token-mean


@jax.jit
def _param_grads(theta, delta, old, base, feat, adv, mask, global_token_count):
    """Gradients of the token-mean loss wrt a shared parameter vector theta and wrt the log-probs,
    with log_prob = base + delta + feat @ theta (so d/d delta at delta = 0 is d/d log_prob)."""

    def f(theta, delta):
        lp = base + delta + jnp.einsum("btk,k->bt", feat, theta)
        return compute_policy_loss(old, lp, adv, mask, global_token_count=global_token_count)[0]

    return jax.grad(f, argnums=(0, 1))(theta, delta)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_token_mean_grads_identical_for_1_2_4_micro_batches():
    old, new, adv, mask = make_inputs(seed=9)
    rng = np.random.default_rng(9)
    feat = rng.normal(0, 0.3, size=(B, T, 3)).astype(np.float32)
    theta = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)
    new = np.where(mask > 0, new, 0.0).astype(np.float32)
    n_tok = float(mask.sum())

    full_theta, full_lp = _param_grads(theta, jnp.zeros((B, T)), old, new, feat, adv, mask, None)
    for n_micro in (1, 2, 4):
        size = B // n_micro
        g_theta = jnp.zeros(3)
        g_lp = []
        for k in range(n_micro):
            s = slice(k * size, (k + 1) * size)
            gt, gl = _param_grads(theta, jnp.zeros((size, T)), old[s], new[s], feat[s], adv[s], mask[s], n_tok)
            g_theta = g_theta + gt
            g_lp.append(gl)
        assert _rel_err(g_theta, full_theta) <= 1e-6, n_micro
        assert _rel_err(jnp.concatenate(g_lp), full_lp) <= 1e-6, n_micro


def test_averaging_micro_batch_means_would_differ():
    """The trap Eq. 12 avoids: the mean of per-micro-batch token means is not the token mean."""
    old, new, adv, mask = make_inputs(seed=10)
    full = float(compute_policy_loss(old, new, adv, mask)[0])
    halves = [float(compute_policy_loss(old[s], new[s], adv[s], mask[s])[0]) for s in (slice(0, 4), slice(4, 8))]
    assert abs(np.mean(halves) - full) > 1e-4


def test_token_mean_grads_identical_on_1_and_8_devices():
    devices = jax.devices()
    assert len(devices) == 8, "conftest should provide 8 fake CPU devices"
    old, new, adv, mask = make_inputs(seed=11, b=16)

    def grads_on(devs):
        mesh = Mesh(np.array(devs), ("data",))
        row = NamedSharding(mesh, P("data", None))
        vec = NamedSharding(mesh, P("data"))
        f = jax.jit(jax.grad(lambda o, lp, a, m: compute_policy_loss(o, lp, a, m)[0], argnums=1),
                    in_shardings=(row, row, vec, row), out_shardings=row)
        args = [jax.device_put(x, s) for x, s in zip((old, new, adv, mask), (row, row, vec, row))]
        out = f(*args)
        assert len(out.sharding.device_set) == len(devs)
        return np.asarray(out)

    g1, g8 = grads_on(devices[:1]), grads_on(devices)
    assert _rel_err(g8, g1) <= 1e-6


def test_legacy_mode_equals_verl_formula_and_differs_from_token_mean_by_it():
    """verl-legacy: (1/R) sum_r sum_m (n/N_r) token_mean(micro m of rank r). R=2 ranks, N_r=4 seqs per
    rank, micro-batches of n=2 seqs -> 2 micro-batches per rank."""
    old, new, adv, mask = make_inputs(seed=12)
    new = np.where(mask > 0, new, 0.0).astype(np.float32)
    R, N_r, n = 2, 4, 2
    M = N_r // n
    ref_tok, _ = np_per_token(old, new, adv, mask, EPS_LOW, EPS_HIGH, CLIP_C)

    def micro_rows(r, m):
        return np.arange(r * N_r + m * n, r * N_r + (m + 1) * n)

    # numpy formula
    formula = 0.0
    for r in range(R):
        for m in range(M):
            rows = micro_rows(r, m)
            toks = ref_tok[rows][mask[rows] > 0]
            formula += (n / N_r) * (toks.mean() if toks.size else 0.0)
    formula /= R

    # our legacy mode: call m sees micro-batch m of every rank, concatenated rank-major
    total, grad = 0.0, np.zeros_like(new)
    for m in range(M):
        rows = np.concatenate([micro_rows(r, m) for r in range(R)])
        f = lambda lp, rows=rows: compute_policy_loss(  # noqa: E731
            old[rows], lp, adv[rows], mask[rows], loss_agg_mode="verl-legacy-token-mean",
            num_dp_ranks=R, micro_batch_weight=n / N_r)[0]
        val, g = jax.value_and_grad(f)(jnp.asarray(new[rows]))
        total += float(val)
        grad[rows] = np.asarray(g)
    np.testing.assert_allclose(total, formula, rtol=2e-6)

    # token-mean gives every token weight 1/N_total; legacy gives weight (n/N_r) / (R * n_tok(micro))
    tm_grad = np.asarray(jax.grad(lambda lp: compute_policy_loss(old, lp, adv, mask)[0])(jnp.asarray(new)))
    n_total = mask.sum()
    for r in range(R):
        for m in range(M):
            rows = micro_rows(r, m)
            scale = (n / N_r) / (R * mask[rows].sum()) * n_total
            np.testing.assert_allclose(grad[rows], tm_grad[rows] * scale, rtol=1e-5, atol=1e-8)
    assert abs(total - float(compute_policy_loss(old, new, adv, mask)[0])) > 1e-4


# ----------------------------------------------------------------------------- 3. clip bounds (property)


@jax.jit
def _per_token_value_and_grad(old, log_prob, adv, mask, eps_low, eps_high, c):
    """The per-token loss and d(sum loss)/d(log_prob), with the clip parameters traced so that every
    hypothesis example reuses one compiled program (the public API takes them as static args)."""

    def total(lp):
        per_tok, _ = pl._per_token(old, lp, adv, mask, eps_low, eps_high, c, None)
        return jnp.sum(per_tok), per_tok

    (_, per_tok), grad = jax.value_and_grad(total, has_aux=True)(log_prob)
    return per_tok, grad


def test_traced_per_token_helper_equals_public_function():
    old, new, adv, mask = make_inputs(seed=13)
    public = per_token_policy_loss(old, new, adv, mask, clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=3.0)
    traced, _ = _per_token_value_and_grad(old, new, adv, mask, *np.float32([0.1, 0.3, 3.0]))
    np.testing.assert_array_equal(np.where(mask > 0, public, 0), np.where(mask > 0, traced, 0))


@settings(max_examples=100, deadline=None)
@given(
    log_ratio=st.lists(st.floats(-8, 8), min_size=16, max_size=16),
    adv=st.lists(st.floats(-5, 5), min_size=4, max_size=4),
    eps_low=st.floats(0.0, 0.5),
    eps_high=st.floats(0.0, 1.0),
    c=st.floats(1.5, 20.0),
)
def test_clip_bounds_hold(log_ratio, adv, eps_low, eps_high, c):
    lr = np.asarray(log_ratio, np.float32).reshape(4, 4)
    a = np.asarray(adv, np.float32)
    old = np.zeros((4, 4), np.float32)
    mask = np.ones((4, 4), np.float32)
    loss, grad = _per_token_value_and_grad(old, lr, a, mask, np.float32(eps_low), np.float32(eps_high),
                                           np.float32(c))
    loss, grad = np.asarray(loss, np.float64), np.asarray(grad)
    eps_low, eps_high, c = float(np.float32(eps_low)), float(np.float32(eps_high)), float(np.float32(c))
    A = np.broadcast_to(a[:, None], lr.shape).astype(np.float64)
    r = np.exp(lr.astype(np.float64))
    tol = 1e-5 * (1 + np.abs(A) * (1 + r))
    pos, neg = A > 0, A < 0
    # A > 0: the objective never exceeds (1 + eps_high) A
    assert np.all(loss[pos] >= (-A * (1 + eps_high))[pos] - tol[pos])
    # A < 0: the objective never exceeds (1 - eps_low) A, and dual-clip caps the loss at -c A
    assert np.all(loss[neg] >= (-A * (1 - eps_low))[neg] - tol[neg])
    assert np.all(loss[neg] <= (-A * c)[neg] + tol[neg])
    assert np.all(loss[A == 0] == 0)
    # clipped tokens get no gradient (away from the exact boundaries)
    margin = 1e-3
    clipped = (pos & (r > (1 + eps_high) * (1 + margin))) | (neg & (r < (1 - eps_low) * (1 - margin))) | (
        neg & (r > c * (1 + margin)))
    assert np.all(grad[clipped] == 0)
    inside = (np.abs(A) > 1e-3) & (r > (1 - eps_low) * (1 + margin)) & (r < (1 + eps_high) * (1 - margin)) & ~(
        neg & (r > c * (1 - margin)))
    assert np.all(grad[inside] != 0)


# ----------------------------------------------------------------------------- 6. compile counts


def test_policy_loss_compiles_once_per_input_shape():
    shape_b, shape_t = 5, 7  # a shape no other test uses
    before = pl._policy_loss_jit._cache_size()
    for seed, count in [(0, 30), (1, 31.0), (2, jnp.asarray(32, jnp.int32))]:
        old, new, adv, mask = make_inputs(seed=seed, b=shape_b, t=shape_t)
        compute_policy_loss(old, new, adv, mask, global_token_count=count)
    assert pl._policy_loss_jit._cache_size() == before + 1
    old, new, adv, mask = make_inputs(seed=3, b=shape_b, t=shape_t + 1)
    compute_policy_loss(old, new, adv, mask, global_token_count=30)
    assert pl._policy_loss_jit._cache_size() == before + 2

    before = pl._aggregate_jit._cache_size()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        aggregate_loss(rng.normal(size=(5, 7)).astype(np.float32), np.ones((5, 7), np.float32),
                       global_token_count=seed + 1)
    assert pl._aggregate_jit._cache_size() == before + 1
