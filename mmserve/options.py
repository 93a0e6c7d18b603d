"""The click options of `mmserve serve | api | worker`, made from the declarations in shared/settings.py.

Each option's keyword argument is named after the settings field, not the flag: --queue-timeout-seconds
arrives as `first_event_timeout_seconds`, so a command can build its settings object from what it gets."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import click

from shared.settings import ApiSettings, ProcessSettings, ServeSettings, Setting, WorkerSettings, declared


def _flagged(settings_class: type, leave_out: Iterable[Setting] = ()) -> tuple[Setting, ...]:
    left_out = {one.attribute for one in leave_out}
    return tuple(
        one for one in declared(settings_class) if one.flag is not None and one.attribute not in left_out
    )


REDIS_URL, LOG_LEVEL, LOG_FORMAT = COMMON = _flagged(ProcessSettings)
SERVE = _flagged(ServeSettings)
API = _flagged(ApiSettings, leave_out=COMMON)
WORKER = _flagged(WorkerSettings, leave_out=COMMON)


def _click_type(one: Setting) -> click.ParamType | None:
    if one.choices:
        return click.Choice(one.choices, case_sensitive=not one.ignore_case)
    if one.directory:
        return click.Path(exists=one.must_exist, file_okay=False, resolve_path=one.must_exist)
    if one.kind is int:
        return (
            click.INT if one.minimum is None else click.IntRange(min=one.minimum, min_open=one.above_minimum)
        )
    if one.kind is float:
        if one.minimum is None:
            return click.FLOAT
        return click.FloatRange(min=one.minimum, min_open=one.above_minimum)
    return None


def option(one: Setting) -> Callable[[Callable], Callable]:
    """The click option of a declared setting, its value passed as the settings field's name."""
    extra: dict = {"is_flag": True} if one.kind is bool else {"type": _click_type(one)}
    if one.repeatable:
        extra["multiple"] = True
    if one.metavar:
        extra["metavar"] = one.metavar
    return click.option(
        one.flag,
        one.attribute,
        envvar=one.env,
        show_envvar=True,
        show_default=True,
        default=one.default,
        help=one.help,
        **extra,
    )


def apply(settings: Iterable[Setting]) -> Callable[[Callable], Callable]:
    """Decorate a command with the options of `settings`, listed in their declared order."""

    def decorate(function: Callable) -> Callable:
        for one in reversed(tuple(settings)):
            function = option(one)(function)
        return function

    return decorate


def pick(values: dict, settings: Iterable[Setting]) -> dict:
    """The subset of a command's keyword arguments that belong to `settings`."""
    return {one.attribute: values[one.attribute] for one in settings}
