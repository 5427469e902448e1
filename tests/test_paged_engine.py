"""The paged KV cache: the same tokens and log-probs as the dense engine (greedy and seeded
sampling), prompt pages shared by a prompt's samples, pages returned when samples finish, a pool too
small for the batch preempting and resuming samples without losing or duplicating any, 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import models
from dapo_jax.models.attention import dense_attention, paged_decode_attention
from dapo_jax.models.sharding import make_mesh
from dapo_jax.sampler import (Engine, PagedEngine, RolloutDriver, RolloutRequest, SamplingParams,
                              build_engine, kv_pool_plan)
from dapo_jax.sampler.paged_cache import PagePool, default_pool_tokens, pool_pages
from tests.compile_counter import count_compiles

EOF_ID = 2
GREEDY = SamplingParams(greedy=True)
SAMPLE = SamplingParams(temperature=1.0)


def _prompts(vocab, lengths=(5, 9, 3, 12, 7, 16, 1), seed=0):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, vocab, size=n)] for n in lengths]


def _driver(cfg, params, *, kv_cache="paged", slots=4, sampling=GREEDY, steps=4, pool=0, page=4,
            mesh=None, max_target=48):
    eng = build_engine(cfg, kv_cache=kv_cache, kv_pool_tokens=pool, kv_page_size=page,
                       max_concurrent_decodes=slots, max_prefill_length=16,
                       max_target_length=max_target, stop_token_ids=[EOF_ID], mesh=mesh)
    return RolloutDriver(eng, params, steps_per_sync=steps, progress=False, sampling=sampling)


@pytest.fixture(scope="module")
def tiny(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    model, cfg = models.load_pretrained(path)
    return model, cfg


def _tokens(result):
    return [[s.tokens.tolist() for s in samples] for samples in result.samples]


def _assert_same(got, want, atol=1e-5):
    assert _tokens(got) == _tokens(want)
    for a, b in zip(got.samples, want.samples):
        for x, y in zip(a, b):
            assert x.finish_reason == y.finish_reason
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=atol)
            np.testing.assert_allclose(x.sampling_logprobs, y.sampling_logprobs, atol=atol)


def _pool_layout(k_pages, v_pages):
    """K and V pages [N, K, P, hd] as the engine's pool pages [N, P, K, 2, hd]."""
    return jnp.stack([jnp.swapaxes(k_pages, 1, 2), jnp.swapaxes(v_pages, 1, 2)], axis=-2)


def test_paged_attention_equals_dense_attention_over_the_same_keys():
    rng = np.random.default_rng(0)
    b, h, kvh, hd, page, n_pages, width = 3, 6, 2, 8, 4, 20, 5
    k_pages = jnp.asarray(rng.normal(size=(n_pages, kvh, page, hd)), jnp.float32)
    v_pages = jnp.asarray(rng.normal(size=(n_pages, kvh, page, hd)), jnp.float32)
    table = np.asarray(rng.permutation(n_pages)[:b * width].reshape(b, width), np.int32)
    table[2, 1:] = n_pages  # unallocated entries (out of range) past a short row
    lengths = np.asarray([17, 9, 3], np.int32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, hd)), jnp.float32)
    # The dense reference: each row's pages laid out in order, masked past its length.
    safe = np.minimum(table, n_pages - 1)
    k = jnp.transpose(k_pages[safe], (0, 1, 3, 2, 4)).reshape(b, width * page, kvh, hd)
    v = jnp.transpose(v_pages[safe], (0, 1, 3, 2, 4)).reshape(b, width * page, kvh, hd)
    mask = (jnp.arange(width * page)[None] < lengths[:, None])[:, None, :]
    want = dense_attention(q, k, v, mask)
    kv_pages = _pool_layout(k_pages, v_pages)
    for block in (4, 8, 256):  # one page per loop iteration, two, all of them
        got = paged_decode_attention(q, kv_pages, jnp.asarray(table), jnp.asarray(lengths),
                                     block_tokens=block)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # A row with no keys (a free slot) outputs zeros, not NaN.
    got = paged_decode_attention(q, kv_pages, jnp.asarray(table),
                                 jnp.asarray([5, 0, 2], jnp.int32))
    assert np.all(np.asarray(got[1]) == 0.0) and np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("lengths", [[3, 1, 2], [5, 8, 0], [9, 2, 12], [17, 20, 1]])
def test_paged_attention_reads_only_the_block_that_holds_the_longest_row(lengths):
    # Pages of 4 tokens, 5 table columns: blocks of 1, 2, 4 or 5 pages. The pages of the columns
    # past the chosen block are NaN: reading them would poison every row.
    rng = np.random.default_rng(2)
    b, h, kvh, hd, page, width = 3, 4, 2, 8, 4, 5
    n_pages = b * width
    table = np.arange(n_pages, dtype=np.int32).reshape(b, width)
    k_pages = rng.normal(size=(n_pages, kvh, page, hd))
    v_pages = rng.normal(size=(n_pages, kvh, page, hd))
    needed = -(-max(lengths) // page)
    block = min(1 << (needed - 1).bit_length(), width)
    unread = table[:, block:].reshape(-1)
    lengths = np.asarray(lengths, np.int32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, hd)), jnp.float32)
    k = np.transpose(k_pages[table], (0, 1, 3, 2, 4)).reshape(b, width * page, kvh, hd)
    v = np.transpose(v_pages[table], (0, 1, 3, 2, 4)).reshape(b, width * page, kvh, hd)
    mask = (jnp.arange(width * page)[None] < lengths[:, None])[:, None, :]
    want = dense_attention(q, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), mask)
    k_pages[unread] = np.nan
    v_pages[unread] = np.nan
    pool = _pool_layout(jnp.asarray(k_pages, jnp.float32), jnp.asarray(v_pages, jnp.float32))
    got = paged_decode_attention(q, pool, jnp.asarray(table), jnp.asarray(lengths))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_each_row_reads_only_its_own_blocks_not_the_longest_rows():
    """A long-tailed batch: one long row and short ones. With blocks of one page, each short row's
    allocated pages past its own length are NaN; reading them (as a loop to the longest row's
    block count would) poisons that row. The loop takes (row, block) pairs, several per row."""
    rng = np.random.default_rng(4)
    b, h, kvh, hd, page, width = 4, 4, 2, 8, 4, 6
    n_pages = b * width
    table = np.arange(n_pages, dtype=np.int32).reshape(b, width)
    lengths = np.asarray([23, 2, 0, 9], np.int32)
    k_pages = rng.normal(size=(n_pages, kvh, page, hd))
    v_pages = rng.normal(size=(n_pages, kvh, page, hd))
    q = jnp.asarray(rng.normal(size=(b, 1, h, hd)), jnp.float32)
    k = np.transpose(k_pages[table], (0, 1, 3, 2, 4)).reshape(b, width * page, kvh, hd)
    v = np.transpose(v_pages[table], (0, 1, 3, 2, 4)).reshape(b, width * page, kvh, hd)
    mask = (jnp.arange(width * page)[None] < lengths[:, None])[:, None, :]
    want = dense_attention(q, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), mask)
    for r, n in enumerate(lengths):
        unread = table[r, -(-n // page):]
        k_pages[unread] = np.nan
        v_pages[unread] = np.nan
    pool = _pool_layout(jnp.asarray(k_pages, jnp.float32), jnp.asarray(v_pages, jnp.float32))
    # Blocks of one page: 6 + 1 + 0 + 3 (row, block) pairs, taken 4 at a time.
    got = paged_decode_attention(q, pool, jnp.asarray(table), jnp.asarray(lengths), block_tokens=4)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.asarray(got[2]) == 0.0)  # the free slot


def _kernel_inputs(head_dim=128):
    """A two-layer pool in the kernel's lane width, a table with unallocated entries, and a free
    slot (length 0) among the rows."""
    rng = np.random.default_rng(1)
    layers, n_pages, page, kvh, h, b, width = 2, 24, 16, 2, 4, 4, 4
    pool = jnp.asarray(rng.normal(size=(layers, n_pages, page, kvh, 2, head_dim)), jnp.float32)
    table = np.asarray(rng.permutation(n_pages)[:b * width].reshape(b, width), np.int32)
    table[3, 1:] = n_pages
    lengths = jnp.asarray([17, 0, 64, 9], jnp.int32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, head_dim)), jnp.float32)
    return q, pool, jnp.asarray(table), lengths


def test_the_tpu_kernel_path_reads_the_pool_as_the_page_loop_does():
    """The TPU path hands jax's ragged paged attention kernel the pool as [L*N, P, 2K, hd] pages
    (layer offsets in the page ids, no copy of a layer). Checked here with the kernel's own jnp
    reference, which has its exact interface and semantics (the Pallas kernel needs a TPU)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

    q, pool, table, lengths = _kernel_inputs()
    for layer in (0, 1):
        want = paged_decode_attention(q, pool, table, lengths, layer=layer)
        got = paged_decode_attention(q, pool, table, lengths, layer=layer,
                                     implementation="ragged_tpu",
                                     kernel=rpa.ref_ragged_paged_attention)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.all(np.asarray(got[1]) == 0.0)  # the free slot
    with pytest.raises(ValueError, match="paged decode implementation"):
        paged_decode_attention(q, pool, table, lengths, layer=0, implementation="flash")


def test_the_tpu_kernel_itself_in_interpret_mode():
    """jax's Pallas TPU kernel on CPU through the TPU interpreter, where this jax's interpreter can
    run it (jax 0.10's cannot reshape a kernel-memory ref, which the kernel does)."""
    import functools

    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    q, pool, table, lengths = _kernel_inputs()
    want = paged_decode_attention(q, pool, table, lengths, layer=1)
    # Block sizes given: the kernel's tuned table is only looked up on a TPU.
    kernel = functools.partial(ragged_paged_attention, num_kv_pages_per_block=2,
                               num_queries_per_block=1)
    try:
        with pltpu.force_tpu_interpret_mode():
            got = paged_decode_attention(q, pool, table, lengths, layer=1,
                                         implementation="ragged_tpu", kernel=kernel)
    except Exception as e:  # the interpreter's error arrives wrapped in a callback error
        if "'ReshapeTransform' object has no attribute" not in str(e):
            raise
        pytest.skip(f"jax {jax.__version__}'s TPU interpreter cannot reshape a kernel ref "
                    "(the kernel does); the adapter is checked against the kernel's reference")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_paged_decode_picks_the_kernel_only_on_tpu_with_its_lane_width():
    from dapo_jax.models.attention import resolve_paged_decode

    assert resolve_paged_decode("auto", 128, "tpu") == "ragged_tpu"
    assert resolve_paged_decode("splash", 128, "tpu") == "ragged_tpu"
    assert resolve_paged_decode("auto", 64, "tpu") == "xla"  # Qwen2.5-0.5B's head dim
    assert resolve_paged_decode("blockwise", 128, "tpu") == "xla"  # the user asked for XLA
    assert resolve_paged_decode("auto", 128, "gpu") == "xla"
    assert resolve_paged_decode("splash", 128, "cpu") == "xla"  # splash forced for tests on CPU


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLE], ids=["greedy", "sampled"])
def test_paged_engine_decodes_like_the_dense_engine(tiny, sampling):
    model, cfg = tiny
    reqs = [RolloutRequest(p, n=3, max_new_tokens=m)
            for p, m in zip(_prompts(cfg.vocab_size), (14, 30, 6, 20, 32, 25, 9))]
    want = _driver(cfg, model, kv_cache="dense", sampling=sampling).generate(reqs, seed=4)
    drv = _driver(cfg, model, sampling=sampling)
    assert isinstance(drv.engine, PagedEngine) and drv.engine.kv_cache == "paged"
    got = drv.generate(reqs, seed=4)
    _assert_same(got, want)
    assert got.stats["preemptions"] == 0  # the default pool holds every slot at full length
    # Every page came back once the rollout finished.
    assert drv.engine.pool.used_pages == 0 and (drv.engine.pool.refs == 0).all()


def test_a_pool_too_small_for_the_batch_preempts_and_resumes_exactly(tiny):
    model, cfg = tiny
    reqs = [RolloutRequest(p, n=3, max_new_tokens=30) for p in _prompts(cfg.vocab_size)]
    want = _driver(cfg, model, kv_cache="dense", sampling=SAMPLE).generate(reqs, seed=9)
    # 4 slots that may each grow to 48 tokens, in a pool of 16 pages of 4 tokens (= 64 tokens):
    # about one long sample and change. Samples must wait, and get preempted as they grow.
    drv = _driver(cfg, model, sampling=SAMPLE, pool=64)
    assert drv.engine.num_pages == 16
    got = drv.generate(reqs, seed=9)
    assert got.stats["preemptions"] > 0
    assert got.stats["kv_peak_pages"] <= 16
    _assert_same(got, want)  # none lost, none duplicated, each continued where it stopped
    assert sum(len(s) for s in got.samples) == 3 * len(reqs)
    assert drv.engine.pool.used_pages == 0
    # A second rollout on the same state reuses everything: no new programs.
    with count_compiles() as again:
        _assert_same(drv.generate(reqs, seed=9), want)
    assert again.total == 0, str(again)


def test_samples_of_a_prompt_share_its_full_pages(tiny):
    model, cfg = tiny
    eng = PagedEngine(cfg, kv_page_size=4, max_concurrent_decodes=4, max_prefill_length=16,
                      max_target_length=48, stop_token_ids=[EOF_ID])
    params = eng.load_params(model)
    state = eng.init_decode_state()
    prompt = _prompts(cfg.vocab_size, lengths=(11,))[0]
    prefix = eng.prefill_prefix(params, *eng.pad_tokens(prompt))
    state = eng.insert_many(prefix, state, [0, 1], max_new_tokens=8)
    pool = eng.pool
    # Positions 0..9 precede the last prompt token: pages 0 and 1 (positions 0..7) are shared;
    # page 2 (positions 8..11, with the last prompt token at 10) is each sample's own copy.
    assert pool.table[0, :2].tolist() == pool.table[1, :2].tolist()
    assert pool.table[0, 2] != pool.table[1, 2]
    assert pool.used_pages == 4 and pool.refs[pool.table[0, :2]].tolist() == [2, 2]
    # Two more samples of the same prefix, later: the shared pages are reused, not rewritten.
    state = eng.insert_many(prefix, state, [2, 3], max_new_tokens=8)
    assert pool.table[3, :2].tolist() == pool.table[0, :2].tolist() and pool.used_pages == 6
    state, res = eng.generate(params, state, num_steps=8, sampling=GREEDY)
    assert res.done.any(axis=0).all()  # 8-token budgets: every sample finished ...
    assert pool.used_pages == 0  # ... and gave its pages back
    with pytest.raises(RuntimeError, match="KV pool exhausted"):
        small = PagedEngine(cfg, kv_page_size=4, kv_pool_tokens=48, max_concurrent_decodes=4,
                            max_prefill_length=16, max_target_length=48, stop_token_ids=[EOF_ID])
        s = small.init_decode_state()
        s = small.insert_many(prefix, s, [0, 1, 2], max_new_tokens=40)
        small.generate(small.load_params(model), s, num_steps=40, sampling=GREEDY)


def test_packed_prefill_computes_the_prompts_not_their_buckets(tiny):
    """Several prompts share one prefill row (segment ids, restarting positions, attention only over
    key blocks a query block's prompts reach): each prompt's K/V equal its own dense prefill's, the row is padded only to its bucket, rows split at
    `prefill_row_tokens`, and the prefixes decode exactly like single-prompt ones."""
    model, cfg = tiny
    eng = PagedEngine(cfg, kv_page_size=4, max_concurrent_decodes=4, max_prefill_length=16,
                      max_target_length=48, stop_token_ids=[EOF_ID], prefill_row_tokens=32)
    dense = Engine(cfg, max_concurrent_decodes=4, max_prefill_length=16, max_target_length=48,
                   stop_token_ids=[EOF_ID])
    params, dparams = eng.load_params(model), dense.load_params(model)
    prompts = _prompts(cfg.vocab_size, lengths=(5, 9, 3, 12, 7, 16, 1))  # 53 tokens
    before = eng.prefill_computed_tokens
    prefixes = eng.prefill_many(params, prompts)
    rows = {id(p["row"]) for p in prefixes}
    # First-fit decreasing, up to 32 tokens a row: [16, 12, 3, 1] (32), [9, 7, 5] (21 -> bucket 32).
    assert len(rows) == 2 and eng.prefill_computed_tokens - before == 64
    assert sum(dense.bucket_for(len(p)) for p in prompts) == 16 * 7  # one bucket per prompt
    assert [p["host"].start for p in prefixes] == [16, 0, 28, 16, 9, 0, 31]
    for prompt, prefix in zip(prompts, prefixes):
        want = dense.prefill_prefix(dparams, *dense.pad_tokens(prompt))
        n, start = len(prompt), prefix["host"].start
        got = np.asarray(prefix["row"])[:, start:start + n]  # [L, n, K, 2, hd]
        np.testing.assert_allclose(got[..., 0, :],
                                   np.swapaxes(np.asarray(want["k"])[:, 0, :, :n], 1, 2),
                                   atol=1e-5)
        np.testing.assert_allclose(got[..., 1, :],
                                   np.swapaxes(np.asarray(want["v"])[:, 0, :, :n], 1, 2),
                                   atol=1e-5)
        assert prefix["host"].last_token == prompt[-1] and prefix["host"].true_length == n
    with pytest.raises(ValueError, match="max_prefill_length"):
        eng.prefill_many(params, [[3] * 17])
    # The driver prefills the prompts its free slots take in one call, and reports the work.
    reqs = [RolloutRequest(p, n=1, max_new_tokens=6) for p in prompts]
    want = _driver(cfg, model, kv_cache="dense").generate(reqs)
    got = _driver(cfg, model).generate(reqs)
    _assert_same(got, want)
    assert got.stats["prefill_tokens"] == 53 == want.stats["prefill_tokens"]
    assert want.stats["prefill_computed_tokens"] == 16 * 7
    assert 53 <= got.stats["prefill_computed_tokens"] <= 64, got.stats  # vs 112 one by one
    # With one free slot the driver still fills a whole row ahead: one call, one row shape.
    one_slot = _driver(cfg, model, slots=1).generate(reqs)
    _assert_same(one_slot, want)
    assert one_slot.stats["prefill_computed_tokens"] == 64  # all 7 prompts in one 64-token row


def test_the_decode_step_reads_only_the_pages_in_use(tiny):
    """A long max_target_length costs a paged step nothing at the same real lengths (the loop
    stops at the longest live sample), while its outputs stay those of a short engine."""
    model, cfg = tiny
    reqs = [RolloutRequest(p, n=2, max_new_tokens=10) for p in _prompts(cfg.vocab_size)]
    short = _driver(cfg, model, max_target=48).generate(reqs)
    long = _driver(cfg, model, max_target=4096, page=16).generate(reqs)
    _assert_same(long, short)


def test_samples_longer_than_a_block_decode_like_the_dense_engine(tiny):
    """Past 256 tokens a sample spans several decode blocks (the work-item loop), beside short
    samples of one block (3 slots: a sample's blocks straddle the loop's steps of 3 items);
    tokens and log-probs stay the dense engine's."""
    model, cfg = tiny

    def generate(kv_cache):
        # The stop id is outside the vocabulary: every sample runs to its own max_new_tokens.
        eng = build_engine(cfg, kv_cache=kv_cache, kv_page_size=16, max_concurrent_decodes=3,
                           max_prefill_length=16, max_target_length=320,
                           stop_token_ids=[cfg.vocab_size])
        drv = RolloutDriver(eng, model, steps_per_sync=8, progress=False, sampling=SAMPLE)
        return drv.generate(reqs, seed=2)

    reqs = [RolloutRequest(p, n=2, max_new_tokens=m)
            for p, m in zip(_prompts(cfg.vocab_size, lengths=(12, 3, 9)), (300, 20, 270))]
    got = generate("paged")
    assert sorted({len(s.tokens) for samples in got.samples for s in samples}) == [20, 270, 300]
    _assert_same(got, generate("dense"))


def test_eight_fake_devices_give_the_same_outputs_as_one(tiny):
    """Slots and pages split over (data, fsdp) = 4 shards, KV heads over tensor: each device decodes
    its own slots from its own pages, and a tight pool preempts per shard."""
    model, cfg = tiny
    assert jax.device_count() == 8
    reqs = [RolloutRequest(p, n=2, max_new_tokens=30) for p in _prompts(cfg.vocab_size)]
    one = _driver(cfg, model, kv_cache="dense", sampling=SAMPLE).generate(reqs, seed=1)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    drv = _driver(cfg, model, slots=8, mesh=mesh, sampling=SAMPLE)
    eng = drv.engine
    assert eng.shards == 4 and eng.num_pages == 8 * 12
    assert eng.state_shardings["cache"]["kv"].spec[1] == ("data", "fsdp")
    _assert_same(drv.generate(reqs, seed=1), one, atol=1e-4)
    # 14 pages of 4 tokens per shard for its 2 slots of up to 12 pages each.
    tight = _driver(cfg, model, slots=8, mesh=mesh, sampling=SAMPLE, pool=4 * 14 * 4)
    got = tight.generate(reqs, seed=1)
    assert got.stats["preemptions"] > 0 and tight.engine.pool.used_pages == 0
    _assert_same(got, one, atol=1e-4)
    with pytest.raises(ValueError, match="per shard of the 4 the decode slots are split into"):
        _driver(cfg, model, slots=8, mesh=mesh, pool=96)


def test_pool_bookkeeping_and_plan():
    pool = PagePool(num_pages=6, page_size=4, slots=2, pages_per_slot=3)
    shared = pool.alloc(1)
    pool.incref(shared)
    pool.assign(0, shared + pool.alloc(1), length=5)
    pool.assign(1, shared + pool.alloc(1), length=5)
    assert pool.free_pages == 3 and pool.refs[shared[0]] == 2
    assert pool.shortfall(0, 12) == 1 and pool.shortfall(0, 100) == 1  # capped at 3 pages a slot
    pool.grow(0, 12)
    pool.release(0)
    assert pool.free_pages == 4 and pool.refs[shared[0]] == 1  # the shared page is still held
    pool.release(1)
    assert pool.free_pages == 6 and pool.peak_pages == 4
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.alloc(7)
    assert default_pool_tokens(4, 45, 16) == 4 * 48
    with pytest.raises(ValueError, match="rollout.kv_pool_tokens"):
        pool_pages(32, 16, 4, 48)
    cfg = models.preset("qwen2.5-0.5b")
    plan = kv_pool_plan(cfg, 64 * 4096, 16, slots=256, max_target_length=4096,
                        cache_dtype="bfloat16", expected_length=1024)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    assert plan.pool_bytes == 64 * 4096 * per_token
    assert plan.dense_bytes == 256 * 4096 * per_token
    assert plan.concurrent_samples_at_max == 64 and plan.concurrent_samples == 256
    split = kv_pool_plan(cfg, 64 * 4096, 16, slots=256, max_target_length=4096, shards=8)
    assert split.pool_bytes == plan.pool_bytes and split.pool_bytes_per_shard * 8 == plan.pool_bytes
    assert isinstance(Engine.kv_cache, str)


def test_jetstream_api_and_weight_swaps_without_recompiling(tiny):
    model, cfg = tiny
    eng = PagedEngine(cfg, kv_page_size=4, max_concurrent_decodes=2, max_prefill_length=16,
                      max_target_length=32, stop_token_ids=[EOF_ID])
    dense = Engine(cfg, max_concurrent_decodes=2, max_prefill_length=16, max_target_length=32,
                   stop_token_ids=[EOF_ID])
    padded, true_len = eng.pad_tokens(_prompts(cfg.vocab_size, lengths=(6,))[0])
    outs = []
    for e in (eng, dense):
        params = e.load_params(model)
        state = e.init_decode_state()
        prefix, first = e.prefill(params, padded, true_len, sampling=GREEDY)
        state = e.insert(prefix, state, slot=1, max_new_tokens=5)
        state, _ = e.reserve(state, 6)
        state, res = e.generate(params, state, num_steps=6, sampling=GREEDY)
        slot = res.get_result_at_slot(1)
        assert slot["tokens"][0] == first.tokens[0, 0]
        assert slot["valid"].sum() == 5 and slot["done"][4] and not res.valid[:, 0].any()
        outs.append(slot["tokens"][:5].tolist())
    assert outs[0] == outs[1]
    # Weight swaps and new decode states on a warm paged driver build no programs.
    drv = _driver(cfg, model, sampling=SAMPLE, pool=64)
    reqs = [RolloutRequest(p, n=2, max_new_tokens=20) for p in _prompts(cfg.vocab_size)]
    before = _tokens(drv.generate(reqs, seed=2))
    other = models.init_model(cfg, seed=5)
    # Other weights give other lengths, so other preemptions and insert widths: warm those too.
    drv.update_params(other.params())
    drv.generate(reqs, seed=2)
    drv.update_params(model)
    with count_compiles() as swap:
        drv.update_params(other.params())
        after = _tokens(drv.generate(reqs, seed=2))
        drv.release()
        drv.update_params(model)
        again = _tokens(drv.generate(reqs, seed=2))
    assert swap.total == 0, str(swap)
    assert after != before and again == before
