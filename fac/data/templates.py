"""Command templates: an external program (a synthesiser, a detokenizer) run through bash from a template whose
`{placeholders}` are checked by name (string.Formatter) and filled with shell-quoted values. Light on purpose: the
workflow checks templates while it parses, before any job (rules/common.smk)."""
from __future__ import annotations

import shlex
import string
import subprocess

# A template params may give: its key, every placeholder it may hold, and those it must hold.
DETOKENIZER_COMMAND = ("detokenizer.command", {"units", "out", "speaker", "sample_rate"}, {"units", "out", "speaker"})
TTS_COMMAND = ("tts.command", {"text", "voice", "out", "rate", "pitch", "amplitude"}, {"text", "voice", "out"})


def placeholders(template: str) -> set[str]:
    """The `{name}` fields of a template (a doubled brace is a literal one)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, key: str, fields: set[str], required: set[str]) -> str:
    """`template` when its placeholders are among `fields` and hold every one of `required`; else a ValueError
    naming `key` (the params key), the template, what is unknown or lacking, and what is expected."""
    try:
        found = placeholders(template)
    except ValueError as error:  # a lone brace
        raise ValueError(f"{key} {template!r}: not a template ({error}); write a literal brace as {{{{ or }}}}") from error
    unknown, missing = sorted(found - fields), sorted(required - found)
    if unknown or missing:
        optional = sorted(fields - required)
        raise ValueError(f"{key} {template!r}: " + "; ".join(
            ([f"unknown placeholder(s) {unknown}"] if unknown else []) + ([f"lacks {missing}"] if missing else []))
            + f"; expected {', '.join('{' + f + '}' for f in sorted(required))}"
            + (f", optionally {', '.join('{' + f + '}' for f in optional)}" if optional else ""))
    return template


def fill(template: str, values: dict) -> str:
    """The command line: `template` with every value shell-quoted."""
    return template.format(**{name: shlex.quote(str(value)) for name, value in values.items()})


def run(command: str, key: str, context: str = "") -> subprocess.CompletedProcess:
    """Run `command` with bash; a non-zero exit is a RuntimeError naming `key`, what it was asked (`context`, e.g.
    " on text 'hi'"), the command and its stderr's tail."""
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{key} failed (exit {result.returncode}){context}: {command}\n"
                           f"{result.stderr.strip()[-2000:]}")
    return result
