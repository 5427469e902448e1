"""Test-session setup: 8 fake CPU devices so sharded tests run anywhere."""
import os

# Must happen before jax is imported anywhere: tests see 8 CPU devices; single-device
# tests place arrays on jax.devices()[0] or build a 1-device mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from scripts import check_shared_data  # noqa: E402

# Identical programs compiled by different tests (every Trainer builds its own jitted closures) hit
# XLA's persistent cache instead of recompiling: compiles dominate the suite's time on 2 cores.
# Shared by the xdist workers of one run (writes are atomic); a clean clone starts empty.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "DAPO_TEST_JAX_CACHE", str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = check_shared_data.DEFAULT_DATA_DIR  # ../shared/data beside the repository


def running_in_ci() -> bool:
    """True when the CI runner set CI (CI=true): missing real data is then a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path to ../shared/data with every file the tests read.

    Outside the project layout (a clone without ../shared) the test skips, saying what is missing
    and where it belongs; under CI it fails with that message instead, so the real-data tests can
    never pass by being skipped.
    """
    if check_shared_data.missing_files(SHARED_DATA):
        if running_in_ci():
            pytest.fail("CI is set, so absent real data fails instead of skipping: "
                        + check_shared_data.problem(SHARED_DATA), pytrace=False)
        pytest.skip(check_shared_data.problem(SHARED_DATA, one_line=True))
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(shared_data: pathlib.Path) -> pathlib.Path:
    """The real Qwen2.5 tokenizer folder from ../shared/data (its files are checked by shared_data)."""
    return shared_data / "tokenizers" / "qwen2.5"


# --- Tiny Hugging Face checkpoints (random weights), created once per test session. -----------------
# Cover: GQA ratios (4:2, 5:5 MHA, 6:1 MQA, 6:2), tied/untied embeddings, a head_dim that is not
# hidden/heads, Qwen2 (QKV bias) and Llama (no bias).
TINY_HF_CONFIGS = {
    "qwen2_gqa_untied": dict(arch="qwen2", vocab_size=128, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False),
    "qwen2_mha_tied_odd_head": dict(arch="qwen2", vocab_size=96, hidden_size=40, intermediate_size=56,
                                    num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=5,
                                    head_dim=12, tie_word_embeddings=True),
    "qwen2_mqa_tied": dict(arch="qwen2", vocab_size=112, hidden_size=48, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
                           tie_word_embeddings=True),
    "llama_gqa_untied": dict(arch="llama", vocab_size=100, hidden_size=48, intermediate_size=80,
                             num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                             tie_word_embeddings=False),
}


def make_hf_model(name: str, seed: int = 0):
    """A random-weight transformers model for one of TINY_HF_CONFIGS (float32, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(TINY_HF_CONFIGS[name])
    arch = spec.pop("arch")
    common = dict(max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**spec, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**spec, **common))
    # Non-trivial norms and biases so a missed mapping cannot hide behind ones/zeros.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict:
    """name -> (directory, torch model) for every tiny HF config, saved with save_pretrained."""
    out = {}
    for name in TINY_HF_CONFIGS:
        model = make_hf_model(name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out
