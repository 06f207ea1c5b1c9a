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
