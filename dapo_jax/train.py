"""Entry point: `python -m dapo_jax.train --config configs/X.py[:arg] --workdir DIR [--config.a.b=v]`.

List fields take comma-separated values: `--config.data.val=aime2024,math500`. The run records itself
in <workdir>/run/ (config, its diff from configs/base.py, commit, versions, tokenizer, console log).
Restarting with the same --workdir resumes from its latest complete checkpoint. On SIGTERM (TPU spot
preemption) the current step finishes, a checkpoint is saved and the process exits with code 42.
A user error (bad flag, config, data, model or workdir) prints one `error: ...` paragraph and exits
with status 2; `--verbose` adds the traceback.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from dapo_jax.runtime.cli_errors import VERBOSE_HELP, UserError, absl_flags_parser, run_cli

config_flags.DEFINE_config_file("config", "configs/toy.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here (local or gs://).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 (GPU "
                    "clusters / local tests; TPU VMs are detected automatically).")
flags.DEFINE_integer("num_processes", None, "Multi-process: total number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool("progress", None, "Progress bars (default: when stderr is a TTY).")
flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
flags.DEFINE_enum("library_log_level", "WARNING", ["DEBUG", "INFO", "WARNING", "ERROR"],
                  "Log level of libraries (Orbax logs every checkpoint file at INFO); dapo_jax's own "
                  "logs stay at INFO.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    import jax

    from dapo_jax.runtime import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from dapo_jax.config_validation import validate_config
    from dapo_jax.training.trainer import PREEMPTED_EXIT_CODE, Preempted, Trainer, prepare_workdir

    if not FLAGS.workdir:
        raise UserError("--workdir is required: pass --workdir DIR (checkpoints, metrics and logs "
                        "go there; local or gs://)")
    for name in ("", "absl"):  # Orbax logs through absl's logger
        logging.getLogger(name).setLevel(FLAGS.library_log_level)
    for name in ("dapo_jax", "data_pipeline"):
        logging.getLogger(name).setLevel(logging.INFO)
    validate_config(FLAGS.config, jax.device_count())  # fail fast, before any file is written
    prepare_workdir(FLAGS.workdir)
    distributed.check_shared_directory(FLAGS.workdir)
    is_main = jax.process_index() == 0
    if is_main:  # <workdir>/run/console.log (the rest of <workdir>/run/ is written by the Trainer)
        from dapo_jax.training.run_record import tee_console
        tee_console(FLAGS.workdir)
    from dapo_jax.runtime import compile_cache
    compile_cache.enable(FLAGS.config.trainer.get("compilation_cache_dir", compile_cache.AUTO),
                         FLAGS.workdir)
    cache_use = compile_cache.counter()
    # One progress bar per job, not per host (process 0 also prints the step lines).
    trainer = Trainer(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress if is_main else False)
    try:
        trainer.train()
    except Preempted as e:
        if is_main:
            print(str(e), flush=True)
        trainer.close()
        sys.exit(PREEMPTED_EXIT_CODE)
    finally:
        if is_main and jax.config.jax_compilation_cache_dir:
            print(compile_cache.summary(cache_use()), flush=True)
    trainer.close()


if __name__ == "__main__":
    # User errors (bad flags, config, data, model, workdir): `error: ...`, exit status 2, no traceback.
    app.run(lambda argv: run_cli(lambda: main(argv)), flags_parser=absl_flags_parser)
