"""The project's own error types: user-facing problems, printed without a traceback."""


class RatchetError(Exception):
    """A problem the user can fix (bad input, bad config, missing workspace)."""


class ConfigError(RatchetError):
    """params.yaml has an unknown key, a wrong type or an invalid value."""


class BatchRefused(RatchetError):
    """An incoming batch failed a critical expectation; nothing of it was kept."""

    def __init__(self, source: str, problems: list[str], quarantine: str | None = None):
        self.source = source
        self.problems = problems
        self.quarantine = quarantine
        lines = "\n".join(f"  - {p}" for p in problems)
        where = f"\nthe file and a report are in {quarantine}" if quarantine else ""
        super().__init__(
            f"batch `{source}` refused ({len(problems)} problem(s)):\n{lines}{where}"
        )


class WorkspaceError(RatchetError):
    """The directory is not a ratchet workspace, or a workspace tool failed."""


class RegistryError(RatchetError):
    """A registry request that cannot be carried out: unknown model or version, nothing to roll
    back to, an alias that may not be removed."""


class AliasMoved(RegistryError):
    """An alias no longer points where the caller last saw it: another writer (a run, a person
    in the MLflow UI) moved it in between. Nothing was overwritten; `current` is where it is."""

    def __init__(self, name: str, alias: str, expected: str | None, current: str | None):
        self.name = name
        self.alias = alias
        self.expected = expected
        self.current = current
        super().__init__(
            f"`{alias}` of {name} moved: expected version {expected}, it is now {current}; "
            "nothing was overwritten (look at `ratchet history`, then try again)"
        )


class RegistryBusy(RegistryError):
    """Another writer (a run's gate, a person's promote or rollback) held the registry's
    promotion lock for longer than the caller waits."""


class LeaseLost(RegistryError):
    """The lease that made this writer the registry's only alias mover is no longer its own
    (it expired and another writer took it); nothing more was moved."""


class RegistryUnreachable(RegistryError):
    """The MLflow tracking server did not answer within the registry's time budget
    (`registry.timeout_s`): nothing was read or written there."""

    def __init__(self, uri: str, waited: float, cause: str):
        self.uri = uri
        self.waited = waited
        self.cause = cause
        super().__init__(
            f"the MLflow registry at {uri} is unreachable after {waited:.0f} s ({cause}): "
            "start it or fix registry.tracking_uri"
        )


class DiskFull(RatchetError):
    """A write ran out of space; what it was writing was removed, nothing half-written stays."""

    def __init__(self, path: str, free: str):
        self.path = path
        self.free = free
        super().__init__(
            f"no space left on device writing {path} ({free} free): free some space and run "
            "again"
        )
