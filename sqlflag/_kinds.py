"""The closed sets of names sqlflag emits: step kinds, lowering reasons, error kinds.

Each is a ``Literal`` type (what the core's signatures accept) with a tuple of its values
(what the metrics' help text lists), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, get_args

#: What a :class:`~sqlflag._core.Step` asks the shell to do ("skip": send nothing).
StepKind = Literal["check", "release", "ensure", "skip"]
#: Why a tenure ended: the ``reason`` label of the lowered metric.
LoweredReason = Literal["closed", "precheck", "expired", "stolen"]
#: Why a flag was raised or lowered, as a transition tells the application.
TransitionReason = Literal["acquired", LoweredReason]
#: What went wrong with a statement: the ``kind`` label of the errors metric.
ErrorKind = Literal["timeout", "connection", "conflict", "database", "invalid_row", "other"]

STEP_KINDS: tuple[StepKind, ...] = get_args(StepKind)
LOWERED_REASONS: tuple[LoweredReason, ...] = get_args(LoweredReason)
TRANSITION_REASONS: tuple[TransitionReason, ...] = get_args(TransitionReason)
ERROR_KINDS: tuple[ErrorKind, ...] = get_args(ErrorKind)
