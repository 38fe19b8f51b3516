"""The two kinds of failure the code speaks of.

`UserError`: nothing can proceed, and the message is one line for the person who ran the
command; `cli.main` prints it and exits 2. Its kinds say where it came from.

`Rejected`: one sample cannot become a row; it becomes a `rejected/` row instead, with the
stage where it failed, a short reason and a detail. Every carrier of such a failure (a bad
read, an undecodable image, a captioner's failure, an invalid caption) is one of these, so
the shard pass catches one type.
"""

from __future__ import annotations

from typing import ClassVar

from recaption.records import Metered, Reason, Stage, Usage


class UserError(Exception):
    """One line for the user: `recaption: error: ...`, exit 2."""


class ConfigError(UserError):
    """A bad pipeline file, override or setting."""


class InputError(UserError):
    """The input root cannot be used at all."""


class RunError(UserError):
    """The run cannot start or go on (a held lock, a guard, an unusable output)."""


class CaptionerFatal(RunError):
    """The backend can caption nothing (a revoked key, an unknown model): the run stops
    instead of rejecting every image."""


class BudgetSpent(Exception):
    """The spend cap (`limits.max_usd`) is reached: no new paid request is sent. Not a
    failure of the sample: its shard is left resumable, and a run with a higher cap asks it."""


class Rejected(Metered, Exception):
    """A sample that ends in `rejected/`; `usage` is what its attempts cost (none for a
    sample that never reached the captioner)."""

    stage: ClassVar[Stage] = Stage.caption

    def __init__(self, reason: Reason, detail: str, usage: Usage | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.usage = usage if usage is not None else Usage()


class Unreadable(Rejected):
    """The shard could not give this sample (no image member, a cut tar, a failed download)."""

    stage = Stage.read
