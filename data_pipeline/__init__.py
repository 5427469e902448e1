"""Datasets for DAPO: readers, TFDS builders, the grain loader, prompt rendering and the toy task."""
from data_pipeline.loader import PromptBatchIterator, get_state_bytes, make_batch_dataset
from data_pipeline.records import (
    DAPO_TEMPLATE,
    SHORT_TEMPLATE,
    LoadStats,
    MalformedRow,
    Message,
    PromptRecord,
    PromptTemplate,
    get_template,
)
from data_pipeline.rendering import RenderedPrompts, render_prompt_text, render_prompts
from data_pipeline.sources import load_dapo_parquet, load_jsonl_problems, load_prompt_records
from data_pipeline.tfds_builders import (
    Aime2024,
    DapoMath17k,
    RecordDataSource,
    ToyArithmetic,
    build_tfds_dataset,
    decode_example,
    encode_record,
    load_tfds_records,
    make_builder,
    record_features,
)
from data_pipeline.toy_arithmetic import (
    TOY_DATA_SOURCE,
    ToyArithmeticConfig,
    evaluate_expression,
    generate_toy_arithmetic,
    toy_worked_solution,
)
from data_pipeline.toy_tokenizer import (SPECIAL_TOKENS, TOY_CHAT_TEMPLATE, build_toy_tokenizer,
                                         toy_corpus)

__all__ = [
    "Aime2024",
    "DAPO_TEMPLATE",
    "DapoMath17k",
    "LoadStats",
    "MalformedRow",
    "Message",
    "PromptBatchIterator",
    "PromptRecord",
    "PromptTemplate",
    "RecordDataSource",
    "RenderedPrompts",
    "SHORT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TOY_CHAT_TEMPLATE",
    "TOY_DATA_SOURCE",
    "ToyArithmetic",
    "ToyArithmeticConfig",
    "build_tfds_dataset",
    "build_toy_tokenizer",
    "toy_corpus",
    "decode_example",
    "encode_record",
    "evaluate_expression",
    "generate_toy_arithmetic",
    "get_state_bytes",
    "get_template",
    "load_dapo_parquet",
    "load_jsonl_problems",
    "load_prompt_records",
    "load_tfds_records",
    "make_batch_dataset",
    "make_builder",
    "record_features",
    "render_prompt_text",
    "render_prompts",
    "toy_worked_solution",
]
