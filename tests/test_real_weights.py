"""Real pretrained weights, loaded straight from GGUF files, match transformers loading the same file.

Two real models (fetched by ../shared/models/get-real-weights): Qwen2.5-Coder-0.5B-Instruct (Qwen2:
q/k/v biases, untied head, 151,936-token vocabulary) and SmolLM2-135M-Instruct (Llama: llama.cpp's
permuted q/k rows, tied head). On 8 MATH-500 problems through each file's own chat template:
  - float32 logits within 5e-4 of transformers' and the same argmax at every position;
  - greedy 64-token continuations through our engine (continuous batching, 8 slots, prompts of
    different lengths) token-identical to transformers' greedy `generate`;
  - our per-token log-probs of those continuations (the engine's and the training path's) within
    5e-4 of transformers'.
Without the files the tests skip, naming the fetch command; under CI they fail instead.
"""

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dapo_jax import models
from dapo_jax.sampler import Engine, RolloutDriver, RolloutRequest, SamplingParams
from tests.conftest import running_in_ci

MODELS = {"qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct.gguf",
          "smollm2-135m": "smollm2-135m-instruct.gguf"}
DEFAULT_DIR = pathlib.Path.home() / ".cache" / "dapo_jax_test_models"
FETCH = "bash ../shared/models/get-real-weights {dir}"
N_PROMPTS, NEW_TOKENS, SLOTS, ATOL = 8, 64, 8, 5e-4


def _models_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DAPO_TEST_MODELS") or DEFAULT_DIR)


@pytest.fixture(scope="module", params=sorted(MODELS))
def real(request, shared_data):
    """Our model, transformers' model (same GGUF, float32), the file's tokenizer and 8 chat prompts."""
    directory = _models_dir()
    path = directory / MODELS[request.param]
    if not path.exists():
        message = (f"real-weight test assets absent: {path} not found. Fetch them with "
                   f"`{FETCH.format(dir=directory)}` (or point DAPO_TEST_MODELS at their folder)")
        if running_in_ci():
            pytest.fail("CI is set, so absent test models fail instead of skipping: " + message,
                        pytrace=False)
        pytest.skip(message)
    from transformers import AutoModelForCausalLM

    model, cfg = models.load_pretrained(path, dtype="float32")
    tok = models.load_tokenizer(path)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    with open(shared_data / "math500.jsonl") as f:
        problems = [json.loads(line)["problem"] for _, line in zip(range(N_PROMPTS), f)]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for p in problems]
    stop = sorted({int(tok.eos_token_id), int(tok.convert_tokens_to_ids("<|im_end|>"))})
    yield dict(name=request.param, model=model, cfg=cfg, hf=hf, tok=tok, prompts=prompts, stop=stop)


def _right_padded(seqs, pad=0):
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def test_real_prompts_have_different_lengths_and_the_files_chat_template(real):
    lengths = {len(p) for p in real["prompts"]}
    assert len(real["prompts"]) == N_PROMPTS and len(lengths) > 1
    text = real["tok"].decode(real["prompts"][0])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_logits_match_transformers_on_the_same_gguf(real):
    ids, mask = _right_padded(real["prompts"])
    ours = np.asarray(models.forward(real["model"], jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        ref = real["hf"](torch.from_numpy(ids).long(),
                         attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    valid = mask.astype(bool)
    diff = float(np.abs(ours[valid] - ref[valid]).max())
    agree = ours[valid].argmax(-1) == ref[valid].argmax(-1)
    print(f"\n{real['name']}: logits max |diff| {diff:.2e} over {int(valid.sum())} positions, "
          f"argmax agreement {agree.mean():.4f}")
    assert diff <= ATOL
    assert agree.all(), f"argmax differs at {int((~agree).sum())} of {agree.size} positions"


@pytest.fixture(scope="module")
def greedy(real):
    """Our engine's greedy continuations (8 slots, all prompts in flight at once) and transformers'."""
    prompts, cfg, stop = real["prompts"], real["cfg"], real["stop"]
    longest = max(map(len, prompts))
    engine = Engine(cfg, max_concurrent_decodes=SLOTS, max_prefill_length=longest,
                    max_target_length=longest + NEW_TOKENS + 1, stop_token_ids=stop)
    driver = RolloutDriver(engine, real["model"], progress=False,
                           sampling=SamplingParams(greedy=True))
    res = driver.generate([RolloutRequest(p, n=1, max_new_tokens=NEW_TOKENS) for p in prompts])
    ours = [s[0] for s in res.samples]
    # transformers, left-padded (its convention for batched decoder-only generation).
    pad = int(real["tok"].pad_token_id or 0)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = real["hf"].generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=stop, pad_token_id=pad,
                                  output_logits=True, return_dict_in_generate=True)
    # transformers' log-probs of its own continuation: log-softmax of the raw logits it decoded with.
    logp = torch.log_softmax(torch.stack(out.logits, 1).double(), -1)
    refs, ref_logprobs = [], []
    for i, row in enumerate(out.sequences[:, longest:].tolist()):
        cut = next((j for j, t in enumerate(row) if t in stop), None)
        row = row if cut is None else row[:cut + 1]
        refs.append(row)
        ref_logprobs.append(logp[i, np.arange(len(row)), row].numpy())
    return ours, refs, ref_logprobs


def test_greedy_continuations_equal_transformers_generate(real, greedy):
    ours, refs, _ = greedy
    same = [s.tokens.tolist() == r for s, r in zip(ours, refs)]
    print(f"\n{real['name']}: greedy continuations token-identical {sum(same)}/{len(same)}, "
          f"lengths {[len(r) for r in refs]}")
    for i, (s, r) in enumerate(zip(ours, refs)):
        assert s.tokens.tolist() == r, (
            f"prompt {i}: ours {real['tok'].decode(s.tokens)!r} vs transformers "
            f"{real['tok'].decode(r)!r}")
    assert any(len(r) == NEW_TOKENS for r in refs), "no continuation ran the full 64 tokens"


def test_continuation_logprobs_equal_transformers(real, greedy):
    ours, refs, ref_logprobs = greedy
    seqs = [p + s.tokens.tolist() for p, s in zip(real["prompts"], ours)]
    ids, mask = _right_padded(seqs)
    targets = np.zeros_like(mask)
    for i, (p, s) in enumerate(zip(real["prompts"], ours)):
        targets[i, len(p):len(p) + len(s.tokens)] = 1
    train_lp = np.asarray(models.token_logprobs(real["model"], jnp.asarray(ids), jnp.asarray(mask),
                                                jnp.asarray(targets)))
    worst_engine = worst_train = 0.0
    for i, (p, s) in enumerate(zip(real["prompts"], ours)):
        assert s.tokens.tolist() == refs[i], "continuations differ (see the greedy test)"
        ref, n = ref_logprobs[i], len(s.tokens)
        worst_engine = max(worst_engine, float(np.abs(np.asarray(s.logprobs) - ref).max()))
        worst_train = max(worst_train, float(np.abs(train_lp[i, len(p):len(p) + n] - ref).max()))
    print(f"\n{real['name']}: continuation log-prob max |diff| engine {worst_engine:.2e}, "
          f"training path {worst_train:.2e}")
    assert worst_engine <= ATOL
    assert worst_train <= ATOL
