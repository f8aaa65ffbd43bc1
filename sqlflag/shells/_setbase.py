"""What the sync and async flag sets share: the read-only view of the core, and the merging
of changes into callbacks."""

from __future__ import annotations

from typing import Any

from .._clock import monotonic
from .._guard import ShardTenure
from .._partition import Change, SetCore, Shard, shard_row


class FlagSetBase:
    """Properties both shells expose; the core decides, the shells only run statements."""

    _core: SetCore
    _closing: bool

    def _locked(self) -> Any:
        """A context manager around every read of the core (a lock in the sync shell)."""
        raise NotImplementedError  # pragma: no cover - every shell defines it

    @property
    def name(self) -> str:
        """The set's name."""
        return self._core.settings.name

    @property
    def process(self) -> str:
        """This process's name (its member name)."""
        return self._core.settings.process

    @property
    def shards(self) -> tuple[Shard, ...]:
        """Every shard of the set, in the order given to the builder."""
        return tuple(self._core.shards)

    @property
    def owned(self) -> frozenset[Shard]:
        """The shards this process owns now, each judged by its own local deadline (like a
        flag's ``raised``): a process frozen past a lease reads it gone at once on waking."""
        with self._locked():
            return self._core.owned(monotonic())

    @property
    def members(self) -> tuple[str, ...]:
        """The live members' process names by the last check, sorted (this process among
        them while it is a member)."""
        with self._locked():
            return self._core.members

    @property
    def assignment(self) -> dict[Shard, str | None]:
        """Who holds each shard by the last check (None: nobody holds a valid lease)."""
        with self._locked():
            return {s: (h[0] if h else None) for s, h in self._core.holders().items()}

    @property
    def closed(self) -> bool:
        """True once close() has been called."""
        return self._closing

    def owns(self, shard: Shard) -> bool:
        """True while this process owns ``shard`` by its local deadline.

        Args:
            shard: one of :attr:`shards`.
        """
        return self.token(shard) is not None

    def token(self, shard: Shard) -> int | None:
        """The fencing token of this process's tenure of ``shard``; None when not owned.

        Args:
            shard: one of :attr:`shards`.
        """
        with self._locked():
            return self._core.token(shard, monotonic())

    def _tenure(self, shard: Shard) -> ShardTenure:
        """What a guard of ``shard`` checks: its row, this process and the local token."""
        return ShardTenure(
            shard_row(self.name, shard), self.token(shard), self.process,
            f"shard {shard!r} of flag set {self.name!r}",
        )

    def __repr__(self) -> str:
        state = "closed" if self._closing else f"owns {len(self.owned)}/{len(self.shards)}"
        return f"<{type(self).__name__} name={self.name!r} process={self.process!r} {state}>"


def merged(changes: list[Change]) -> list[Change]:
    """Consecutive changes of one kind as one (a check that takes 10 shards: one call)."""
    out: list[Change] = []
    for change in changes:
        if out and out[-1].assigned == change.assigned:
            out[-1] = Change(change.assigned, out[-1].shards | change.shards)
        else:
            out.append(change)
    return out
