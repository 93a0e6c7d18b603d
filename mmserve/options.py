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


COMMON = _flagged(ProcessSettings)
REDIS_URL, LOG_LEVEL, LOG_FORMAT = (
    next(one for one in COMMON if one.attribute == name) for name in ("redis_url", "log_level", "log_format")
)
REDIS_TLS = tuple(one for one in COMMON if one not in (REDIS_URL, LOG_LEVEL, LOG_FORMAT))
"""--redis-ca-file, --redis-cert-file, --redis-key-file: each command folds them into the URL it hands on."""
SERVE = _flagged(ServeSettings)
API = _flagged(ApiSettings, leave_out=COMMON)
WORKER = _flagged(WorkerSettings, leave_out=COMMON)


def _click_type(one: Setting) -> click.ParamType | None:
    if one.choices:
        return click.Choice(one.choices, case_sensitive=not one.ignore_case)
    if one.directory:
        return click.Path(exists=one.must_exist, file_okay=False, resolve_path=one.must_exist)
    if one.kind is int:
        if one.minimum is None and one.maximum is None:
            return click.INT
        return click.IntRange(min=one.minimum, max=one.maximum, min_open=one.above_minimum)
    if one.kind is float:
        if one.minimum is None and one.maximum is None:
            return click.FLOAT
        return click.FloatRange(min=one.minimum, max=one.maximum, min_open=one.above_minimum)
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


def redis_url_with_tls(redis_url: str | None, values: dict) -> str | None:
    """`redis_url` carrying the REDIS_TLS files popped from a command's keyword arguments;
    click.UsageError for files that do not fit the URL."""
    from shared.connection import with_tls_files

    files = {one.attribute.removeprefix("redis_"): values.pop(one.attribute) for one in REDIS_TLS}
    if redis_url is None:
        if any(files.values()):
            raise click.UsageError("the --redis-*-file flags need a rediss:// --redis-url")
        return None
    try:
        return with_tls_files(redis_url, **files)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
