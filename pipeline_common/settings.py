"""One settings mechanism for both services: pydantic-settings, one env prefix per service.

A service declares its settings as `name: type = default` fields on a subclass of `EnvSettings`
with `env_prefix` in its `model_config`; pydantic validates and coerces the values.

- `Settings(**values)` is exactly the defaults plus `values`: tests and devstack stay
  independent of the shell's environment.
- `Settings.from_env(environ)` reads `<PREFIX><FIELD>` variables (os.environ by default) and
  raises `SettingsError` naming every bad variable with its value.
- `Settings.env_table()` lists every variable with its default, as the README and
  docker-compose.yml are checked against it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable(s) to fix."""


class EnvSettings(BaseSettings):
    """Base of both services' settings; subclasses set `env_prefix` in `model_config`."""

    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        frozen=True, extra="forbid", validate_default=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what the constructor is given: the environment is read by from_env() alone.
        return (init_settings,)

    @classmethod
    def prefix(cls) -> str:
        return cls.model_config.get("env_prefix", "")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Reads the settings from `environ` (default os.environ); SettingsError if one is bad."""
        source = _EnvironSource(cls, os.environ if environ is None else environ)
        try:
            return cls(**source())
        except ValidationError as exc:
            raise SettingsError(cls._explain(exc)) from None

    @classmethod
    def env_table(cls) -> list[tuple[str, str]]:
        """(variable, default as written in the environment) for every field, in field order."""
        return [
            (cls.prefix() + name.upper(), _env_text(field.default))
            for name, field in cls.model_fields.items()
        ]

    @classmethod
    def _explain(cls, exc: ValidationError) -> str:
        problems = []
        for error in exc.errors(include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["loc"]:
                variable = cls.prefix() + str(error["loc"][0]).upper()
                problems.append(f"{variable}={error['input']!r}: {message}")
            else:  # a rule across several fields: its message names them
                problems.append(message)
        return "; ".join(problems)


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # What pydantic-settings does with os.environ: names compare case-insensitively.
        if self.case_sensitive:
            return dict(self._environ)
        return {name.lower(): value for name, value in self._environ.items()}


def _env_text(default: Any) -> str:
    if default is None:
        return ""
    if isinstance(default, Path):
        return os.fspath(default)
    return str(default)
