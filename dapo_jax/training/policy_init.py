"""The policy's starting weights: a HF checkpoint, or a random preset with an optional SFT warm start."""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from etils import epath

import data_pipeline as dp
from dapo_jax import models
from dapo_jax.experiment import Experiment, check_architecture

log = logging.getLogger(__name__)


def _load(exp: Experiment, path) -> tuple[Any, Any]:
    m = exp.config.model
    model, cfg = models.load_pretrained(path, mesh=exp.mesh, dtype=m.param_dtype,
                                        compute_dtype=m.dtype, remat=m.remat,
                                        scan_layers=bool(m.scan_layers))
    return model.params(), cfg


def initial_params(exp: Experiment, *, workdir: epath.PathLike, train_records: Sequence[dict],
                   progress: bool = False) -> Any:
    """The weights training starts from, sharded for the experiment's mesh."""
    c = exp.config
    if c.model.path:
        params, loaded = _load(exp, c.model.path)
        check_architecture(exp.model_config, loaded, str(c.model.path))
        return params
    params = models.init_model(exp.model_config, mesh=exp.mesh, seed=c.seed).params()
    ws = c.get("warm_start")
    if ws is not None and ws.steps > 0:
        params = warm_started(exp, params, epath.Path(workdir) / "warm_start", train_records,
                              progress=progress)
    return params


def warm_started(exp: Experiment, params: Any, cache: epath.Path, records: Sequence[dict], *,
                 progress: bool) -> Any:
    """Supervised warm start on worked toy solutions, cached as a HF checkpoint in `cache`."""
    import jax

    from dapo_jax.training.warm_start import supervised_warm_start, warm_start_examples

    c = exp.config
    if (cache / "config.json").exists():
        log.info("warm start: reusing %s", cache)
        return _load(exp, cache)[0]
    rendered = dp.render_prompts(exp.tokenizer, records, max_prompt_length=exp.prompt_length,
                                 system_prompt=c.data.system_prompt,
                                 apply_chat_template=c.data.apply_chat_template)
    eos = exp.stop_ids[0]
    index, texts, weights = warm_start_examples(records, format_noise=c.warm_start.format_noise)
    responses = [exp.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    t0 = time.time()
    params, losses = supervised_warm_start(
        params, exp.model_config, [rendered.token_ids[i] for i in index], responses,
        steps=c.warm_start.steps, batch_size=c.warm_start.batch_size, lr=c.warm_start.lr,
        seed=c.seed, pad_id=exp.pad_id, weights=weights, progress=progress)
    params = jax.device_put(params, models.param_shardings(exp.model_config, exp.mesh))
    if jax.process_index() == 0:
        print(f"warm start: {c.warm_start.steps} SFT steps in {time.time() - t0:.0f}s, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; cached in {cache}", flush=True)
    models.save_pretrained(params, exp.model_config, cache, tokenizer_dir=None)
    return params
