"""Typed errors. Each one names the file, row, field or value at fault."""


class ModulaError(Exception):
    """Base class of every error modula-ray raises on purpose."""


class ConfigError(ModulaError, ValueError):
    """A configuration field has a bad value: ``field`` names it."""

    def __init__(self, field: str, message: str, *, source: str | None = None):
        self.field, self.source, self.message = field, source, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


def require(condition: bool, field: str, message: str) -> None:
    """``ConfigError(field, message)`` unless ``condition``."""
    if not condition:
        raise ConfigError(field, message)


class ArtifactError(ModulaError, ValueError):
    """A saved artifact (expert, router, manifest) is missing, corrupt or mismatched."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class DataValidationError(ModulaError, ValueError):
    """A dataset row breaks the schema: names the file, the row (0-based, as ``df.iloc[row]``) and the field."""

    def __init__(self, path, row: int | None, field: str | None, message: str):
        self.path, self.row, self.field = str(path), row, field
        where = [self.path]
        if row is not None:
            where.append(f"row {row} (0-based)")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


class MissingPackageError(ModulaError, ImportError):
    """An optional package is absent; the message carries the exact install command."""

    def __init__(self, package: str, install: str):
        self.package, self.install = package, install
        super().__init__(f"package {package!r} is not installed; install it with:\n    {install}")


class ResourceUnavailableError(ModulaError, RuntimeError):
    """A worker group asks for resources the cluster cannot place; names requested and available."""


class StageFailedError(ModulaError, RuntimeError):
    """A training stage failed after its retries; names the stage and the Ray run. ``cause``: the
    one line of what failed, e.g. a worker's own ``ValueError: ...``."""

    def __init__(self, message: str, *, cause: str | None = None):
        self.cause = cause
        super().__init__(message)
