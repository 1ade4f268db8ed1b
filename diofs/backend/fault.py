"""Fault injection: image I/O errors driven at run time by a JSON spec file.

Mount option `backend=fault,fault_spec=SPEC`. SPEC may be missing (no faults) and may be
rewritten while the daemon runs; it is re-read whenever its inode, size, mtime or ctime change
(one `os.stat` per operation). Write it atomically (`write_spec`: temp file + rename); a file
that does not parse keeps the previous rules in force and logs one warning.

Spec:
    {"rules": [{"op": "write", "errno": "EIO", "offset_min": 0, "offset_max": null,
                "skip": 0, "count": null, "delay_ms": 0, "name": "any text"}]}

    op          "read" (read and readinto), "write" or "flush"; required
    errno       name ("EIO", "ENOSPC", ...) or number; null = no error (use with delay_ms)
    offset_min  a read/write matches if its byte range intersects [offset_min, offset_max);
    offset_max  null = no upper bound. Flushes have no range: every flush matches.
    skip        let this many matching operations pass first
    count       then fail this many (null = forever)
    delay_ms    sleep this long before the operation proceeds or fails (it runs in a worker
                thread), for tests that need a slow image without sleeping themselves
    name        free text; part of the rule's identity (change it to restart the counters)
    A top-level "comment" key is allowed and ignored.

Counting: every rule counts every operation it matches (rules are independent); an operation
is failed (or delayed) by the first rule, in list order, whose window [skip, skip + count)
covers its count. A failed operation does nothing: a failed write writes no byte.

Counters belong to the spec's content: the key is the rule index plus a hash of the parsed
rule list, so rewriting the same rules (another mtime, other whitespace) keeps the counters,
and any change of the rules (or removing the file) starts all of them from zero.

`<SPEC>.fired` (JSON, replaced atomically at open, at each reload and at each fault) says what
fired: {"total": n, "by_op": {"read": n, "write": n, "flush": n}, "rules": [n per rule of the
current spec], "spec_hash": "..."}; "total" and "by_op" count since open. `read_fired(SPEC)`
reads it.

Thread safety: the daemon calls the backend from several worker threads; `_lock`, a
`threading.Lock` (right here: these are threads, not trio tasks), protects the loaded rules,
the counters and the sidecar. Image I/O and delays happen outside the lock.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

from diofs.backend import Backend
from diofs.backend.raw import check_range
from diofs.errors import DiofsError

__all__ = ["OPS", "FaultBackend", "Rule", "parse_spec", "read_fired", "write_spec"]

log = logging.getLogger(__name__)

OPS = ("read", "write", "flush")
_KEYS = {"op", "errno", "offset_min", "offset_max", "skip", "count", "delay_ms", "name"}


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    op: str
    errno: int | None
    offset_min: int = 0
    offset_max: int | None = None
    skip: int = 0
    count: int | None = None
    delay_ms: float = 0.0
    name: str = ""

    def matches(self, op: str, off: int, n: int) -> bool:
        if op != self.op:
            return False
        if op == "flush":
            return True
        end = off + max(n, 1)
        return end > self.offset_min and (self.offset_max is None or off < self.offset_max)

    def covers(self, seen: int) -> bool:
        """Whether the matching operation numbered `seen` (from 0) falls in the fault window."""
        return seen >= self.skip and (self.count is None or seen < self.skip + self.count)


def _int(rule: dict[str, Any], key: str, default: int | None, *, nullable: bool) -> int | None:
    v = rule.get(key, default)
    if v is None and nullable:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{key} must be a non-negative integer{' or null' if nullable else ''}")
    return v


def _parse_rule(i: int, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"rule {i}: not an object")
    try:
        unknown = set(raw) - _KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
        op = raw.get("op")
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}")
        e = raw.get("errno")
        if isinstance(e, str):
            code = getattr(errno_mod, e, None)
            if not isinstance(code, int) or not e.startswith("E"):
                raise ValueError(f"unknown errno {e!r}")
            e = code
        elif e is not None and (not isinstance(e, int) or isinstance(e, bool) or e <= 0):
            raise ValueError("errno must be a name like EIO, a positive number, or null")
        delay = raw.get("delay_ms", 0)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
            raise ValueError("delay_ms must be a non-negative number")
        if e is None and not delay:
            raise ValueError("a rule needs an errno or a delay_ms")
        name = raw.get("name", "")
        if not isinstance(name, str):
            raise ValueError("name must be a string")
        omin = _int(raw, "offset_min", 0, nullable=False)
        omax = _int(raw, "offset_max", None, nullable=True)
        assert omin is not None
        if omax is not None and omax <= omin:
            raise ValueError("offset_max must be greater than offset_min")
        skip = _int(raw, "skip", 0, nullable=False)
        assert skip is not None
        count = _int(raw, "count", None, nullable=True)
        return Rule(op, e, omin, omax, skip, count, float(delay), name)
    except ValueError as exc:
        raise ValueError(f"rule {i}: {exc}") from None


def parse_spec(text: str) -> list[Rule]:
    """Parse a spec's JSON text; ValueError (one line) if it is not a valid spec."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise ValueError('expected an object {"rules": [...]}')
    extra = set(doc) - {"rules", "comment"}
    if extra:
        raise ValueError(f"unknown top-level key(s) {', '.join(sorted(extra))}")
    return [_parse_rule(i, r) for i, r in enumerate(doc["rules"])]


def _spec_hash(rules: list[Rule]) -> str:
    canon = json.dumps([dataclasses.asdict(r) for r in rules], sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _replace_json(path: str, doc: object) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def write_spec(path: str, rules: list[dict[str, Any]]) -> None:
    """Write a spec atomically (for tests and demos). Validates it first (ValueError)."""
    doc = {"rules": rules}
    parse_spec(json.dumps(doc))
    _replace_json(path, doc)


def read_fired(fault_spec: str) -> dict[str, Any]:
    """The `<fault_spec>.fired` sidecar, or {} if it does not exist yet."""
    try:
        with open(fault_spec + ".fired") as f:
            doc: dict[str, Any] = json.load(f)
            return doc
    except FileNotFoundError:
        return {}


_StatKey = tuple[int, int, int, int, int]


class FaultBackend:
    """A backend whose operations fail as the spec file says, then pass to `inner`.

    `_lock` (threading.Lock) protects `_key`, `_bad_key`, `_rules`, `_hash`, `_seen`,
    `_fired_rule`, `_fired_total`, `_fired_by_op` and the sidecar file.
    """

    def __init__(self, inner: Backend, fault_spec: str) -> None:
        self._inner = inner
        self.fault_spec = fault_spec
        self.fired_path = fault_spec + ".fired"
        self._lock = threading.Lock()
        self._key: _StatKey | None = None
        self._bad_key: _StatKey | None = None
        self._rules: list[Rule] = []
        self._hash = _spec_hash([])
        self._seen: list[int] = []
        self._fired_rule: list[int] = []
        self._fired_total = 0
        self._fired_by_op = dict.fromkeys(OPS, 0)
        try:
            st = os.stat(fault_spec)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DiofsError(f"cannot read fault spec {fault_spec}: {exc.strerror}") from None
        else:
            try:
                with open(fault_spec) as f:
                    self._install(parse_spec(f.read()))
            except ValueError as exc:
                raise DiofsError(f"bad fault spec {fault_spec}: {exc}") from None
            except OSError as exc:
                raise DiofsError(f"cannot read fault spec {fault_spec}: {exc.strerror}") from None
            self._key = self._stat_key(st)
        try:
            _replace_json(self.fired_path, self._fired_doc())
        except OSError as exc:
            raise DiofsError(f"cannot write {self.fired_path}: {exc.strerror}") from None

    # -- spec handling (all under _lock) --------------------------------------------------

    @staticmethod
    def _stat_key(st: os.stat_result) -> _StatKey:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _install(self, rules: list[Rule]) -> bool:
        """Make `rules` current; keeps the counters if the rules did not change."""
        h = _spec_hash(rules)
        if h == self._hash:
            return False
        self._rules = rules
        self._hash = h
        self._seen = [0] * len(rules)
        self._fired_rule = [0] * len(rules)
        return True

    def _refresh(self) -> None:
        try:
            st = os.stat(self.fault_spec)
        except FileNotFoundError:
            self._key = None
            if self._install([]):
                self._write_fired()
            return
        key = self._stat_key(st)
        if key == self._key or key == self._bad_key:
            return
        try:
            with open(self.fault_spec) as f:
                rules = parse_spec(f.read())
        except FileNotFoundError:
            return  # replaced between stat and open: the next operation sees the new file
        except (OSError, ValueError) as exc:
            self._bad_key = key
            log.warning("fault spec %s ignored, previous rules kept: %s", self.fault_spec, exc)
            return
        self._key = key
        if self._install(rules):
            self._write_fired()

    def _fired_doc(self) -> dict[str, Any]:
        return {
            "total": self._fired_total,
            "by_op": dict(self._fired_by_op),
            "rules": list(self._fired_rule),
            "spec_hash": self._hash,
        }

    def _write_fired(self) -> None:
        try:
            _replace_json(self.fired_path, self._fired_doc())
        except OSError as exc:
            log.warning("cannot write %s: %s", self.fired_path, exc.strerror)

    def _check(self, op: str, off: int, n: int) -> None:
        """Count this operation against the rules; raise or delay as the first firing says."""
        with self._lock:
            self._refresh()
            fire: Rule | None = None
            for i, rule in enumerate(self._rules):
                if not rule.matches(op, off, n):
                    continue
                seen = self._seen[i]
                self._seen[i] = seen + 1
                if fire is None and rule.covers(seen):
                    fire = rule
                    if rule.errno is not None:
                        self._fired_rule[i] += 1
                        self._fired_total += 1
                        self._fired_by_op[op] += 1
            if fire is not None and fire.errno is not None:
                self._write_fired()
        if fire is None:
            return
        if fire.delay_ms:
            time.sleep(fire.delay_ms / 1000)
        if fire.errno is not None:
            raise OSError(fire.errno, f"{os.strerror(fire.errno)} (injected by {self.fault_spec})")

    # -- Backend ----------------------------------------------------------------------------

    def fired(self) -> dict[str, Any]:
        """What `<fault_spec>.fired` says, from memory."""
        with self._lock:
            return self._fired_doc()

    def size(self) -> int:
        return self._inner.size()

    def read(self, off: int, size: int) -> bytes:
        check_range(off, size, self._inner.size())
        self._check("read", off, size)
        return self._inner.read(off, size)

    def readinto(self, off: int, buf: memoryview) -> None:
        check_range(off, buf.nbytes, self._inner.size())
        self._check("read", off, buf.nbytes)
        self._inner.readinto(off, buf)

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        n = memoryview(data).nbytes
        check_range(off, n, self._inner.size())
        self._check("write", off, n)
        self._inner.write(off, data)

    def flush(self) -> None:
        self._check("flush", 0, 0)
        self._inner.flush()

    def write_durable(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Subject to both the "write" and the "flush" rules."""
        n = memoryview(data).nbytes
        check_range(off, n, self._inner.size())
        self._check("write", off, n)
        self._check("flush", 0, 0)
        self._inner.write_durable(off, data)

    def close(self) -> None:
        self._inner.close()

    def __repr__(self) -> str:
        return f"FaultBackend({self._inner!r}, fault_spec={self.fault_spec!r})"
