"""Config fields of the paged KV cache: defaults, validation messages that name the field and the
fix, and `experiment.make_engine` building the engine they describe."""

import jax
import pytest

from configs.base import get_base_config
from dapo_jax import experiment, models
from dapo_jax.config_validation import ConfigError, validate_config
from dapo_jax.sampler import Engine, PagedEngine


def _config(**rollout):
    c = get_base_config()
    c.model.preset = "tiny"
    c.data.max_prompt_length, c.data.max_response_length = 16, 32
    c.rollout.max_concurrent_decodes = 4
    for key, value in rollout.items():
        c.rollout[key] = value
    return c


def test_defaults_are_a_paged_cache_the_size_of_the_dense_one():
    c = _config()
    assert (c.rollout.kv_cache, c.rollout.kv_pool_tokens, c.rollout.kv_page_size) == ("paged", 0, 16)
    mesh = models.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    eng = experiment.make_engine(c, models.preset("tiny"), mesh, stop_ids=[2], pad_id=0)
    assert isinstance(eng, PagedEngine) and eng.page_size == 16
    assert eng.num_pages == 4 * 3  # 4 slots x ceil(48 / 16) pages: never preempts
    c.rollout.kv_cache, c.rollout.kv_pool_tokens, c.rollout.kv_page_size = "paged", 100, 8
    eng = experiment.make_engine(c, models.preset("tiny"), mesh, stop_ids=[2], pad_id=0)
    assert eng.num_pages == 13 and eng.page_size == 8  # 100 tokens rounded up to pages of 8
    assert eng.prefill_row_tokens == 2048
    c.rollout.prefill_row_tokens = 8  # below data.max_prompt_length: a row holds the longest prompt
    eng = experiment.make_engine(c, models.preset("tiny"), mesh, stop_ids=[2], pad_id=0)
    assert eng.prefill_row_tokens == 16 and eng.row_buckets == [16]
    c.rollout.kv_cache = "dense"
    eng = experiment.make_engine(c, models.preset("tiny"), mesh, stop_ids=[2], pad_id=0)
    assert type(eng) is Engine and eng.kv_cache == "dense"


@pytest.mark.parametrize("rollout, message", [
    (dict(kv_cache="ragged"), "config.rollout.kv_cache: must be one of ['paged', 'dense']"),
    (dict(kv_page_size=0), "config.rollout.kv_page_size: must be >= 1"),
    (dict(prefill_row_tokens=0), "config.rollout.prefill_row_tokens: must be >= 1"),
    (dict(kv_pool_tokens=40), "config.rollout.kv_pool_tokens: must be 0 (default: every slot can "
                              "reach full length) or hold at least one sample"),
])
def test_invalid_fields_name_the_field_and_the_fix(rollout, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_config(**rollout), training=False)
    assert message in str(err.value)
    if "kv_pool_tokens" in rollout:
        assert "set it to >= 48" in str(err.value)
    validate_config(_config(kv_pool_tokens=48), training=False)  # one full-length sample: fine
    validate_config(_config(kv_cache="dense", kv_pool_tokens=40), training=False)  # unused
