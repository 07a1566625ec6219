"""One dataclass per job is both its config and its CLI: each field carries its default, its help and its flag.

`opt` declares a field; `config_command` turns a typer command into one whose options are the config's
fields (plus the command's own parameters) and which receives the built config as `cfg`. Building the config
runs its `__post_init__` checks, so bad values fail as one InputError line before any work starts.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Optional


def opt(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
        cli_required: bool = False) -> Any:
    """A config field. `flag` overrides the --field-name spelling; `cli_required` makes the command line
    name it although Python callers get the default (a run's size and destination are the user's choice)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "cli_required": cli_required})


def flag_of(cls, name: str) -> str:
    """The command-line spelling of a config field, for error messages that name what the user typed."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def _option_type(hint) -> Any:
    # click needs Optional[X] spelled the typing way; `X | None` from the dataclass becomes Optional[X]
    args = typing.get_args(hint)
    if type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return Optional[base]
    return hint


def config_parameters(cls) -> list[inspect.Parameter]:
    """One typer option per field of the dataclass `cls`, with the field's default, help and flag."""
    import typer

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        flag = flag_of(cls, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        if f.metadata.get("cli_required"):
            default = ...
        decls = [f"{flag}/--no-{flag[2:]}" if hints[f.name] is bool and default is True else flag]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(hints[f.name]),
                                        default=typer.Option(default, *decls, help=f.metadata.get("help") or None)))
    return params


def config_command(cls) -> Callable:
    """Decorator for a typer command `fn(cfg, **own)`: its options become fn's own parameters followed by the
    fields of `cls`, and fn is called with cfg=cls(**fields)."""
    names = [f.name for f in dataclasses.fields(cls)]

    def wrap(fn: Callable) -> Callable:
        own_hints = typing.get_type_hints(fn)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name != "cfg"]
        clash = set(names) & {p.name for p in own}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} are also fields of {cls.__name__}")

        @functools.wraps(fn)
        def command(**kwargs):
            cfg = cls(**{n: kwargs.pop(n) for n in names})
            return fn(cfg, **kwargs)

        params = own + config_parameters(cls)
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap
