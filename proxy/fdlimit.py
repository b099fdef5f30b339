"""The open-files limit: every client and upstream connection is a file descriptor, and the
common default soft limit (1024) shuts everyone out long before memory or CPU run short."""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger("pollguard")

# When the hard limit is "unlimited", raise the soft limit this far (the Linux default for
# fs.nr_open, the most a process may have).
UNLIMITED_TARGET = 1_048_576


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log both. Returns (old soft, new soft)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning(
                "open files limit stays at %d (hard %s): raising it failed: %s",
                soft,
                _limit(hard),
                exc,
            )
            return soft, soft
        logger.info("open files limit raised from %d to %d (hard %s)", soft, target, _limit(hard))
        return soft, target
    logger.info("open files limit %s (hard %s)", _limit(soft), _limit(hard))
    return soft, soft


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
