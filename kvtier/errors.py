"""The one exception kvtier raises for bad input or a broken environment."""


class KvtierError(ValueError):
    """A problem the user can fix; the message says how. The CLI prints it as one line."""
