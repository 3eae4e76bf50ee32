"""The README's "The CLI" block is the parser's usage, command by command: every flag (and its
metavar) a command's --help has, and no other."""

from __future__ import annotations

import argparse
from pathlib import Path

from paramserve.service.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def usage_parts(parser: argparse.ArgumentParser, own_only: bool = True) -> list[str]:
    """A parser's arguments as its usage writes them; global flags repeated after a command
    (their default is SUPPRESS there) left out, as the README shows them once."""
    parser.format_help()  # adds serve's flags
    parts = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if own_only and action.option_strings and action.default is argparse.SUPPRESS \
                and action.dest != "version":
            continue
        if not action.option_strings:
            metavar = action.metavar or action.dest
            parts.append(f"[{metavar}]" if action.nargs == "?" else metavar)
            continue
        flag = next((o for o in action.option_strings if o.startswith("--")),
                    action.option_strings[0])
        metavar = parser._get_formatter()._metavar_formatter(action, action.dest.upper())(1)[0]
        text = flag if action.nargs == 0 else f"{flag} {metavar}"
        parts.append(text if action.required else f"[{text}]")
    return parts


def commands() -> dict[str, argparse.ArgumentParser]:
    subs = dict(build_parser()._subparsers._group_actions[0].choices)
    db = subs.pop("db")
    subs["db upgrade"] = db._subparsers._group_actions[0].choices["upgrade"]
    return subs


def readme_block() -> str:
    section = README.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    return section.split("```\n", 2)[1]


def readme_usages() -> dict[str, str]:
    """{command: usage} from the README block: an entry starts at ``paramserve``, goes on
    over indented lines, and a ``#`` starts a comment."""
    entries, current = {}, None
    for line in readme_block().splitlines():
        text = line.split("  #", 1)[0].rstrip()
        if text.startswith("paramserve "):
            current = text
            entries[current] = current
        elif text.strip() and current:
            entries[current] += " " + text.strip()
    out = {}
    for entry in entries.values():
        words = entry.split()[1:]
        name = " ".join(words[:2]) if words[:2] == ["db", "upgrade"] else (
            words[0] if words and not words[0].startswith("[") else "")
        out[name] = " ".join(words[len(name.split()):])
    return out


def test_the_readme_cli_block_is_the_parsers_usage():
    documented = readme_usages()
    parser = build_parser()
    assert documented.pop("") == " ".join(usage_parts(parser) + ["COMMAND"])
    for name, sub in commands().items():
        assert documented.get(name) == " ".join(usage_parts(sub)), name
    assert not set(documented) - set(commands())


def test_every_variable_is_the_flags_name_but_the_two_the_readme_names():
    from paramserve.service.config import ClientSettings, LogSettings, OutputSettings, server_fields
    from paramserve.service.settings import env_of, flag_of, settings_of

    fields = server_fields() + [f for cls in (ClientSettings, LogSettings, OutputSettings)
                                for f in settings_of(cls)]
    odd = {flag_of(f): env_of(f) for f in fields
           if env_of(f) != "PARAMSERVE_" + flag_of(f)[2:].upper().replace("-", "_")}
    assert odd == {"--tls-cert": "PARAMSERVE_CLIENT_TLS_CERT",
                   "--tls-key": "PARAMSERVE_CLIENT_TLS_KEY"}
    section = README.split("## The CLI", 1)[1]
    assert "`PARAMSERVE_CLIENT_TLS_CERT`/`_KEY`" in section
