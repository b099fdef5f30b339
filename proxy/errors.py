"""pollguard's exception tree. Foreign errors (httpx, httptools, redis, pydantic) are translated
into these at the module that talks to them; only the CLI turns them into exit codes."""


class PollguardError(Exception):
    """Base of every error pollguard raises on purpose."""


class ConfigError(PollguardError):
    """The configuration is invalid. The message names the field, the bad value and the fix."""


class UpstreamError(PollguardError):
    """The upstream could not give us a response head."""


class UpstreamUnavailable(UpstreamError):
    """Connection refused, DNS failure, or reset before the response head."""


class UpstreamTimeout(UpstreamError):
    """No response head within upstream.read_timeout."""


class UpstreamInvalid(UpstreamError):
    """The upstream's response broke HTTP/1.1 or a bound (head size, header count, upgrade)."""


class UpstreamBusy(UpstreamError):
    """upstream.max_connections were all in use for longer than upstream.pool_timeout."""


class StoreUnavailable(PollguardError):
    """The job-state store (Redis) could not be reached or answered garbage."""


class BadRequest(PollguardError):
    """The client's request breaks HTTP in a way no backend should be asked to interpret."""


class ClientDisconnected(PollguardError):
    """The client went away while pollguard was still reading its request body."""


class ClientTimeout(PollguardError):
    """The client sent no byte of its request body for upstream.read_timeout."""
