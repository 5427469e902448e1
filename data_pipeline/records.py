"""The prompt record every loader produces, the DAPO prompt templates, and per-row validation."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, TypedDict

logger = logging.getLogger(__name__)


class Message(TypedDict):
    """One chat message."""

    role: str
    content: str


class PromptRecord(TypedDict):
    """A normalised prompt: what the trainer, the sampler and the reward function see."""

    id: str
    data_source: str
    prompt: list[Message]
    ground_truth: str
    extra: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Instruction text wrapped around a bare problem statement."""

    prefix: str
    suffix: str

    def wrap(self, problem: str) -> str:
        """Returns `problem` with the instruction prefix and the answer-line reminder around it."""
        return self.prefix + problem + self.suffix


# The exact DAPO training / AIME evaluation template (DAPO-Math-17k rows already contain it).
DAPO_TEMPLATE = PromptTemplate(
    prefix=(
        "Solve the following math problem step by step. The last line of your response should be "
        "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    ),
    suffix='\n\nRemember to put your answer on its own line after "Answer:".',
)

# Same shape, far fewer tokens: keeps toy prompts at ~20-40 tokens for the CPU demo.
SHORT_TEMPLATE = PromptTemplate(
    prefix="Solve step by step. The last line is Answer: $Answer\n\n",
    suffix='\n\nEnd with "Answer:".',
)

TEMPLATES: dict[str, PromptTemplate] = {"dapo": DAPO_TEMPLATE, "short": SHORT_TEMPLATE}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """Resolves a template given by name ("dapo", "short") or passed as a PromptTemplate."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise DataError(f"template={template!r} is unknown: set config.data.template to one of "
                        f"{sorted(TEMPLATES)}")
    return TEMPLATES[template]


class MalformedRow(ValueError):
    """A source row that cannot become a PromptRecord; the message says which field is wrong."""


class DataError(ValueError):
    """A dataset the user named is missing, unreadable or empty; the message names the file and the
    fix. The command-line entry points report it without a traceback (dapo_jax.runtime.cli_errors)."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A dataset file or folder does not exist (still a FileNotFoundError for callers)."""


def validate_messages(prompt: Any) -> list[Message]:
    """Checks a chat prompt (non-empty list of {role, content} strings) and returns a clean copy."""
    if not isinstance(prompt, (list, tuple)):
        raise MalformedRow(f"prompt must be a list of {{role, content}} messages, got {type(prompt).__name__}")
    if not prompt:
        raise MalformedRow("prompt is an empty list")
    messages: list[Message] = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise MalformedRow(f"prompt[{i}] must be a {{role, content}} dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise MalformedRow(f"prompt[{i}].role must be a non-empty string, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise MalformedRow(f"prompt[{i}].content must be a non-empty string, got {content!r:.40}")
        messages.append({"role": role, "content": content})
    return messages


def validate_answer(answer: Any, field: str) -> str:
    """Returns the answer as a non-empty string; ints are accepted (JSONL AIME answers), bools/floats are not."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise MalformedRow(f"{field} must be a string or an integer, got {type(answer).__name__}")
    text = str(answer).strip()
    if not text:
        raise MalformedRow(f"{field} is empty")
    return text


@dataclasses.dataclass
class LoadStats:
    """What a loader read, kept, dropped, and why."""

    source: str
    conflict_policy: str = "keep_first"
    num_rows: int = 0
    num_records: int = 0
    num_duplicates: int = 0
    num_conflicting_duplicates: int = 0
    num_malformed: int = 0
    malformed_examples: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    conflict_examples: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    max_examples: int = 5

    def skip(self, row: int, reason: str) -> None:
        """Counts a malformed row and remembers the first few (row index + reason)."""
        self.num_malformed += 1
        if len(self.malformed_examples) < self.max_examples:
            self.malformed_examples.append((row, reason))

    def conflict(self, row: int, reason: str) -> None:
        """Counts a row whose prompt repeats an earlier one with a different ground truth."""
        self.num_conflicting_duplicates += 1
        if len(self.conflict_examples) < self.max_examples:
            self.conflict_examples.append((row, reason))

    def log(self) -> None:
        """Logs a one-line summary and the first few skipped rows."""
        logger.info(
            "%s: %d rows -> %d records (%d duplicates, %d conflicting duplicates, %d malformed)",
            self.source, self.num_rows, self.num_records, self.num_duplicates,
            self.num_conflicting_duplicates, self.num_malformed,
        )
        if self.num_malformed:
            shown = "; ".join(f"row {row}: {reason}" for row, reason in self.malformed_examples)
            logger.warning("%s: skipped %d malformed rows, first ones: %s", self.source, self.num_malformed, shown)
        if self.num_conflicting_duplicates:
            shown = "; ".join(f"row {row}: {reason}" for row, reason in self.conflict_examples)
            logger.warning(
                "%s: %d rows repeat an earlier prompt with a different ground truth (on_conflict=%s): %s",
                self.source, self.num_conflicting_duplicates, self.conflict_policy, shown,
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view for metrics / run logs."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "max_examples"}
