"""`make demo`: greedy-decode a prompt with a tiny random-weight Qwen2 policy (CPU, seconds).

This becomes the DAPO training demo once the trainer lands; for now it exercises the model, the
KV-cache decode path and checkpoint export end to end.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax import models


def greedy_decode(model: models.Qwen2, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt using prefill + one KV-cache step per token."""
    cfg = model.config
    params = model.params()
    cache = models.init_cache(cfg, batch_size=1, max_len=len(prompt) + max_new_tokens)
    step = jax.jit(lambda p, ids, m, c: models.decoder_apply(p, cfg, ids, m, cache=c),
                   donate_argnums=(3,))
    ids = jnp.asarray([prompt], jnp.int32)
    hidden, cache = step(params, ids, jnp.ones_like(ids), cache)
    out = []
    for _ in range(max_new_tokens):
        tok = int(jnp.argmax(models.lm_logits(params, cfg, hidden[:, -1])[0]))
        out.append(tok)
        hidden, cache = step(params, jnp.asarray([[tok]]), jnp.ones((1, 1), jnp.int32), cache)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="workdir/demo")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    cfg = models.preset("tiny")
    t0 = time.time()
    model = models.init_model(cfg, seed=0)
    prompt = [int(x) for x in np.random.RandomState(0).randint(3, cfg.vocab_size, size=8)]
    tokens = greedy_decode(model, prompt, args.max_new_tokens)
    export = os.path.join(args.workdir, "tiny_hf_export")
    models.save_pretrained(model, cfg, export)
    print(f"devices: {jax.devices()}")
    print(f"model: tiny Qwen2 ({cfg.num_params:,} params), prompt {prompt}")
    print(f"greedy continuation ({len(tokens)} tokens): {tokens}")
    print(f"exported HF checkpoint to {export} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
