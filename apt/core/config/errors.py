class ConfigError(ValueError):
    """A profile problem a user can fix. The message is one line: where, which key, what is wrong."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source, self.key, self.reason = source, key, message
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
