"""The configuration table of the README, generated from the Settings fields so that it cannot drift from them.

Regenerate it after changing a setting:
`python -c "from app.config_docs import configuration_table; print(configuration_table())"`
and paste the output between the README's configuration-table markers (a test checks they agree).
"""

from __future__ import annotations

from enum import Enum
from pathlib import PurePath

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from app.settings import Settings

HEADER = "| Variable | Default | Description |\n| --- | --- | --- |"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
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
