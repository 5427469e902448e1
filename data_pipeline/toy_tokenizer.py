"""A few-hundred-token BPE tokenizer for the toy task, saved so AutoTokenizer loads it like a real checkpoint's."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from etils import epath
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|im_end|>"
# Order fixes the ids: pad is 0 so zero-initialised buffers are padding.
SPECIAL_TOKENS = (PAD_TOKEN, "<|endoftext|>", "<|im_start|>", EOS_TOKEN)

# ChatML without a default system message: what you pass is exactly what is rendered.
TOY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_ROLE_HEADERS = ("system\n", "user\n", "assistant\n")


def _training_texts(corpus_texts: Iterable[str]) -> Iterator[str]:
    """The corpus plus one chat-role header per text, so "user"/"assistant" merge like template words."""
    for i, text in enumerate(corpus_texts):
        if not isinstance(text, str):
            raise TypeError(f"corpus_texts[{i}] must be a string, got {type(text).__name__}")
        yield text
        yield _ROLE_HEADERS[1]
        yield _ROLE_HEADERS[2]


def build_toy_tokenizer(
    out_dir: epath.PathLike,
    corpus_texts: Iterable[str],
    *,
    vocab_size: int = 384,
    model_max_length: int = 1024,
) -> epath.Path:
    """Trains a byte-level BPE (digits always single tokens) on `corpus_texts`; writes tokenizer(_config).json.

    Byte-level so any text round-trips; digits are split one per token so numbers are digit
    sequences, as in Qwen2.5. Training is deterministic: the same corpus gives the same files.
    Returns `out_dir`, loadable with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    min_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is below the {min_vocab} byte + special tokens; raise it")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_texts(corpus_texts), trainer=trainer)

    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": TOY_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def toy_corpus(records: Iterable[dict]) -> list[str]:
    """The texts the toy tokenizer is trained on: each problem's raw prompt and worked solution."""
    from data_pipeline.rendering import render_prompt_text
    from data_pipeline.toy_arithmetic import toy_worked_solution

    corpus = []
    for rec in records:
        corpus.append(render_prompt_text(None, rec, apply_chat_template=False))
        corpus.append(toy_worked_solution(rec))
    return corpus
