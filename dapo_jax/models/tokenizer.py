"""Tokenizer loading from a checkpoint directory (local or gs://) via transformers.AutoTokenizer."""

from __future__ import annotations

import os
import tempfile

from etils import epath


def load_tokenizer(path: str | os.PathLike):
    """Loads the tokenizer saved beside a checkpoint (tokenizer.json + tokenizer_config.json)."""
    from transformers import AutoTokenizer

    p = epath.Path(path)
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"No tokenizer.json / tokenizer_config.json in {path}. Point the tokenizer path at a Hugging "
            "Face checkpoint or tokenizer folder (e.g. ../shared/data/tokenizers/qwen2.5).")
    local = os.fspath(path)
    if str(path).startswith(("gs://", "s3://")):
        local = tempfile.mkdtemp(prefix="dapo_jax_tok_")
        for f in p.iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
                f.copy(epath.Path(local) / f.name)
    return AutoTokenizer.from_pretrained(local)
