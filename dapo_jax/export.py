"""Export a trained policy as a Hugging Face directory that transformers loads and generates from.

  python -m dapo_jax.export --workdir WORKDIR [--step N] --out DIR [--dtype bfloat16]
  python -m dapo_jax.export --model PATH --out DIR

`--workdir` reads a training workdir (local or gs://): the parameters of its latest complete
checkpoint (or `--step`), the architecture the checkpoint recorded, and the tokenizer and stop tokens
of the run record (`<workdir>/run/`). `--model` converts any checkpoint `model.path` accepts (a HF
directory, a .gguf file or a Hub id) instead. `--out` (local or gs://) receives config.json, the
safetensors shards (+ index), the tokenizer files and a generation_config.json whose `eos_token_id`
lists every stop token the run sampled with (e.g. `<|im_end|>` and `<|endoftext|>`), so
`model.generate` stops where the policy's rollouts stopped.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from dapo_jax.runtime.cli_errors import VERBOSE_HELP, MissingFileError, UserError, parse_flags, run_cli

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def default_stop_tokens() -> list[str]:
    """The stop tokens of configs/base.py (what a run samples with unless its config says else)."""
    from configs.base import get_base_config
    return list(get_base_config().tokenizer.stop_tokens)


def generation_config(tokenizer: Any, stop_tokens: Sequence[str]) -> dict[str, Any]:
    """generation_config.json: `eos_token_id` is every stop id the sampler used (the tokenizer's EOS
    plus each stop token it knows, `experiment.stop_and_pad_ids`), `pad_token_id` the sampler's pad."""
    from dapo_jax.experiment import stop_and_pad_ids

    stop_ids, pad_id = stop_and_pad_ids(tokenizer, list(stop_tokens))
    out: dict[str, Any] = {"eos_token_id": list(stop_ids), "pad_token_id": pad_id}
    if tokenizer.bos_token_id is not None:
        out["bos_token_id"] = int(tokenizer.bos_token_id)
    return out


def _export_mesh():
    from dapo_jax.models.sharding import make_mesh
    return make_mesh()  # every local device on fsdp: the parameters never sit whole on one device


def export_workdir(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
                   max_shard_bytes: int = 4 * 2**30) -> dict[str, Any]:
    """Writes checkpoint `step` (default: latest) of a training workdir to `out` as a HF directory.

    Returns {"step", "out", "eos_token_id"}.
    """
    from dapo_jax import models
    from dapo_jax.training import checkpointing, run_record

    params, cfg, step = checkpointing.restore_workdir_params(workdir, step, _export_mesh(),
                                                             flag="--workdir")
    p = checkpointing.workdir_path(workdir)
    tok_dir = run_record.workdir_tokenizer(p)
    if tok_dir is None:
        recorded = run_record.recorded_config(p) or {}
        tok_dir = (recorded.get("tokenizer", {}).get("path")
                   or recorded.get("model", {}).get("path") or None)
    if tok_dir is None:
        raise MissingFileError(f"--workdir {workdir} records no tokenizer ({run_record.RUN_DIR}/"
                               f"{run_record.TOKENIZER_DIR}/ is missing: the run predates run "
                               "records); export cannot write the tokenizer files")
    tokenizer = models.load_tokenizer(tok_dir)
    stop_tokens = run_record.recorded_stop_tokens(p)
    gen = generation_config(tokenizer, default_stop_tokens() if stop_tokens is None else stop_tokens)
    models.save_pretrained(params, cfg, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                           tokenizer_dir=tok_dir, generation_config=gen)
    log.info("exported step %d of %s to %s", step, workdir, out)
    return {"step": step, "out": out, "eos_token_id": gen["eos_token_id"]}


def export_model(path: str, out: str, *, dtype: str | None = None,
                 max_shard_bytes: int = 4 * 2**30) -> dict[str, Any]:
    """Writes any checkpoint `model.path` accepts (HF directory, .gguf file, Hub id) to `out` as a HF
    directory; its generation_config.json is the source's when it has one, else built from the
    tokenizer and the default stop tokens. Returns {"out", "eos_token_id"}."""
    import json

    from etils import epath

    from dapo_jax import models
    from dapo_jax.models import sources
    from dapo_jax.models.hf_checkpoint import read_hf_config

    source = sources.resolve(path)  # MissingFileError naming `path` when it is nothing we read
    load_dtype = dtype or ("float32" if source.is_gguf else None)
    if load_dtype is None:  # keep the checkpoint's own dtype
        load_dtype = models.from_hf_config(read_hf_config(source.local)).hf_torch_dtype
        load_dtype = load_dtype if load_dtype in DTYPES else "float32"
    model, cfg = models.load_pretrained(source.local, dtype=load_dtype, mesh=_export_mesh())
    tokenizer = models.load_tokenizer(source.local)
    own = None if source.is_gguf else epath.Path(source.local) / "generation_config.json"
    if own is not None and own.exists():
        gen = json.loads(own.read_text())
    else:
        gen = generation_config(tokenizer, default_stop_tokens())
    models.save_pretrained(model, cfg, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                           tokenizer_dir=source.local, generation_config=gen)
    log.info("exported %s to %s", path, out)
    return {"out": out, "eos_token_id": gen.get("eos_token_id")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from absl import flags

    flags_ = flags.FlagValues()
    argv = list(argv if argv is not None else sys.argv)
    flags.DEFINE_string("workdir", None, "Training workdir to export (local or gs://).",
                        flag_values=flags_)
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).",
                         flag_values=flags_)
    flags.DEFINE_string("model", None, "Instead of --workdir: a HF directory, .gguf file or Hub id.",
                        flag_values=flags_)
    flags.DEFINE_string("out", None, "Output HF directory (local or gs://).", flag_values=flags_)
    flags.DEFINE_enum("dtype", None, list(DTYPES), "Tensor dtype to write (default: the "
                      "checkpoint's).", flag_values=flags_)
    flags.DEFINE_float("max_shard_gb", 4.0, "Largest safetensors file, in GiB.", flag_values=flags_)
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=flags_)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
        print(__doc__)
        print(flags_.get_help())
        sys.exit(0)
    rest = parse_flags(argv, flags_)
    if len(rest) > 1:
        raise UserError(f"unexpected arguments {rest[1:]}: every option is a --flag (see --help)")
    if bool(flags_.workdir) == bool(flags_.model):
        raise UserError("give exactly one of --workdir WORKDIR (a training run) or --model PATH (a HF "
                        "directory, .gguf file or Hub id)")
    if not flags_.out:
        raise UserError("--out is required: the HF directory to write (local or gs://)")
    if flags_.step is not None and not flags_.workdir:
        raise UserError("--step selects a checkpoint of --workdir; --model has no steps")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it reads at INFO
    logging.getLogger("dapo_jax").setLevel(logging.INFO)
    max_shard_bytes = int(flags_.max_shard_gb * 2**30)
    if flags_.workdir:
        result = export_workdir(flags_.workdir, flags_.out, step=flags_.step, dtype=flags_.dtype,
                                max_shard_bytes=max_shard_bytes)
        print(f"exported step {result['step']} of {flags_.workdir} to {flags_.out} "
              f"(eos_token_id {result['eos_token_id']})", flush=True)
    else:
        result = export_model(flags_.model, flags_.out, dtype=flags_.dtype,
                              max_shard_bytes=max_shard_bytes)
        print(f"exported {flags_.model} to {flags_.out}", flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)  # user errors: `error: ...` and exit status 2, no traceback
