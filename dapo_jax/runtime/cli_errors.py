"""User errors at the command line: one plain paragraph and exit status 2; tracebacks are for bugs.

Code at the boundaries (config validation, data, model and tokenizer loading, workdir and resume
checks, responses files, topologies) raises a `UserError` (or `data_pipeline.DataError`) whose
message names the field or file and the fix. The entry points (`train`, `evaluate`, `export`, `plan`,
`demo`) run through `run_cli`: such an error prints `error: <message>` on stderr and exits with status 2;
any other exception keeps its traceback, since it is a bug. `--verbose` shows the traceback of user
errors too.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, NoReturn, Sequence, TypeVar

EXIT_USER_ERROR = 2
VERBOSE_HELP = "Show the Python traceback of user errors (bad config, data, model or paths) too."

T = TypeVar("T")


class UserError(ValueError):
    """Bad user input; the message names the field or file and how to fix it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (still a FileNotFoundError for callers)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type that means bad input rather than a bug."""
    from absl import flags

    from data_pipeline.records import DataError
    return (UserError, DataError, flags.Error)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, user_error_types())


def wants_verbose(argv: Sequence[str]) -> bool:
    """Whether the command line asks for tracebacks (`--verbose`, `--verbose=true`)."""
    return any(a == "--verbose" or a.lower() in ("--verbose=true", "--verbose=1") for a in argv)


def one_paragraph(message: str) -> str:
    """`message` as one line: a multi-line list (e.g. every invalid config field) joins by '; '."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()]
    out = ""
    for part in parts:
        out = part if not out else out + (" " if out.endswith(":") else "; ") + part
    return out


def exit_user_error(error: BaseException | str, *, verbose: bool = False) -> NoReturn:
    """Prints `error: <message>` (with the traceback when `verbose`) on stderr; exits with 2."""
    if verbose and isinstance(error, BaseException):
        traceback.print_exception(error, file=sys.stderr)
    message = error if isinstance(error, str) else (str(error) or type(error).__name__)
    print(f"error: {one_paragraph(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run_cli(main: Callable[[], T], argv: Sequence[str] | None = None) -> T:
    """Runs `main()`; a user error ends the process (`exit_user_error`), anything else propagates."""
    argv = sys.argv if argv is None else argv
    try:
        return main()
    except user_error_types() as error:
        exit_user_error(error, verbose=wants_verbose(argv))


def parse_flags(argv: Sequence[str], flag_values=None) -> list[str]:
    """Parses `argv` into absl flags (default: the global FLAGS); returns the other arguments.

    A bad flag value, a `--config.x=y` override naming no config field (ml_collections raises
    AttributeError / KeyError for those) or a config file that does not load (ml_collections defers
    that error to the config's first use) raises a UserError.
    """
    from absl import flags
    values = flags.FLAGS if flag_values is None else flag_values
    try:
        rest = values(list(argv))
    except flags.Error as error:
        raise UserError(f"{error} (see --helpfull for every flag)") from error
    except (AttributeError, KeyError) as error:
        raise UserError(_unknown_field_message(error, argv)) from error
    for name in values:
        flag = values[name]
        # ml_collections' placeholder for a config file that failed to load
        if type(flag.value).__name__ == "_ErrorConfig":
            cause = object.__getattribute__(flag.value, "_error")
            path = getattr(flag, "config_filename", "")
            raise UserError(f"--{name} {path}: the config file cannot "
                            f"be loaded ({one_paragraph(str(cause))}); give an existing file, e.g. "
                            f"--{name} configs/toy.py[:variant]")
    return rest


def _unknown_field_message(error: BaseException, argv: Sequence[str]) -> str:
    """'--config.trainer.totl_steps=3: ...' for an override that names no config field."""
    detail: object = error
    while isinstance(detail, BaseException) and detail.args:
        detail = detail.args[0]
    lines = str(detail).splitlines()
    key = lines[0].strip("'\"") if lines else ""
    hint = " ".join(line.strip() for line in lines[1:])
    bad = [a.split("=", 1)[0] for a in argv
           if a.startswith("--") and "." in a.split("=", 1)[0] and key
           and key in a.split("=", 1)[0].split(".")]
    where = bad[0] if bad else "a --config.a.b=value override"
    return (f"{where}: the config has no field {key!r}. {hint} Fix the spelling; the config file "
            "lists every field").replace("  ", " ")


def absl_flags_parser(argv: list[str]) -> list[str]:
    """`app.run(main, flags_parser=...)`: bad flags, unknown config fields and config files that do
    not load are user errors (status 2, no `FATAL` banner or traceback)."""
    try:
        return parse_flags(argv)
    except UserError as error:
        exit_user_error(error, verbose=wants_verbose(argv))
