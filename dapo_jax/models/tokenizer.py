"""Tokenizer loading via transformers.AutoTokenizer: from a checkpoint or tokenizer directory (local or
gs://), a .gguf file (its vocabulary and chat template) or a Hub id (see `sources.resolve`)."""

from __future__ import annotations

import os
import tempfile

from etils import epath

from dapo_jax.runtime.cli_errors import MissingFileError, UserError


def load_tokenizer(path: str | os.PathLike):
    """Loads the tokenizer saved beside a checkpoint (tokenizer.json + tokenizer_config.json), the
    one inside a .gguf file, or a Hub repository's."""
    from transformers import AutoTokenizer

    from dapo_jax.models import gguf_checkpoint, sources

    p = epath.Path(path)
    if not ((p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists()):
        # A .gguf file (or a folder holding one), or a Hub id; raises naming `path` otherwise.
        try:
            source = sources.resolve(path)
        except FileNotFoundError as e:
            raise MissingFileError(f"cannot load a tokenizer from {path} (config.tokenizer.path, or "
                                   f"model.path when that is empty): {e}") from e
        if source.is_gguf:
            return gguf_checkpoint.load_tokenizer(source.local)
        path = p = epath.Path(source.local)
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise MissingFileError(
            f"No tokenizer.json / tokenizer_config.json in {path}. Point the tokenizer path at a Hugging "
            "Face checkpoint or tokenizer folder (e.g. ../shared/data/tokenizers/qwen2.5).")
    local = os.fspath(path)
    if str(path).startswith(("gs://", "s3://")):
        local = tempfile.mkdtemp(prefix="dapo_jax_tok_")
        for f in p.iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
                f.copy(epath.Path(local) / f.name)
    try:
        return AutoTokenizer.from_pretrained(local)
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises plain Exceptions for corrupt files
        raise UserError(f"{path}: the tokenizer files cannot be read ({type(e).__name__}: "
                        f"{str(e)[:200]}); they are corrupt or from an unsupported tokenizer: copy "
                        "them again from the model's Hugging Face folder") from e
