"""The pure core of a flag set: K shards spread over the live members, no I/O.

Every shard and every member is an ordinary row of the flags table: ``{set}/shard/{shard}``
and ``{set}/member/{process}``, each with a holder, a fencing token and a lease, taken and
renewed by the same compare-and-swap as a flag. One check of a member is a generator of
:class:`~sqlflag._core.Step` s (see :meth:`SetCore.cycle`): a batched renewal of the member
row and every shard it owns, one read of every row of the set, then, only when ownership
changes, one take per shard acquired and one release for all the shards given up. The shells
run the statements and send each result back in.

Assignment (:func:`assign`) is sticky: a member keeps what it owns up to its quota, takes
free shards only while under it and gives up only what exceeds it, so a shard moves only
when balance requires it. Rendezvous hashing (highest ``score(shard, member)`` first) decides
which free shards a member prefers and which of its own it gives up first.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ._batch import BATCH_SIZE
from ._core import Settings, Step, _one_line
from ._dialects import Database, InvalidRow
from ._dialects._base import as_seconds, as_token
from ._schema import table as t

Shard = int | str
MEMBER = "/member/"
SHARD = "/shard/"


def member_row(name: str, process: str) -> str:
    """The row name of ``process``'s membership of the set ``name``."""
    return f"{name}{MEMBER}{process}"


def shard_row(name: str, shard: Shard) -> str:
    """The row name of ``shard`` of the set ``name``."""
    return f"{name}{SHARD}{shard}"


def name_range(name: str) -> tuple[str, str]:
    """``(lo, hi)``: every row of the set ``name`` has ``lo <= row < hi`` (bytewise): names
    starting with ``name + "/"``, and ``"0"`` is the character after ``"/"``."""
    return f"{name}/", f"{name}0"


def score(shard: Shard, member: str) -> int:
    """Rendezvous (highest random weight) score of ``member`` for ``shard``: the same in
    every process and every Python (no ``hash()`` randomisation)."""
    digest = hashlib.blake2b(f"{shard}\0{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def quota(members: Sequence[str], me: str, k: int) -> int:
    """How many of ``k`` shards ``me`` should own among ``members`` (sorted by name, the
    first ``k mod n`` get one more): ``ceil(k/n)`` or ``floor(k/n)``, summing to ``k``."""
    ranked = sorted(set(members))
    n = len(ranked)
    if me not in ranked or n == 0:
        return 0
    rank = ranked.index(me)
    return k // n + (1 if rank < k % n else 0)


def assign(  # noqa: PLR0917
    members: Sequence[str], me: str, shards: Sequence[Shard], mine: Iterable[Shard],
    free: Iterable[Shard], scores: Mapping[Shard, int] | None = None,
) -> tuple[list[Shard], list[Shard]]:
    """``(take, give_up)`` for ``me``: sticky quotas.

    Args:
        members: the live members' names (``me`` among them, or ``me`` owns nothing).
        me: this member.
        shards: every shard of the set.
        mine: the shards ``me`` owns now.
        free: the shards nobody holds (no valid lease); never one held by a live owner.
        scores: ``score(shard, me)`` by shard, when the caller keeps them (they never change).

    A member over its quota gives up its lowest-scored shards; one under it takes the
    highest-scored free shards, as many as it lacks (or as are free).
    """
    owned = list(mine)

    def rank(s: Shard) -> int:
        return scores[s] if scores is not None else score(s, me)

    q = quota(members, me, len(shards))
    if len(owned) > q:
        ranked = sorted(owned, key=lambda s: (rank(s), str(s)))
        return [], ranked[: len(owned) - q]
    wanted = q - len(owned)
    if wanted <= 0:
        return [], []
    mine_set = set(owned)
    candidates = sorted(
        (s for s in free if s not in mine_set), key=lambda s: (-rank(s), str(s))
    )
    return candidates[:wanted], []


@dataclass(frozen=True)
class Row:
    """One row of the set as the last read saw it (``left``: seconds of lease, DB clock)."""

    holder: str | None
    token: int
    left: float | None


@dataclass
class Answer:
    """What the shell sends back for a step: the result (or exception) and when."""

    t_sent: float
    t_done: float
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Change:
    """Shards this member began (``assigned``) or stopped (revoked) owning."""

    assigned: bool
    shards: frozenset[Shard]


class SetCore:
    """The state of one member of a flag set in one process, and every decision about it."""

    def __init__(
        self,
        settings: Settings,
        shards: Sequence[Shard],
        dialect: Database,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.shards = list(shards)
        self.dialect = dialect
        self.log = logger
        self._rng = rng or random.Random()
        self._by_row = {shard_row(settings.name, s): s for s in self.shards}
        self._rows = {s: shard_row(settings.name, s) for s in self.shards}
        self._scores = {s: score(s, settings.process) for s in self.shards}
        self._member_row = member_row(settings.name, settings.process)
        self._member_prefix = settings.name + MEMBER
        lo, hi = name_range(settings.name)
        self._range = {"p_lo": lo, "p_hi": hi}
        self.read = dialect.build_inspect().where(
            dialect.name_range(t.c.name, sa.bindparam("p_lo"), sa.bindparam("p_hi"))
        )
        self.release_many = release_many(dialect)
        self.take_many = take_many(dialect)
        #: shard -> (token, local deadline): what this member believes it owns.
        self.tenures: dict[Shard, tuple[int, float]] = {}
        self.member: tuple[int, float] | None = None  # our membership (token, deadline)
        self.members: tuple[str, ...] = ()  # live members by the last read
        self.rows: dict[str, Row] = {}  # every row of the set by the last read
        self._to_release: dict[Shard, int] = {}  # tenures owed back to the database
        self._changes: list[Change] = []
        self.closed = False
        self.failures = 0
        self.last_error: str | None = None

    # -- reading ----------------------------------------------------------------------------

    def owned(self, now: float) -> frozenset[Shard]:
        """Shards owned by their local deadline at ``now``."""
        return frozenset(s for s, (_, deadline) in self.tenures.items() if now < deadline)

    def token(self, shard: Shard, now: float) -> int | None:
        found = self.tenures.get(shard)
        return found[0] if found is not None and now < found[1] else None

    def is_member(self, now: float) -> bool:
        return self.member is not None and now < self.member[1]

    def holders(self) -> dict[Shard, tuple[str, int] | None]:
        """Each shard's holder and token by the last read (None: free or unknown)."""
        out: dict[Shard, tuple[str, int] | None] = {}
        for s in self.shards:
            row = self.rows.get(shard_row(self.settings.name, s))
            live = row is not None and row.holder is not None and (row.left or 0) > 0
            out[s] = (row.holder, row.token) if live and row and row.holder else None
        return out

    def take_changes(self) -> list[Change]:
        """The changes to announce since the last call, oldest first."""
        out, self._changes = self._changes, []
        return out

    # -- lowering by the local clock --------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop tenures (and the membership) whose local deadline has passed."""
        gone = [s for s, (_, d) in self.tenures.items() if now >= d]
        if gone:
            self.log.warning(
                "flag set %r: process %r lost shard(s) %s (their lease ran out before a "
                "renewal)", self.settings.name, self.settings.process, _few(gone),
            )
            self._revoke(gone)
        if self.member is not None and now >= self.member[1]:
            self.log.warning(
                "flag set %r: membership of process %r expired", self.settings.name,
                self.settings.process,
            )
            self.member = None

    def next_deadline(self) -> float:
        """The earliest local deadline (``inf`` when nothing is held)."""
        deadlines = [d for _, d in self.tenures.values()]
        if self.member is not None:
            deadlines.append(self.member[1])
        return min(deadlines, default=math.inf)

    def _revoke(self, shards: Iterable[Shard]) -> None:
        gone = frozenset(shards) & frozenset(self.tenures)
        for s in gone:
            token, _ = self.tenures.pop(s)
            self._to_release[s] = token  # a late renewal may have kept it: give it back
        if gone:
            self._changes.append(Change(False, gone))

    def close(self) -> None:
        """Closing: every shard revoked at once; :meth:`final` then releases them."""
        self.closed = True
        self._revoke(list(self.tenures))

    # -- one check --------------------------------------------------------------------------

    def cycle(self, now: float) -> Generator[Step, Answer, float]:
        """One check: yields the steps to run, receives each :class:`Answer`, returns the
        delay until the next check."""
        s = self.settings
        self.expire(now)
        # 1. Renew the membership and every shard still owned: one statement (per
        #    BATCH_SIZE tenures, the flags' batch size: SQLite bounds a statement's parameters).
        keys: list[tuple[str, str, int]] = []
        if self.member is not None:
            keys.append((self._member_row, s.process, self.member[0]))
        keys += [(self._rows[sh], s.process, tok) for sh, (tok, _) in self.tenures.items()]
        unconfirmed: list[Shard] = []
        member_unconfirmed = False
        for start in range(0, len(keys), BATCH_SIZE):
            chunk = keys[start : start + BATCH_SIZE]
            params = self.dialect.renew_many_params(chunk)
            params["p_interval"] = self.dialect.interval_param(s.interval)
            answer = yield Step("check", self.dialect.renew_many, params)
            if answer.error is not None:
                return self._failed(answer)
            self.expire(answer.t_done)
            asked = {k[0] for k in chunk}
            names = self.dialect.renewed(answer.result, len(chunk))
            exact = names is not None
            if names is None:  # only a count: all, or none confirmed (the read decides)
                names = asked if answer.result.rowcount == len(chunk) else set()
            unconfirmed += self._renewed(names, asked, exact, answer.t_sent, answer.t_done)
            if self._member_row in asked and self.member is not None:
                member_unconfirmed = self._member_row not in names
        # 2. Read every row of the set.
        answer = yield Step("check", self.read, dict(self._range))
        if answer.error is not None:
            return self._failed(answer)
        try:
            self._observe(answer.result)
        except InvalidRow as exc:
            return self._failed(Answer(answer.t_sent, answer.t_done, error=exc))
        self._recovered()
        now = answer.t_done
        self.expire(now)
        # Shards the batch could not confirm (MySQL reports a count only): their own check.
        for sh in unconfirmed:
            if sh in self.tenures and self._held_by_me(sh):
                answer = yield self._check_step(shard_row(s.name, sh), self.tenures[sh][0])
                if answer.error is not None:
                    return self._failed(answer)
                self._took(sh, answer, renewal=True)
            elif sh in self.tenures:
                self._revoke([sh])
        if member_unconfirmed and self.member is not None:
            answer = yield self._check_step(self._member_row, self.member[0])
            if answer.error is not None:
                return self._failed(answer)
            outcome = self._parse(answer)
            token = self.member[0]
            kept = outcome is not None and outcome.won and outcome.token == token
            fresh = answer.t_sent + s.lease > answer.t_done
            self.member = (token, answer.t_sent + s.lease) if kept and fresh else None
        # 3. Rows missing (a first start, or deleted by hand): insert them, expired.
        missing = [n for n in [self._member_row, *self._by_row] if n not in self.rows]
        for n in [] if self.closed else missing:
            answer = yield Step("ensure", self.dialect.ensure_row, {"p_name": n})
            if answer.error is not None:
                return self._failed(answer)
            self.rows[n] = Row(None, 0, 0.0)
        # 4. Join (or rejoin) when not a member.
        if self.member is None and not self.closed:
            row = self.rows.get(self._member_row)
            if row is None or row.left is None or row.left <= 0:
                answer = yield self._check_step(self._member_row, None)
                if answer.error is not None:
                    return self._failed(answer)
                outcome = self._parse(answer)
                won = outcome is not None and outcome.won and outcome.token is not None
                if won and answer.t_sent + s.lease > answer.t_done:
                    self.member = (outcome.token, answer.t_sent + s.lease)
                    self.log.info(
                        "flag set %r: process %r joined (token %d)", s.name, s.process,
                        outcome.token,
                    )
        members = set(self.members)
        if self.is_member(now):
            members.add(s.process)
        else:
            members.discard(s.process)
            if self.tenures:  # not a member: own nothing
                self._revoke(list(self.tenures))
        self.members = tuple(sorted(members))
        # 5. Give up what exceeds the quota, take free shards while under it.
        take: list[Shard] = []
        if self.is_member(now) and not self.closed:
            free = [
                sh for sh in self.shards if sh not in self.tenures and self._free(self._rows[sh])
            ]
            take, give_up = assign(
                self.members, s.process, self.shards, self.owned(now), free, self._scores
            )
            if give_up:
                self.log.info(
                    "flag set %r: process %r gives up shard(s) %s to rebalance", s.name,
                    s.process, _few(give_up),
                )
                self._revoke(give_up)
        releases = self.release_steps()
        failed = False
        for release in releases:
            answer = yield release
            failed |= answer.error is not None
        if releases and not failed:  # a failed one: all again next time (harmless twice)
            for sh in self._to_release:
                self.rows.pop(shard_row(s.name, sh), None)
            self._to_release.clear()
        last = now
        if take and self.take_many is not None:
            # Every free shard wanted, in one statement per BATCH_SIZE (rows that did not
            # come back were taken by someone else meanwhile, or need the single take).
            for start in range(0, len(take), BATCH_SIZE):
                batch = take[start : start + BATCH_SIZE]
                params = {
                    "p_names": [self._rows[sh] for sh in batch],
                    "p_process": s.process,
                    "p_interval": self.dialect.interval_param(s.interval),
                }
                answer = yield Step("check", self.take_many, params)
                if answer.error is not None:
                    return self._failed(answer)
                try:
                    got = {name: as_token(tok) for name, tok in answer.result.all()}
                except InvalidRow as exc:
                    return self._failed(Answer(answer.t_sent, answer.t_done, error=exc))
                for sh in batch:
                    granted = got.get(self._rows[sh])
                    if granted is not None:
                        self._granted(sh, granted, answer, renewal=False)
                last = answer.t_done
            take = [sh for sh in take if sh not in self.tenures and self._stale_timeline(sh)]
        budget = now + s.interval / 4  # takes beyond it wait for the next check (right away)
        for sh in take:
            if last > budget:
                return 0.0
            answer = yield self._check_step(shard_row(s.name, sh), None)
            last = answer.t_done
            if answer.error is not None:
                return self._failed(answer)
            self._took(sh, answer, renewal=False)
        return self._delay(last)

    def final(self) -> list[Step]:
        """At close, after the last check: release every shard and the membership."""
        self._revoke(list(self.tenures))
        keys = [(shard_row(self.settings.name, sh), tok) for sh, tok in self._to_release.items()]
        if self.member is not None:
            keys.append((self._member_row, self.member[0]))
            self.member = None
        self._to_release.clear()
        return self._release_keys(keys)

    def release_steps(self) -> list[Step]:
        """The statements releasing every tenure given up (one per BATCH_SIZE)."""
        name = self.settings.name
        keys = [(shard_row(name, sh), tok) for sh, tok in self._to_release.items()]
        return self._release_keys(keys)

    def _release_keys(self, keys: list[tuple[str, int]]) -> list[Step]:
        process = self.settings.process
        return [
            Step("release", self.release_many, {
                "p_keys": [(n, process, tok) for n, tok in keys[start : start + BATCH_SIZE]]
            })
            for start in range(0, len(keys), BATCH_SIZE)
        ]

    # -- results ----------------------------------------------------------------------------

    def _renewed(
        self, names: set[str], asked: set[str], exact: bool, t_sent: float, t_done: float
    ) -> list[Shard]:
        """Account for one renewal statement of the rows ``asked`` (``exact``: ``names`` are
        exactly the rows it renewed, not "all or nothing" from a count); returns the shards
        it could not confirm."""
        s = self.settings
        late = t_sent + s.lease <= t_done
        if self.member is not None and self._member_row in asked:
            if self._member_row in names and not late:
                self.member = (self.member[0], t_sent + s.lease)
            elif exact or late:
                self.member = None
            # else: a count mismatch; the old deadline stands and the read decides
        unconfirmed: list[Shard] = []
        lost: list[Shard] = []
        deadline = t_sent + s.lease
        for name in asked:
            sh = self._by_row.get(name)
            tenure = None if sh is None else self.tenures.get(sh)
            if sh is None or tenure is None:
                continue
            if name in names:
                if late:
                    lost.append(sh)
                else:
                    self.tenures[sh] = (tenure[0], deadline)
            elif exact or names:
                lost.append(sh)
            else:
                unconfirmed.append(sh)
        if lost:
            self.log.warning(
                "flag set %r: process %r no longer holds shard(s) %s", s.name, s.process,
                _few(lost),
            )
            self._revoke(lost)
        return unconfirmed

    def _observe(self, result: Any) -> None:
        rows: dict[str, Row] = {}
        for name, holder, token, left in result.all():  # one fetch, not one per row
            rows[name] = Row(holder, as_token(token), as_seconds(left))
        self.rows = rows
        self.members = tuple(sorted(
            row.holder for name, row in rows.items()
            if name.startswith(self._member_prefix) and row.holder is not None
            and row.left is not None and row.left > 0
            and name == member_row(self.settings.name, row.holder)
        ))
        if self.member is not None:
            row = rows.get(self._member_row)
            mine = row is not None and row.holder == self.settings.process
            if not mine or row is None or row.token != self.member[0]:
                self.log.warning(
                    "flag set %r: membership of process %r was taken over or removed",
                    self.settings.name, self.settings.process,
                )
                self.member = None
        stolen = [sh for sh in self.tenures if not self._held_by_me(sh)]
        if stolen:
            self._revoke(stolen)

    def _held_by_me(self, sh: Shard) -> bool:
        row = self.rows.get(self._rows[sh])
        tenure = self.tenures.get(sh)
        return (
            row is not None and tenure is not None
            and row.holder == self.settings.process and row.token == tenure[0]
        )

    def _stale_timeline(self, sh: Shard) -> bool:
        """PostgreSQL: a free row whose token is below the server's timeline range is not
        taken by the batched take (the single check carries it over, see the dialect). We
        cannot tell the range here, so every free row the batch left gets its own check
        only on PostgreSQL; elsewhere the batch covers every free row."""
        return self.dialect.name == "postgresql"

    def _free(self, name: str) -> bool:
        row = self.rows.get(name)
        return row is not None and (row.left is None or row.left <= 0)

    def _check_step(self, name: str, token: int | None) -> Step:
        s = self.settings
        params = self.dialect.params(name, s.process, token, s.interval)
        return Step("check", self.dialect.check, params, token)

    def _parse(self, answer: Answer) -> Any:
        try:
            return self.dialect.parse_check(answer.result)
        except InvalidRow as exc:
            self.log.warning("flag set %r: %s", self.settings.name, exc)
            return None

    def _took(self, sh: Shard, answer: Answer, renewal: bool) -> None:
        outcome = self._parse(answer)
        if outcome is None or not outcome.won or outcome.token is None:
            if renewal:
                self._revoke([sh])
            return
        self._granted(sh, outcome.token, answer, renewal)

    def _granted(self, sh: Shard, token: int, answer: Answer, renewal: bool) -> None:
        """``sh`` is ours with ``token`` by the statement ``answer`` answers."""
        s = self.settings
        if answer.t_sent + s.lease <= answer.t_done:  # came back too late to believe
            self._to_release[sh] = token
            if renewal:
                self._revoke([sh])
            return
        known = self.tenures.get(sh)
        if self.closed:  # closed meanwhile: never believed, given back at once
            self._to_release[sh] = token
            return
        if renewal and (known is None or known[0] != token):
            self._revoke([sh])
            self._to_release[sh] = token
            return
        self.tenures[sh] = (token, answer.t_sent + s.lease)
        self.rows[self._rows[sh]] = Row(s.process, token, s.interval)
        if not renewal:
            self._changes.append(Change(True, frozenset([sh])))

    def _failed(self, answer: Answer) -> float:
        error = answer.error
        assert error is not None
        kind = self.dialect.classify(error)
        self.failures += 1
        text = _one_line(error)
        if text != self.last_error:
            self.log.warning(
                "flag set %r: database check failed (%s): %s", self.settings.name, kind, text
            )
        self.last_error = text
        self.expire(answer.t_done)
        return self._jittered(self.settings.interval / 10)

    def _recovered(self) -> None:
        if self.failures:
            self.log.info("flag set %r: database answering again", self.settings.name)
        self.failures = 0

    def _delay(self, now: float) -> float:
        s = self.settings
        delay = self._jittered(s.interval / 2)
        # Wake just after the first lease that blocks a take ends (a crashed member's).
        if self.is_member(now) and len(self.tenures) < quota(
            self.members, s.process, len(self.shards)
        ):
            lefts = [
                self.rows[self._rows[sh]].left or 0.0 for sh in self.shards
                if sh not in self.tenures and self._rows[sh] in self.rows
            ]
            soon = [x for x in lefts if x > 0]
            if soon:
                delay = min(delay, min(soon) * (1 + 0.01) + 0.002)
        # Always early enough that the renewals, each taking its whole timeout, still land
        # before the first local deadline (a long check of many takes shortens the wait).
        held = len(self.tenures) + (self.member is not None)
        if held:
            statements = -(-held // BATCH_SIZE)
            latest = self.next_deadline() - now - s.timeout * statements
            delay = min(delay, max(latest, s.interval / 20))
        return delay

    def _jittered(self, base: float) -> float:
        j = self.settings.jitter
        return base * (1 + self._rng.uniform(-j, j)) if j else base


def take_many(dialect: Database) -> sa.Executable | None:
    """Take many free shards at once (``p_names``), where UPDATE has RETURNING: each expired
    row gets this process as holder, the next token and a new lease; returns ``(name,
    token)`` of the rows taken. None on MySQL/MariaDB (no RETURNING): one check per shard.

    On PostgreSQL only rows of the server's current timeline are taken (a row from before a
    promotion must be carried over first, which the single check does)."""
    if dialect.name not in ("postgresql", "sqlite"):
        return None
    cond = [t.c.name.in_(sa.bindparam("p_names", expanding=True)), t.c.expires_at <= dialect.now()]
    if dialect.name == "postgresql":
        from ._dialects.postgresql import timeline_floor

        cond.append(t.c.token >= sa.select(timeline_floor()).scalar_subquery())
    return (
        sa.update(t)
        .where(*cond)
        .ordered_values(
            (t.c.token, t.c.token + 1),
            (t.c.acquired_at, dialect.now()),
            (t.c.holder, sa.bindparam("p_process")),
            (t.c.renewed_at, dialect.now()),
            (t.c.expires_at, dialect.later()),
        )
        .returning(t.c.name, t.c.token)
    )


def release_many(dialect: Database) -> sa.Executable:
    """End many tenures of this process at once (``p_keys``: ``(name, holder, token)``),
    only those still valid and ours."""
    keys = sa.tuple_(t.c.name, t.c.holder, t.c.token)
    return (
        sa.update(t)
        .where(keys.in_(sa.bindparam("p_keys", expanding=True)), t.c.expires_at > dialect.now())
        .ordered_values((t.c.renewed_at, dialect.now()), (t.c.expires_at, dialect.now()))
    )


def _few(shards: Iterable[Shard], limit: int = 8) -> str:
    items = sorted(shards, key=str)
    text = ", ".join(str(s) for s in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")

