"""Turns PromptRecords into prompt token ids with the tokenizer's chat template, cut to a length.

Prompts longer than `max_prompt_length` are handled as verl's `data.truncation`: "left" keeps the
last tokens (the question and the generation prompt; the default), "right" keeps the first, "error"
refuses. Each batch with over-long prompts logs a warning with their count.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from data_pipeline.records import Message, PromptRecord

# A system message no dataset contains: rendered, then cut off, to learn where the template's
# system block ends (see `_render_without_system`).
_SENTINEL = "<<dapo_jax system sentinel 7f3a>>"

TRUNCATION_MODES = ("left", "right", "error")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RenderedPrompts:
    """Prompt token ids (cut to max_prompt_length) plus what was rendered and how much was cut."""

    token_ids: list[list[int]]
    texts: list[str]
    original_lengths: list[int]
    max_prompt_length: int

    @property
    def num_truncated(self) -> int:
        """Prompts longer than max_prompt_length (cut as `truncation` said)."""
        return sum(n > self.max_prompt_length for n in self.original_lengths)

    @property
    def stats(self) -> dict[str, float]:
        """Scalar summaries for logging (`prompt_length/*`)."""
        lengths = [len(ids) for ids in self.token_ids]
        count = max(len(lengths), 1)
        return {
            "prompt_length/mean": sum(lengths) / count,
            "prompt_length/max": float(max(lengths, default=0)),
            "prompt_length/min": float(min(lengths, default=0)),
            "prompt_length/num_truncated": float(self.num_truncated),
            "prompt_length/truncated_ratio": self.num_truncated / count,
        }


def _with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Puts `system_prompt` first, replacing a system message the record may already carry."""
    if system_prompt is None:
        return messages
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system_prompt}, *rest]


def _render_without_system(tokenizer: Any, messages: list[Message]) -> str:
    """Renders with the chat template but without any system block, even one the template would inject.

    Qwen2.5's template adds "You are Qwen, created by Alibaba Cloud..." whenever the first message
    is not a system message. So we render with a sentinel system message (which suppresses the
    default), render that system message alone, and cut that prefix off: what is left is exactly
    the conversation the template produces after its system block.
    """
    sentinel = [{"role": "system", "content": _SENTINEL}]
    try:
        full = tokenizer.apply_chat_template(sentinel + messages, tokenize=False, add_generation_prompt=True)
        head = tokenizer.apply_chat_template(sentinel, tokenize=False, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - templates that reject a system role cannot inject one either
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(head) or _SENTINEL in full[len(head):]:
        raise ValueError(
            "cannot strip the system block this chat template renders; pass system_prompt=... or "
            "apply_chat_template=False"
        )
    return full[len(head):]


def render_prompt_text(
    tokenizer: Any,
    record: PromptRecord,
    *,
    system_prompt: str | None = None,
    apply_chat_template: bool = True,
) -> str:
    """The prompt string of one record: chat template with generation prompt, or the raw message text."""
    messages = _with_system(list(record["prompt"]), system_prompt)
    if not apply_chat_template:
        # Base-model style: no chat markup, messages separated by blank lines.
        return "\n\n".join(m["content"] for m in messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer has no chat_template; pass apply_chat_template=False to render raw text")
    if system_prompt is None and not any(m["role"] == "system" for m in messages):
        return _render_without_system(tokenizer, messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompts(
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    max_prompt_length: int,
    system_prompt: str | None = None,
    apply_chat_template: bool = True,
    truncation: str = "left",
) -> RenderedPrompts:
    """Renders, tokenises and cuts prompts to `max_prompt_length` tokens.

    `truncation`: "left" keeps the last tokens, "right" the first, "error" raises (naming how many
    prompts are too long and the fixes). Over-long prompts are logged as a warning with their count.
    `system_prompt=None` means no system message at all (the template's default is stripped);
    a string is rendered as the system message. Special tokens come from the chat template, so the
    tokenizer adds none of its own unless the template is off.
    """
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    texts = [
        render_prompt_text(tokenizer, r, system_prompt=system_prompt, apply_chat_template=apply_chat_template)
        for r in records
    ]
    encoded = tokenizer(texts, add_special_tokens=not apply_chat_template)["input_ids"] if texts else []
    too_long = [len(ids) for ids in encoded if len(ids) > max_prompt_length]
    if too_long and truncation == "error":
        raise ValueError(
            f"{len(too_long)} of {len(encoded)} prompts are longer than data.max_prompt_length="
            f"{max_prompt_length} tokens (longest {max(too_long)}); raise data.max_prompt_length or "
            "set data.truncation to 'left' (keep the end) or 'right' (keep the beginning)")
    if too_long:
        log.warning("%d of %d prompts are longer than data.max_prompt_length=%d tokens (longest "
                    "%d); cut on the %s (data.truncation=%s)", len(too_long), len(encoded),
                    max_prompt_length, max(too_long), truncation, truncation)
    cut = ((lambda ids: ids[-max_prompt_length:]) if truncation == "left"
           else (lambda ids: ids[:max_prompt_length]))
    return RenderedPrompts(
        token_ids=[list(cut(ids)) for ids in encoded],
        texts=texts,
        original_lengths=[len(ids) for ids in encoded],
        max_prompt_length=max_prompt_length,
    )
