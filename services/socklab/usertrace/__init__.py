"""Trace every socket call of an unmodified Python program, in the lab's trace format.

    env = child_env(os.environ, "/tmp/prog.trace.gz")
    subprocess.run([sys.executable, "prog.py"], env=env)
    header, records = socklab.trace.read_trace("/tmp/prog.trace.gz")

``child_env`` puts ``inject/`` first on ``PYTHONPATH``: its ``sitecustomize``
runs when the interpreter starts, calls :func:`install_from_env`, then imports
the ``sitecustomize`` the image would have run otherwise (Debian ships one).
If tracing cannot start, the program says so in one line on stderr
(``socklab: tracing is off: <why>``) and runs untraced.

What :func:`install` patches, once per process:

* methods of the Python class ``socket.socket`` (every socket is one, whether
  made by the program, ``accept()``, ``create_connection()`` or asyncio):
  :data:`SOCKET_CALLS`; and ``__init__``, only to forget a descriptor that a
  new socket reuses;
* ``select.select``, ``select.poll`` and ``select.epoll`` (:data:`WAIT_CALLS`),
  before ``selectors`` is imported, and ``selectors``' classes that hold them,
  so that ``selectors`` and asyncio wait through the traced versions.

Records are the lab's trace format 1 (:mod:`socklab.trace`), written at exit
by :class:`socklab.trace.Tracer`: ``t_s`` is a call's start (seconds since
install, ``time.perf_counter``); ``conn`` numbers each socket in order of first
sight (a descriptor reused after ``close()`` gets a new number), -1 for a wait;
``call`` is the method's name; ``asked`` the bytes asked (data length, buffer
size or ``nbytes``), for a wait the descriptors waited on (select: the entries
of its three lists), for ``setblocking`` 1 or 0, for ``settimeout`` the timeout
in ms (-1 for None), else 0; ``returned`` the bytes returned (``sendall``: its
data length), ready descriptors for a wait, 0 for the other calls, -1 when the
call raised (and for ``connect_ex``, when it returned an error); ``errno`` the
error's name ("EAGAIN", "EINPROGRESS", "ECONNREFUSED", ...), "timeout" for a
socket timeout, the exception's class name for any other exception (a
``gaierror``, or the ``SystemExit`` of SIGTERM in a blocked ``accept()``), ""
on success; ``n`` is 1. Exceptions and return values pass through unchanged
(the same objects; only a call with the wrong number or names of arguments
gets another TypeError message). The send queue of each connected stream
socket is sampled as the lab's clients do (``outq``), by a thread that starts
with the first connection.

The header holds ``"mode": "program"``, ``"workload": "program"``,
``"program"`` (``sys.argv[0]`` at exit), ``"pid"`` and ``"sockets"``: one
``{"conn", "kind", "local", "peer"}`` per socket number, ``kind`` being
``connect``, ``accept``, ``listen`` or ``other``; addresses are ``host:port``
(``[host]:port`` for IPv6, socklab.address.format_peer), null where there
is none. A non-blocking connect's addresses are taken at the first later call
on the socket that succeeds (or at its close); an ``other`` socket's local
address when it is closed.

What tracing changes in the program, so that its trace is written:

* **SIGTERM**: if its handler is the default one at install, a handler is
  installed that raises ``SystemExit(143)`` (128 + 15) in the main thread: the
  program then ends through its ``finally`` blocks and atexit (where the trace
  is written) instead of dying at once, and its exit status is 143 rather than
  "killed by signal 15"; a bare ``except:`` can catch it. A handler the
  program sets itself replaces it (and then the program decides).
* The trace is written at interpreter exit (``atexit``); ``os._exit`` and
  SIGKILL leave no trace. A failure to write prints one line on stderr.
* ``SOCKLAB_TRACE_FILE`` is removed from the environment at start, so that
  Python programs it starts do not write the same file.
* After ``fork()`` the child runs untraced (the originals are put back) and
  never writes the parent's trace; the send-queue sampler thread is paused
  around the fork so the parent forks with no thread of ours.
* ``select.select`` is a ``staticmethod`` (callable, and not bound when a class
  holds it, as ``selectors.SelectSelector`` does), ``select.poll`` and
  ``select.epoll`` Python classes; ``socket``, ``selectors``, ``gzip`` and
  ``json`` are imported at start, and about 50 ms more go to start and exit.

Stdlib only, like the rest of the image's package.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Any, Callable, Mapping

ENV_TRACE_FILE = "SOCKLAB_TRACE_FILE"
INJECT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inject")
# The directory holding the ``socklab`` package (services/ here, the image's
# site of the package there): on PYTHONPATH so that sitecustomize finds it.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SOCKET_CALLS = ("connect", "connect_ex", "accept", "listen", "send", "sendall", "sendto", "sendmsg",
                "recv", "recv_into", "recvfrom", "recvfrom_into", "shutdown", "close",
                "setblocking", "settimeout")
WAIT_CALLS = ("select", "poll", "epoll")

# A non-blocking connect under way: its addresses are known once it completes.
_CONNECT_PENDING = frozenset(("EINPROGRESS", "EAGAIN", "EALREADY"))

_session: "_Session | None" = None


def child_env(base_env: Mapping[str, str], trace_path: str) -> dict[str, str]:
    """``base_env`` with what makes a Python program started with it trace its socket calls into ``trace_path``."""
    env = dict(base_env)
    parts = [INJECT_DIR, PACKAGE_PARENT]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env[ENV_TRACE_FILE] = trace_path
    return env


def install_from_env() -> None:
    """:func:`install` into the file ``SOCKLAB_TRACE_FILE`` names, if it is set (and unset it)."""
    path = os.environ.pop(ENV_TRACE_FILE, "")
    if path:
        install(path)


def install(trace_path: str) -> None:
    """Trace every socket call of this process from now on, and write the trace at exit.

    Raises OSError, before patching anything, when ``trace_path`` cannot be
    written. A second call does nothing.
    """
    global _session
    if _session is not None:
        return
    path = os.path.abspath(trace_path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise OSError(f"cannot write the trace {path}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OSError(f"cannot write the trace {path}: {directory} is not writable")
    if os.path.isdir(path):
        raise OSError(f"cannot write the trace {path}: it is a directory")
    session = _Session(path)
    session.start()  # puts every original back if it fails
    _session = session


# ------------------------------------------------------------------ the session

class _Session:
    """One process's tracing: the tracer, the patches, and what happens at fork and exit."""

    def __init__(self, path: str) -> None:
        import itertools
        import threading

        self.path = path
        self.pid = os.getpid()
        self.patches: list[tuple[Any, str, bool, Any]] = []  # (owner, name, was in its __dict__, original)
        self.sigterm_installed = False
        self.disable: Callable[[], None] = lambda: None
        self.stopped = False
        self.conns: dict[int, int] = {}  # fd -> conn
        self.next_conn = itertools.count().__next__
        self.sockets: dict[int, tuple[str, Any, Any]] = {}  # conn -> (kind, local, peer), raw addresses
        self.watched: dict[int, int] = {}  # conn -> fd, sampled for the send queue
        self.early_records: list[tuple] = []  # a wait between patching select and making the tracer
        self.sampling = False
        self.paused_for_fork = False
        self.watch_lock = threading.Lock()
        self.tracer: Any = None
        self.records: list[tuple] = []
        self.originals: dict[int, Any] = {}  # id(a replacement) -> what it replaces
        self.fileno: Callable[[Any], int] = lambda sock: -1  # _socket.socket.fileno, once instrumented
        self.is_stream: Callable[[Any], bool] = lambda sock: False

    def start(self) -> None:
        import atexit
        import select
        import signal
        import threading
        import time

        clock = time.perf_counter
        origin = clock()
        epoll_original = getattr(select, "epoll", None)
        waits = _instruments(self, clock, origin, select.select, select.poll, epoll_original)
        self.disable = waits.disable
        self.originals = {id(waits.select): select.select, id(waits.select.__func__): select.select,
                          id(waits.poll): select.poll, id(waits.epoll): epoll_original}
        try:
            # select first: `selectors` (which `socket` imports) binds select.select
            # and the poller classes when its classes are defined.
            self._patch(select, "select", waits.select)
            self._patch(select, "poll", waits.poll)
            if epoll_original is not None:
                self._patch(select, "epoll", waits.epoll)
            import _socket
            import selectors
            import socket

            # For a `selectors` imported before now (nothing does, before sitecustomize).
            self._patch(selectors.SelectSelector, "_select", waits.select)
            self._patch(selectors.PollSelector, "_selector_cls", waits.poll)
            if epoll_original is not None and hasattr(selectors, "EpollSelector"):
                self._patch(selectors.EpollSelector, "_selector_cls", waits.epoll)

            from ..trace import Tracer

            self.tracer = Tracer(self.path, clock, origin, {
                "mode": "program", "workload": "program", "program": sys.argv[0] if sys.argv else "",
                "pid": self.pid, "sockets": []})
            self.records = self.tracer.records
            waits.record_with(self.tracer.add)
            for name, function in waits.socket_methods(_socket.socket, socket.socket).items():
                self._patch(socket.socket, name, function)
        except BaseException:
            self.unpatch()
            raise

        os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent,
                            after_in_child=self._after_fork_in_child)
        atexit.register(self.write_at_exit)
        if (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self.sigterm_installed = True

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        own = name in vars(owner)
        # The attribute as stored (a class's staticmethod, not the function it gives), and
        # never one of ours: `selectors` imported after select was patched holds them already.
        original = vars(owner)[name] if own else None
        original = self.originals.get(id(original), original)
        self.patches.append((owner, name, own, original))
        setattr(owner, name, replacement)

    def unpatch(self) -> None:
        """Every original back in its place."""
        while self.patches:
            owner, name, own, original = self.patches.pop()
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

    # -- sockets seen

    def new_conn(self, fd: int) -> int:
        """The index of a socket seen for the first time (or its index, if another thread was first)."""
        return self.conns.setdefault(fd, self.next_conn())

    def connected(self, sock: Any, conn: int, kind: str, local: Any, peer: Any) -> None:
        """A connected (or accepted) socket: its addresses for the header, its send queue sampled."""
        self.sockets[conn] = (kind, local, peer)
        if self.is_stream(sock):
            self.watch(conn, self.fileno(sock))

    def watch(self, conn: int, fd: int) -> None:
        with self.watch_lock:
            if self.paused_for_fork:
                self._resume_sampling()
            if not self.sampling and not self.stopped:
                self.tracer.start_outq_sampling()
                self.sampling = True
            self.watched[conn] = fd
            self.tracer.watch(conn, fd)

    def unwatch(self, conn: int) -> None:
        with self.watch_lock:
            if self.paused_for_fork:
                self._resume_sampling()
            if self.watched.pop(conn, None) is not None:
                self.tracer.unwatch(conn)

    def _resume_sampling(self) -> None:
        """The sampler again, with every socket it watched (watch_lock held)."""
        self.paused_for_fork = False
        if not self.stopped:
            self.tracer.start_outq_sampling()
            for conn, fd in self.watched.items():
                self.tracer.watch(conn, fd)

    # -- fork: no thread of ours across it; the child is not traced

    def _before_fork(self) -> None:
        self.watch_lock.acquire()
        # Tracer can only stop its sampler by writing: stop it here, and start
        # a new one after the fork.
        sampler = getattr(self.tracer, "_sampler", None)
        if sampler is not None and self.sampling and not self.paused_for_fork:
            sampler.stop()
            self.tracer._sampler = None
            self.paused_for_fork = True

    def _after_fork_in_parent(self) -> None:
        try:
            # From 3.13 the parent counts its threads for fork()'s DeprecationWarning
            # after these hooks: there the sampler resumes with the next connection
            # event (watch, unwatch) instead.
            if self.paused_for_fork and sys.version_info < (3, 13):
                self._resume_sampling()
        finally:
            self.watch_lock.release()

    def _after_fork_in_child(self) -> None:
        import threading

        self.stopped = True
        self.disable()
        self.unpatch()
        self.records.clear()
        self.tracer._sampler = None
        self.sampling = self.paused_for_fork = False
        self.watch_lock = threading.Lock()  # the parent's is held across the fork
        if self.sigterm_installed:
            import signal
            try:
                if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except ValueError:  # forked from a thread other than the main one
                pass

    # -- the end

    def write_at_exit(self) -> None:
        """Write the trace (the parent's process only); one line on stderr if it cannot be."""
        if self.stopped or os.getpid() != self.pid:
            return
        self.stopped = True
        self.disable()
        import signal
        try:
            if self.sigterm_installed and signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
                # A second SIGTERM must not abandon the trace half written.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:
            pass
        tracer = self.tracer
        try:
            # A daemon thread may still be calling: sort and write a copy.
            tracer.records = self.records[:]
            tracer.header["program"] = sys.argv[0] if sys.argv else tracer.header["program"]
            tracer.header["sockets"] = self.socket_list()
            tracer.write()
        except Exception as exc:  # noqa: BLE001 - the program's exit must go on
            sys.stderr.write(f"socklab: trace not written: {_one_line(exc)}\n")
            sys.stderr.flush()

    def socket_list(self) -> list[dict[str, Any]]:
        """The header's ``sockets``: every socket numbered, with its kind and addresses."""
        from ..address import format_peer

        def address(raw: Any) -> str | None:
            if isinstance(raw, tuple) and len(raw) >= 2 and isinstance(raw[0], str):
                unbound = raw[1] == 0 and raw[0] in ("0.0.0.0", "::")
                return None if unbound else format_peer(raw)
            if isinstance(raw, bytes):  # an AF_UNIX name; abstract ones start with NUL
                raw = "@" + raw[1:].decode("utf-8", "backslashreplace") if raw[:1] == b"\0" else \
                    raw.decode("utf-8", "backslashreplace")
            return raw if isinstance(raw, str) and raw else None

        result = []
        for conn in range(self.next_conn()):  # every index given so far
            kind, local, peer = self.sockets.get(conn, ("other", None, None))
            result.append({"conn": conn, "kind": kind, "local": address(local), "peer": address(peer)})
        return result


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends the program as an exit would, so that atexit writes the trace."""
    raise SystemExit(128 + signum)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------ the wrappers

def _instruments(session: _Session, clock: Callable[[], float], origin: float, orig_select: Callable,
                 orig_poll: Callable, orig_epoll: Any) -> SimpleNamespace:
    """The replacements: ``select``, ``poll``, ``epoll``; ``socket_methods(_socket.socket,
    socket.socket)``, ``socket.socket``'s methods by name; ``record_with(add)``, where records go;
    ``disable()``, recording stops (the child after fork, the end at exit).

    Everything the per-call path needs is a local of this function (a closure
    cell for the wrappers): the clock, ``list.append``, the fd -> conn map's
    ``get``; one dict lookup per call finds the connection.
    """
    from errno import errorcode

    add: Callable[[tuple], None] = session.early_records.append  # until the tracer exists
    conns = session.conns
    conns_get = conns.get
    new_conn = session.new_conn
    pending: dict[int, bool] = {}  # conns whose non-blocking connect is under way
    sockets = session.sockets
    watched = session.watched
    connected = session.connected
    unwatch = session.unwatch

    def record_with(new_add: Callable[[tuple], None]) -> None:
        nonlocal add
        for record in session.early_records:
            new_add(record)
        session.early_records.clear()
        add = new_add

    def discard(record: tuple) -> None:
        pass

    def disable() -> None:
        nonlocal add
        add = discard

    def errname(exc: BaseException) -> str:
        if isinstance(exc, OSError):
            code = exc.errno
            if code is None:
                return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            return errorcode.get(code) or type(exc).__name__
        return type(exc).__name__

    def size(data: Any) -> int:
        """Bytes in a bytes-like object (0 if it is none)."""
        try:
            if type(data) is memoryview:
                return data.nbytes
            if type(data) is bytes or type(data) is bytearray:
                return len(data)
            with memoryview(data) as view:
                return view.nbytes
        except Exception:  # noqa: BLE001 - the call itself reports what is wrong
            return 0

    def number(value: Any) -> int:
        try:
            return int(value.__index__())
        except Exception:  # noqa: BLE001
            return 0

    def fd_of(fileobj: Any) -> int:
        return int(fileobj) if isinstance(fileobj, int) else fileobj.fileno()

    # -- socket calls; the three below are _socket.socket's, once socket_methods() is called

    fileno: Callable[[Any], int] = session.fileno
    getsockname: Callable[[Any], Any] = lambda sock: None
    getpeername: Callable[[Any], Any] = lambda sock: None

    def complete(sock: Any, conn: int) -> None:
        """A call on a socket whose non-blocking connect was under way succeeded: connected?"""
        if conn in pending:
            try:
                local, peer = getsockname(sock), getpeername(sock)
            except OSError:  # not yet (setblocking succeeds on a connecting socket)
                return
            pending.pop(conn, None)
            connected(sock, conn, "connect", local, peer)

    def conn_of(sock: Any) -> int:
        fd = fileno(sock)
        conn = conns_get(fd)
        return new_conn(fd) if conn is None else conn

    ASKED = object()  # a returned_of: the record's returned is its asked (sendall)

    def zero(result: Any) -> int:
        return 0

    def traced(name: str, invoke: Callable[[Any, Any, Any], Any], returned_of: Any = None, *,
               completes: bool = True, after: Callable[[Any, int, Any], None] | None = None,
               failed: Callable[[Any, int, str], None] | None = None,
               asked_if_failed: int | None = None, errno_of: Callable[[Any], str] | None = None,
               wait: bool = False) -> Callable[[Any, int, Any, Any], Any]:
        """The one shape of a traced socket call, as ``run(sock, asked, a, b)``: the call
        ``invoke(sock, a, b)`` timed, one record, what it returned or raised passed on
        unchanged (the same objects).

        Each method is a short function with the original's signature that computes
        ``asked`` and calls ``run`` with its arguments in the two slots ``a, b`` (send's
        data and flags go to the original as they are, with no function between): a
        wrapper taking ``*args`` would need no such function, but measured
        (bench/probes/tracer_overhead.py) it adds ~0.25 µs to a send() or recv(), over budget.

        ``returned_of(result)`` gives the record's ``returned`` (None: the result itself, a
        byte count; ASKED: ``asked``), ``errno_of(result)`` a success's ``errno`` (None: ""); a call
        that raised records ``asked_if_failed`` if given (a value valid only once the call
        accepted it). ``completes``: a success may complete a non-blocking connect under way;
        ``after(sock, conn, result)`` runs after a success's record, ``failed(sock, conn,
        errno_name)`` after a failure's. A ``wait`` (select, poll, epoll) is on no socket: its
        conn is -1, and ``sock`` is only passed on to ``invoke``.
        """
        completes = completes and not wait

        def run(self, asked, a, b):
            if wait:
                conn = -1
            else:
                conn = conns_get(fileno(self))
                if conn is None:
                    conn = conn_of(self)
            t0 = clock()
            try:
                result = invoke(self, a, b)
            except BaseException as exc:
                t1 = clock()
                error = errname(exc)
                add((t0 - origin, conn, name, asked if asked_if_failed is None else asked_if_failed, -1, error,
                     t1 - t0, 1))
                if failed is not None:
                    failed(self, conn, error)
                raise
            t1 = clock()
            returned = result if returned_of is None else asked if returned_of is ASKED else returned_of(result)
            add((t0 - origin, conn, name, asked, returned, "" if errno_of is None else errno_of(result), t1 - t0,
                 1))
            if completes and pending:
                complete(self, conn)
            if after is not None:
                after(self, conn, result)
            return result

        return run

    # -- waits

    run_select = traced("select", lambda _, lists, timeout: orig_select(*lists, timeout),
                        lambda ready: len(ready[0]) + len(ready[1]) + len(ready[2]), wait=True)
    run_poll = traced("poll", lambda poller, timeout, _: poller.poll(timeout), len, wait=True)
    run_epoll = traced("epoll", lambda poller, timeout, maxevents: poller.poll(timeout, maxevents), len, wait=True)

    def select(rlist, wlist, xlist, timeout=None, /):
        try:
            asked = len(rlist) + len(wlist) + len(xlist)
        except TypeError:  # iterators: consumed by the call, so count them first
            rlist, wlist, xlist = (_listed(x) for x in (rlist, wlist, xlist))
            try:
                asked = len(rlist) + len(wlist) + len(xlist)
            except TypeError:
                asked = 0
        return run_select(None, asked, (rlist, wlist, xlist), timeout)

    select.__doc__ = orig_select.__doc__

    class poll:
        """select.poll(), traced: each poll() is one record."""

        __slots__ = ("_poll", "_fds", "__weakref__")

        def __init__(self):
            self._poll = orig_poll()
            self._fds: set[int] = set()

        def register(self, fd, *eventmask):
            self._poll.register(fd, *eventmask)
            self._fds.add(fd_of(fd))

        def modify(self, fd, eventmask, /):
            self._poll.modify(fd, eventmask)

        def unregister(self, fd, /):
            self._poll.unregister(fd)
            self._fds.discard(fd_of(fd))

        def poll(self, timeout=None, /):
            return run_poll(self._poll, len(self._fds), timeout, None)

    epoll = None
    if orig_epoll is not None:
        class epoll:
            """select.epoll, traced: each poll() is one record."""

            __slots__ = ("_epoll", "_fds", "__weakref__")

            def __init__(self, *args, **kwargs):
                self._epoll = orig_epoll(*args, **kwargs)
                self._fds: set[int] = set()

            @classmethod
            def fromfd(cls, fd, /):
                self = cls.__new__(cls)
                self._epoll = orig_epoll.fromfd(fd)
                self._fds = set()
                return self

            @property
            def closed(self):
                return self._epoll.closed

            def fileno(self):
                return self._epoll.fileno()

            def close(self):
                self._epoll.close()
                self._fds.clear()

            def __enter__(self):
                self._epoll.__enter__()
                return self

            def __exit__(self, *exc_info):
                self._epoll.__exit__(*exc_info)
                self._fds.clear()

            def register(self, fd, *args, **kwargs):
                self._epoll.register(fd, *args, **kwargs)
                self._fds.add(fd_of(fd))

            def modify(self, fd, *args, **kwargs):
                self._epoll.modify(fd, *args, **kwargs)

            def unregister(self, fd):
                self._epoll.unregister(fd)
                self._fds.discard(fd_of(fd))

            def poll(self, timeout=None, maxevents=-1):
                return run_epoll(self._epoll, len(self._fds), timeout, maxevents)

    def socket_methods(base: type, socket_class: type) -> dict[str, Callable]:
        """``socket.socket``'s replacement methods (``base`` is ``_socket.socket``), by name."""
        nonlocal fileno, getsockname, getpeername
        fileno = base.fileno
        getsockname = base.getsockname
        getpeername = base.getpeername
        session.fileno = fileno
        from _socket import SOCK_STREAM

        raw_type = base.type  # socket.socket.type makes a SocketKind; this is the plain int
        session.is_stream = lambda sock: raw_type.__get__(sock) == SOCK_STREAM

        methods: dict[str, Any] = {}

        def method(function: Callable) -> Callable:
            """``function`` as the ``socket.socket`` method of its name."""
            function.__qualname__ = f"socket.{function.__name__}"
            function.__doc__ = getattr(socket_class, function.__name__).__doc__
            methods[function.__name__] = function
            return function

        # -- connecting

        def connect_failed(sock: Any, conn: int, error: str) -> None:
            if error in _CONNECT_PENDING:
                pending[conn] = True
            elif error == "EISCONN" and pending:
                complete(sock, conn)

        def connect_done(sock: Any, conn: int, result: Any) -> None:
            pending.pop(conn, None)
            try:
                connected(sock, conn, "connect", getsockname(sock), getpeername(sock))
            except OSError:
                pass

        orig_connect = socket_class.connect
        run_connect = traced("connect", lambda sock, address, b: orig_connect(sock, address), zero,
                             completes=False, after=connect_done, failed=connect_failed)

        @method
        def connect(self, address, /):
            return run_connect(self, 0, address, None)

        # connect_ex says an error by its result: recorded as connect's exception would be.
        def connect_ex_error(code: int) -> str:
            return (errorcode.get(code) or str(code)) if code else ""

        def connect_ex_done(sock: Any, conn: int, code: int) -> None:
            if code:
                connect_failed(sock, conn, connect_ex_error(code))
            else:
                connect_done(sock, conn, code)

        orig_connect_ex = socket_class.connect_ex
        run_connect_ex = traced("connect_ex", lambda sock, address, b: orig_connect_ex(sock, address),
                                lambda code: -1 if code else 0, completes=False, after=connect_ex_done,
                                errno_of=connect_ex_error)

        @method
        def connect_ex(self, address, /):
            return run_connect_ex(self, 0, address, None)

        def listen_done(sock: Any, conn: int, result: Any) -> None:
            try:
                sockets[conn] = ("listen", getsockname(sock), None)
            except OSError:
                pass

        orig_listen = socket_class.listen
        run_listen = traced("listen", lambda sock, backlog, b: orig_listen(sock, *backlog), zero,
                            completes=False, after=listen_done)

        @method
        def listen(self, *backlog):
            return run_listen(self, 0, backlog, None)

        def accept_done(sock: Any, conn: int, result: Any) -> None:
            new, peer = result
            try:
                connected(new, conn_of(new), "accept", getsockname(new), peer)
            except OSError:
                pass

        orig_accept = socket_class.accept
        run_accept = traced("accept", lambda sock, a, b: orig_accept(sock), zero, completes=False,
                            after=accept_done)

        @method
        def accept(self):
            return run_accept(self, 0, None, None)

        # -- sending

        orig_send = socket_class.send
        run_send = traced("send", orig_send)

        @method
        def send(self, data, flags=0, /):
            return run_send(self, len(data) if type(data) is bytes else size(data), data, flags)

        orig_sendall = socket_class.sendall
        run_sendall = traced("sendall", orig_sendall,
                             ASKED)  # all of it, or it raised

        @method
        def sendall(self, data, flags=0, /):
            return run_sendall(self, len(data) if type(data) is bytes else size(data), data, flags)

        orig_sendto = socket_class.sendto
        run_sendto = traced("sendto", lambda sock, args, b: orig_sendto(sock, *args))

        @method
        def sendto(self, *args):
            return run_sendto(self, size(args[0]) if args else 0, args, None)

        orig_sendmsg = socket_class.sendmsg
        run_sendmsg = traced("sendmsg", lambda sock, buffers, args: orig_sendmsg(sock, buffers, *args))

        @method
        def sendmsg(self, buffers=(), *args):
            if type(buffers) is not list and type(buffers) is not tuple:
                try:  # an iterator is consumed by the call: count what it yields
                    buffers = list(buffers)
                except TypeError:
                    pass
            try:
                asked = sum(size(b) for b in buffers)
            except TypeError:  # the call says what is wrong
                asked = 0
            return run_sendmsg(self, asked, buffers, args)

        # -- receiving

        orig_recv = socket_class.recv
        run_recv = traced("recv", orig_recv,
                          len)

        @method
        def recv(self, bufsize, flags=0, /):
            return run_recv(self, bufsize if type(bufsize) is int else number(bufsize), bufsize, flags)

        orig_recvfrom = socket_class.recvfrom
        run_recvfrom = traced("recvfrom", orig_recvfrom,
                              lambda result: len(result[0]))

        @method
        def recvfrom(self, bufsize, flags=0, /):
            return run_recvfrom(self, bufsize if type(bufsize) is int else number(bufsize), bufsize, flags)

        orig_recv_into = socket_class.recv_into
        run_recv_into = traced("recv_into", lambda sock, buffer, rest: orig_recv_into(sock, buffer, *rest))

        @method
        def recv_into(self, buffer, nbytes=0, flags=0):
            asked = (nbytes if type(nbytes) is int else number(nbytes)) or size(buffer)
            return run_recv_into(self, asked, buffer, (nbytes, flags))

        orig_recvfrom_into = socket_class.recvfrom_into
        run_recvfrom_into = traced("recvfrom_into",
                                   lambda sock, buffer, rest: orig_recvfrom_into(sock, buffer, *rest),
                                   lambda result: result[0])

        @method
        def recvfrom_into(self, buffer, nbytes=0, flags=0):
            asked = (nbytes if type(nbytes) is int else number(nbytes)) or size(buffer)
            return run_recvfrom_into(self, asked, buffer, (nbytes, flags))

        # -- the socket's state

        orig_shutdown = socket_class.shutdown
        run_shutdown = traced("shutdown", lambda sock, how, b: orig_shutdown(sock, how), zero)

        @method
        def shutdown(self, how, /):
            return run_shutdown(self, 0, how, None)

        orig_close = socket_class.close

        def close_and_forget(sock: Any, a: Any, b: Any) -> None:
            """The close timed: the original, then, if the descriptor really closed (not kept open
            by a makefile()), its number forgotten, since it may be reused."""
            fd = fileno(sock)
            conn = conns_get(fd)
            try:
                orig_close(sock)
            finally:
                if fileno(sock) < 0:
                    if conns_get(fd) == conn:
                        conns.pop(fd, None)
                    pending.pop(conn, None)

        run_close = traced("close", close_and_forget, zero, completes=False)

        @method
        def close(self):
            fd = fileno(self)
            conn = conns_get(fd)
            if conn is None:
                conn = conn_of(self)
            if pending:  # connected, never used: its addresses all the same
                complete(self, conn)
            if conn in watched:  # before the descriptor can be reused
                unwatch(conn)
            if conn not in sockets and fd >= 0:
                try:
                    sockets[conn] = ("other", getsockname(self), None)
                except OSError:
                    pass
            return run_close(self, 0, None, None)

        # Their asked is recorded only when the call accepted the value (0 when it raised).
        def setting(convert: Callable[[Any], int], value: Any) -> int:
            """``convert(value)``, or 0 for a value the call will refuse (and say why)."""
            try:
                return convert(value)
            except Exception:  # noqa: BLE001
                return 0

        orig_setblocking = socket_class.setblocking
        run_setblocking = traced("setblocking", lambda sock, flag, b: orig_setblocking(sock, flag), zero,
                                 completes=False, asked_if_failed=0)

        @method
        def setblocking(self, flag, /):
            return run_setblocking(self, setting(lambda flag: 1 if flag else 0, flag), flag, None)

        orig_settimeout = socket_class.settimeout
        run_settimeout = traced("settimeout", lambda sock, value, b: orig_settimeout(sock, value), zero,
                                completes=False, asked_if_failed=0)

        @method
        def settimeout(self, value, /):
            return run_settimeout(self, setting(lambda value: -1 if value is None else int(round(value * 1000)), value),
                                  value, None)

        orig_init = socket_class.__init__

        def __init__(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            # A descriptor closed behind close()'s back (garbage collection,
            # detach()) and now reused is a new socket: forget the old one.
            old = conns.pop(fileno(self), None)
            if old is not None and old in watched:
                unwatch(old)

        __init__.__qualname__ = "socket.__init__"
        __init__.__doc__ = orig_init.__doc__
        methods["__init__"] = __init__
        return methods

    # select.select is a builtin, which a class attribute does not bind
    # (selectors.SelectSelector._select): a staticmethod, callable since 3.10,
    # behaves the same in both places.
    return SimpleNamespace(select=staticmethod(select), poll=poll, epoll=epoll, socket_methods=socket_methods,
                           record_with=record_with, disable=disable)


def _listed(items: Any) -> Any:
    """``items`` as a list if it is an iterable without a length; else unchanged."""
    try:
        return list(items)
    except TypeError:
        return items
