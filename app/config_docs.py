"""Tables of the documentation generated from the code, so that they cannot drift from it.

The configuration table of docs/configuration.md and the settings of .env.example come from the Settings fields;
the table of modes in README.md from ensemble_contract.modes. Regenerate them after changing a setting or a mode:
`python -c "from app.config_docs import configuration_table; print(configuration_table())"` (or `modes_table()`)
and paste the output between the file's markers (tests/test_settings.py and tests/test_docs.py check they agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import PurePath

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from app.settings import Settings
from ensemble_contract.modes import AUTO, CHOICE_DESCRIPTIONS, COMPARE, MODES, ThreadPolicy

HEADER = "| Variable | Default | Description |\n| --- | --- | --- |"
MODES_HEADER = "| Mode | What one inference runs | Intra-op threads of each session |\n| --- | --- | --- |"
THREADS = {
    ThreadPolicy.ALL_CORES: "cores ÷ slots",
    ThreadPolicy.CORES_SHARED_BY_MEMBERS: "cores ÷ slots ÷ members, 1 at least",
}
CHOICE_THREADS = {COMPARE: "those of the mode it runs", AUTO: "chosen with the mode"}


def _default_text(field: FieldInfo) -> str | None:
    """The default as its environment variable would spell it; None when unset."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return None
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, Enum):
        text = str(value.value)
    elif isinstance(value, PurePath):
        text = value.as_posix()
    elif isinstance(value, list | tuple | set | frozenset):
        text = ",".join(map(str, value))  # as the environment variable would spell it
    else:
        text = str(value)
    return text


def _default(field: FieldInfo) -> str:
    text = _default_text(field)
    if text is None:
        return "unset"
    return f"`{text}`" if text else "empty"


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def configuration_table(settings: type[BaseSettings] = Settings) -> str:
    """A Markdown table of the settings' environment variables: name, default, description."""
    rows = [
        f"| `{name.upper()}` | {_cell(_default(field))} | {_cell(field.description or '')} |"
        for name, field in settings.model_fields.items()
    ]
    return "\n".join([HEADER, *rows])


def env_lines(names: Sequence[str], settings: type[BaseSettings] = Settings) -> str:
    """`# NAME=default` for each setting named (nothing after `=` when unset): .env.example's list."""
    fields = settings.model_fields
    return "\n".join(f"# {name}={_default_text(fields[name.lower()]) or ''}" for name in names)


def modes_table() -> str:
    """A Markdown table of the modes a request can ask for: what each runs and how its sessions use the cores."""
    rows = [f"| `{spec.mode}` | {_cell(spec.description)} | {THREADS[spec.threads]} |" for spec in MODES.values()]
    rows += [
        f"| `{choice}` | {_cell(text)} | {CHOICE_THREADS[choice]} |" for choice, text in CHOICE_DESCRIPTIONS.items()
    ]
    return "\n".join([MODES_HEADER, *rows])
