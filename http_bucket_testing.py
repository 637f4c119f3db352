"""What the tests of http_bucket share: servers, clients, waits, bodies, store checks.

Not a test module (pytest collects ``test_*.py`` only) and it defines no
TestCase, so importing it adds no test anywhere.  Standard library only
(plus http_bucket itself): ``python3 -m unittest -v test_scaleout`` runs on
a bare interpreter in CI.

    from http_bucket_testing import (
        POLL_TIMEOUT, ServerProcess, assert_store_consistent, wait_until)

    with ServerProcess(directory, ("--fsync", "false")) as server:
        reply = server.request("PUT", "/upload/a.txt", b"data")
        assert reply.status == 201, reply
        wait_until(lambda: ..., POLL_TIMEOUT, what="the sweep")
    contents = assert_store_consistent(directory)

A TcpRelay stands between a client and a server (or acts as an HTTP
proxy): it counts the bytes each way, cuts a connection after N bytes,
and answers chosen requests itself (503 or 507 with Retry-After):

    with TcpRelay(server.port) as relay:
        relay.cut_upstream(8 * 1024 * 1024)    # the next upload breaks there, once
        ... client against relay.url("files/x/") ...
        assert relay.upstream < limit, relay.upstream

Contracts: ``wait_until`` returns the predicate's true value or raises
AssertionError naming what it waited for; a ServerProcess is stopped by its
PID (SIGTERM, a bounded wait, then SIGKILL) and keeps every run's log; the
store checks raise AssertionError saying which path is wrong.

Two optional suites, off unless their variable is set (HTTP_BUCKET_BROWSER,
HTTP_BUCKET_INTEROP; .ci/run sets them for one interpreter), import what
they need only when used and skip, naming what is missing, without it:

    with Browser() as browser:                   # Debian's Chromium, Playwright
        page = browser.new_page(viewport=(1280, 800), color_scheme="dark")
        page.goto(server.url("/"))
        print("saved", save_screenshot(page, "index-dark"))

    run = tus_upload(path, server.url("/upload/a.bin"), "--protocol", "ietf-draft-05")
    assert run.returncode == 0 and run.result["ok"], run   # interop/tus-upload.cjs
"""

import base64
import collections
import contextlib
import errno
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import http_bucket  # noqa: E402  (after the path is set)

SERVER_SCRIPT = os.path.join(HERE, "http_bucket.py")
CURL = shutil.which("curl")  # None: the curl tests skip

# ===========================================================================
# Timeouts: every wait of every test is bounded by one of these (seconds)
# ===========================================================================

STARTUP_TIMEOUT = 30.0  # a server to answer /healthz ready: it binds at once
                        # but loads its index in a thread (well under 1 s
                        # here); 30 s, the largest of the old copies' bounds,
                        # is for a loaded CI machine
STOP_TIMEOUT = 10.0     # SIGTERM gets this long before SIGKILL (the server
                        # waits up to SHUTDOWN_GRACE, 30 s, for uploads in
                        # flight; a test that wants that waits itself)
IO_TIMEOUT = 30.0       # socket timeout of every client connection: the
                        # largest body a test moves (20 MiB) takes well under
                        # a second on loopback; slower requests (a listing
                        # of 100,000 names) pass their own
POLL_TIMEOUT = 20.0     # an "eventually" condition (staging emptied after a
                        # disconnect, a log line written, a sweep run every
                        # 0.2 s removing a 1.7 s retention)
CURL_TIMEOUT = 30.0     # one curl run, like IO_TIMEOUT
READY_PROBE_TIMEOUT = 5.0  # one /healthz probe while waiting for startup
PORT_ATTEMPTS = 3       # free_port() races other processes: a server that
                        # finds its port taken is started again on another

# ===========================================================================
# Small helpers: ports, environment, waiting, files, digests
# ===========================================================================

#: Every variable the server reads: none may leak in from the caller's shell.
SERVER_VARIABLES = frozenset(
    ["ARCHIVE_DIR", "ARCHIVE_URI", "CHECKSUM_TYPE", "MAX_CONTENT_LENGTH"]
    + list(http_bucket.REPLICATE_VARIABLES)
    + [setting.env for setting in http_bucket.SETTINGS])
SERVER_PREFIXES = ("BUCKET_", "HTTP_BUCKET_")  # e.g. HTTP_BUCKET_NO_MAGIC

ALL_DIGESTS = ("md5", "sha1", "sha256", "sha512")  # what /checksum/ can look up
DEFAULT_DIGESTS = tuple(http_bucket.DEFAULT_DIGESTS)  # what a server computes
                                                      # unless BUCKET_DIGESTS


def free_port():
    """A TCP port of 127.0.0.1 nobody listens on right now (bound to port 0,
    then released: another process may take it before the server does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(extra=None):
    """A copy of os.environ without any variable the server reads, plus ``extra``."""
    environ = {name: value for name, value in os.environ.items()
               if name not in SERVER_VARIABLES and not name.startswith(SERVER_PREFIXES)}
    environ.update(extra or {})
    return environ


def wait_until(predicate, timeout, interval=0.02, what="a condition"):
    """Call ``predicate`` every ``interval`` seconds until it returns a true value.

    Returns that value.  Raises AssertionError naming ``what`` when it is
    still false at a call made ``timeout`` seconds or more after the first
    (so it is called at least once, even with a timeout of 0).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def files_under(path, relative=False):
    """Every non-directory entry below ``path`` (files and symlinks, also
    symlinks to directories), sorted; full paths, or relative to ``path``."""
    found = []
    for parent, dirs, names in os.walk(path):
        links = [name for name in dirs if os.path.islink(os.path.join(parent, name))]
        found.extend(os.path.join(parent, name) for name in names + links)
    if relative:
        found = [os.path.relpath(full, path) for full in found]
    return sorted(found)


def digests_of(data, algorithms=ALL_DIGESTS):
    """{algorithm: hex digest} of ``data``."""
    return {name: hashlib.new(name, data).hexdigest() for name in algorithms}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def zip_of(members, compression=zipfile.ZIP_STORED):
    """The bytes of a zip archive of ``members`` ({name: content})."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def sha256_file(path):
    """Hex sha256 of the file at ``path``, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def b64(raw):
    """Base64 of ``raw`` bytes as text (Content-MD5, Repr-Digest, Basic)."""
    return base64.b64encode(raw).decode("ascii")


# ===========================================================================
# Responses
# ===========================================================================


class Headers(dict):
    """Response header fields under lower-case names; lookups ignore case.

    A repeated field keeps its last value; ``get_all`` gives every value
    of a field in order (WWW-Authenticate is sent as several lines).
    """

    def __init__(self, fields=()):
        if hasattr(fields, "items"):
            fields = fields.items()
        self.fields = [(name.lower(), value) for name, value in fields]
        super().__init__(self.fields)

    def get_all(self, name):
        return [value for field, value in self.fields if field == name.lower()]

    def __getitem__(self, name):
        return super().__getitem__(name.lower())

    def __contains__(self, name):
        return super().__contains__(name.lower())

    def get(self, name, default=None):
        return super().get(name.lower(), default)


class Reply:
    """One HTTP response read whole: ``status``, ``headers`` (Headers), ``body``."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = Headers(headers)
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def json(self):
        """The body parsed as JSON (ValueError when it is not)."""
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Reply %d %r>" % (self.status, self.body[:300])


def reply_of(response):
    """Read an http.client response whole into a Reply (the caller closes
    the connection)."""
    body = response.read()
    return Reply(response.status, response.getheaders(), body)


def read_raw_response(stream):
    """One response read from a binary file over a raw socket: a Reply.

    Handles Content-Length framed bodies (and none); a 100 Continue comes
    back as its own Reply.  Raises ConnectionError when the server closed.
    """
    line = stream.readline(65537)
    if not line:
        raise ConnectionError("connection closed before a response")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = []
    while True:
        line = stream.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    status = int(parts[1])
    length = int(Headers(headers).get("content-length", "0"))
    body = stream.read(length) if status >= 200 and length else b""
    return Reply(status, headers, body)


# ===========================================================================
# The server as a subprocess
# ===========================================================================


def unverified_tls_context():
    """A client TLS context that trusts any certificate (a test's own)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class ServerProcess:
    """``http_bucket.py PORT -b BIND -d DIRECTORY *args`` as a subprocess.

    ``env`` is added to the caller's environment cleaned of every server
    setting (clean_environment); ``cwd`` defaults to ``directory``;
    ``python_flags`` go before the script (``-I -S``).  With ``--certfile``
    among ``args`` (or BUCKET_CERTFILE in ``env``) it speaks HTTPS:
    requests use ``context`` (default: one that trusts any certificate).

    ``start`` picks a free port and returns once /healthz says the index
    is ready; ``stop`` (SIGTERM, then SIGKILL) and ``kill`` (SIGKILL) end
    the run; ``restart`` starts again on the same directory.  Output
    (stdout and stderr) goes to an anonymous file per run: ``log_text()``
    is the current or last run's, ``logs`` holds every ended run's.  A
    context manager: ``with ServerProcess(...) as server`` starts and stops.
    """

    def __init__(self, directory, args=(), env=None, cwd=None, python_flags=(),
                 bind="127.0.0.1", context=None):
        self.directory = directory
        self.args = [str(arg) for arg in args]
        self.env = dict(env or {})
        self.cwd = cwd or directory
        self.python_flags = list(python_flags)
        self.bind = bind
        self.tls = "--certfile" in self.args or bool(self.env.get("BUCKET_CERTFILE"))
        if context is None and self.tls:
            context = unverified_tls_context()
        self.context = context
        self.proc = None        # the Popen of the current (or last) run
        self.port = None
        self.returncode = None  # of the last run that ended
        self.logs = []
        self._log = None        # the current run's output file; None: not running

    # -- life cycle --------------------------------------------------------------

    def command(self):
        # One process unless the test asks for workers: what a test reads
        # (its journal, its staging) is then in one place.
        workers = [] if "--workers" in self.args or "BUCKET_WORKERS" in self.env \
            else ["--workers", "1"]
        return ([sys.executable] + self.python_flags
                + [SERVER_SCRIPT, str(self.port), "-b", self.bind, "-d", self.directory]
                + workers + self.args)

    def start(self, reconciled=False, timeout=STARTUP_TIMEOUT):
        """Start a run and wait until /healthz has index_ready (and
        ``reconciled``, when asked) true; returns self.

        Raises AssertionError with the server's log when it exits or is not
        ready within ``timeout`` seconds (it is stopped then).
        """
        if self._log is not None:
            raise RuntimeError("server already running (pid %d)" % self.proc.pid)
        os.makedirs(self.cwd, exist_ok=True)
        for _attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            self._log = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(self.command(), env=clean_environment(self.env),
                                         cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT)
            try:
                if self._wait_ready(reconciled, timeout):
                    return self
            except BaseException:
                self.stop()
                raise
            self._end_run()  # the port was taken: another one
        raise AssertionError("server found its port taken %d times:\n%s"
                             % (PORT_ATTEMPTS, self.log_text()))

    def _wait_ready(self, reconciled, timeout):
        """True once ready; False when the port was taken; raises otherwise."""
        deadline = time.monotonic() + timeout
        problem = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_text()
                if os.strerror(errno.EADDRINUSE) in log:
                    return False
                raise AssertionError("server exited with %s at startup:\n%s"
                                     % (self.proc.returncode, log))
            try:
                reply = self.request("GET", "/healthz", timeout=READY_PROBE_TIMEOUT,
                                     context=unverified_tls_context() if self.tls else None)
                health = reply.json() if reply.status == 200 else {}
                if health.get("index_ready") and (health.get("reconciled") or not reconciled):
                    return True
                problem = reply
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = exc
            time.sleep(0.05)
        raise AssertionError("server not %s after %.0f s (%r):\n%s"
                             % ("reconciled" if reconciled else "ready", timeout, problem,
                                self.log_text()))

    @property
    def running(self):
        """A run was started and not ended by stop() or kill() (the process
        may still have exited by itself)."""
        return self._log is not None

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM to the PID, SIGKILL after ``timeout`` seconds; ends the run.

        Returns the exit status (of the last run when none is running).
        """
        if self._log is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        return self._end_run()

    def kill(self):
        """SIGKILL to the PID and its workers' (a crash: nothing is cleaned
        up); ends the run."""
        if self._log is None:
            return self.returncode
        for pid in self.worker_pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        return self._end_run()

    def worker_pids(self):
        """The PIDs of the worker processes (--workers N) of this run."""
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as handle:
                return [int(pid) for pid in handle.read().split()]
        except OSError:
            return []

    def pids(self):
        """This run's PID and its workers' (each has its own journal and staging)."""
        return [self.proc.pid] + self.worker_pids()

    def _end_run(self):
        self.proc.wait(STOP_TIMEOUT)
        self.returncode = self.proc.returncode
        self.logs.append(self.log_text())
        self._log.close()
        self._log = None
        return self.returncode

    def restart(self, reconciled=False):
        """stop(), then start() on the same directory (a new port)."""
        self.stop()
        return self.start(reconciled)

    def __enter__(self):
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False

    # -- what it wrote and where ---------------------------------------------------

    def log_text(self):
        """Everything the current run wrote so far (or the last run's)."""
        if self._log is None:
            return self.logs[-1] if self.logs else ""
        # pread: the server writes through the same file offset, so
        # seeking this file object would move where its lines land.
        descriptor = self._log.fileno()
        size = os.fstat(descriptor).st_size
        pieces, offset = [], 0
        while offset < size:
            piece = os.pread(descriptor, size - offset, offset)
            if not piece:
                break
            pieces.append(piece)
            offset += len(piece)
        return b"".join(pieces).decode("utf-8", "replace")

    def _entries_of_this_run(self, parent, suffix=""):
        """The entries of ``parent`` named "<host>-<pid>-<hex><suffix>" of
        this run's processes (the server, or its workers)."""
        markers = ["-%d-" % pid for pid in self.pids()]
        names = os.listdir(parent)
        found = [os.path.join(parent, name) for name in sorted(names)
                 if name.endswith(suffix) and any(marker in name for marker in markers)]
        if not found:
            raise AssertionError("nothing of pids %s in %s: %s" % (self.pids(), parent, names))
        return found

    def staging_dirs(self):
        """This run's staging directories (staging/<host>-<pid>-<hex>): one,
        or one per worker."""
        return self._entries_of_this_run(os.path.join(self.directory, "staging"))

    def staging_dir(self):
        """This run's (first) staging directory."""
        return self.staging_dirs()[0]

    def journal_paths(self):
        """This run's journals (index/<host>-<pid>-<hex>.log): one per process."""
        return self._entries_of_this_run(os.path.join(self.directory, "index"), ".log")

    def journal_path(self):
        """This run's (first) journal."""
        return self.journal_paths()[0]

    # -- clients -----------------------------------------------------------------------

    def url(self, path=""):
        return "%s://127.0.0.1:%d/%s" % ("https" if self.tls else "http", self.port,
                                         path.lstrip("/"))

    def connection(self, timeout=IO_TIMEOUT, context=None):
        """A new http.client connection (HTTPS for a TLS server); not yet connected."""
        if self.tls:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=context or self.context)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def raw_socket(self, timeout=IO_TIMEOUT):
        """A plain TCP socket connected to the server; the caller closes it."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=IO_TIMEOUT,
                context=None, **kwargs):
        """One request on a fresh connection: a Reply.  ``kwargs`` go to
        HTTPConnection.request (``encode_chunked=True``)."""
        connection = self.connection(timeout, context)
        try:
            connection.request(method, path, body=body, headers=headers or {}, **kwargs)
            return reply_of(connection.getresponse())
        finally:
            connection.close()


def start_server(directory, *args, reconciled=False, **options):
    """ServerProcess(directory, args, **options), started (``reconciled``:
    see ServerProcess.start); the caller stops it."""
    return ServerProcess(directory, args, **options).start(reconciled)


# ===========================================================================
# A relay between a client and a server: counts bytes, cuts, refuses
# ===========================================================================


class Refusal:
    """A canned answer for the next ``count`` connections whose first
    request matches ``method`` and ``path_prefix`` (None: any)."""

    def __init__(self, status, headers, count, method=None, path_prefix=None):
        self.status = status
        self.headers = dict(headers)
        self.count = count
        self.method = method
        self.path_prefix = path_prefix

    def matches(self, method, target):
        path = urllib.parse.urlsplit(target).path
        return (self.count > 0 and self.method in (None, method)
                and (self.path_prefix is None or path.startswith(self.path_prefix)))


class TcpRelay:
    """A TCP relay from a free port of 127.0.0.1 to ``target_port`` (the
    client's way to a server, or an HTTP proxy: the server takes the
    absolute-form targets a proxy is sent, and ``CONNECT`` opens a tunnel
    to the target whatever it names, counted in ``tunnels``).  A context
    manager.

    ``upstream`` / ``downstream`` count the bytes relayed from clients and
    back, ``connections`` the connections accepted, ``refused`` the answers
    made up.  ``cut_upstream(n)`` / ``cut_downstream(n)`` close the next
    connection that has relayed ``n`` bytes that way, exactly there, once.
    ``refuse(status, headers, count, method, path_prefix)``: the next
    ``count`` matching requests (each the first on its connection) get that
    answer, after their body is read, and the connection is closed.
    ``when_upstream(n, action)`` calls ``action()`` once a connection has
    sent ``n`` bytes.  Threads are daemons; ``close`` stops accepting.
    """

    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.lock = threading.Lock()
        self.upstream = self.downstream = self.connections = self.refused = 0
        self.tunnels = 0
        self.cuts = {"up": None, "down": None}
        self.refusals = []
        self.actions = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path=""):
        return "http://127.0.0.1:%d/%s" % (self.port, path.lstrip("/"))

    def reset_counts(self):
        with self.lock:
            self.upstream = self.downstream = self.connections = self.refused = 0

    def cut_upstream(self, count):
        self.cuts["up"] = count

    def cut_downstream(self, count):
        self.cuts["down"] = count

    def refuse(self, status, headers, count=1, method=None, path_prefix=None):
        self.refusals.append(Refusal(status, headers, count, method, path_prefix))

    def when_upstream(self, count, action):
        self.actions.append([count, action])

    def close(self):
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    client.close()
                    return
                head += data
            if self._refused(client, head):
                return
            server = socket.create_connection(self.target, timeout=IO_TIMEOUT)
            if head.startswith(b"CONNECT "):  # an HTTPS proxy's tunnel: then bytes as they are
                with self.lock:
                    self.tunnels += 1
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                head = head.split(b"\r\n\r\n", 1)[1]
        except OSError:
            client.close()
            return
        state = {"up": 0, "down": 0, "closed": False}
        threading.Thread(target=self._pump, args=(server, client, "down", state, b""),
                         daemon=True).start()
        self._pump(client, server, "up", state, head)

    def _refused(self, client, head):
        """Answer with a Refusal matching the first request, if any."""
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target = rest.rpartition(" ")[0]
        with self.lock:
            refusal = next((r for r in self.refusals if r.matches(method, target)), None)
            if refusal is None:
                return False
            refusal.count -= 1
            self.refused += 1
            self.upstream += len(head)
        fields = Headers(line.partition(":")[::2] for line in lines[1:])
        length = int(fields.get("content-length", "0").strip() or 0)
        body = len(head.split(b"\r\n\r\n", 1)[1])
        while body < length:
            data = client.recv(min(65536, length - body))
            if not data:
                break
            body += len(data)
            with self.lock:
                self.upstream += len(data)
        answer = json.dumps({"code": refusal.status, "status": "error",
                             "error": "refused by the test relay"}).encode()
        extra = "".join("%s: %s\r\n" % item for item in refusal.headers.items())
        client.sendall(("HTTP/1.1 %d Refused\r\nContent-Type: application/json\r\n"
                        "Content-Length: %d\r\n%sConnection: close\r\n\r\n"
                        % (refusal.status, len(answer), extra)).encode() + answer)
        client.close()
        return True

    def _pump(self, source, sink, way, state, first):
        """Relay ``source`` to ``sink`` until either ends or a cut."""
        data = first
        try:
            while True:
                if not data:
                    data = source.recv(65536)
                    if not data:
                        break
                data, cut = self._count(way, state, data)
                sink.sendall(data)
                if cut:
                    break
                data = b""
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _count(self, way, state, data):
        """(the part of ``data`` to relay, whether to cut after it)."""
        actions = []
        with self.lock:
            cut = self.cuts[way]
            if cut is not None and state[way] + len(data) >= cut:
                data = data[:cut - state[way]]
                self.cuts[way] = None
            else:
                cut = None
            state[way] += len(data)
            setattr(self, way + "stream", getattr(self, way + "stream") + len(data))
            if way == "up":
                for pending in self.actions:
                    if pending[1] is not None and state["up"] >= pending[0]:
                        actions.append(pending[1])
                        pending[1] = None
        for action in actions:
            action()
        return data, cut is not None


# ===========================================================================
# multipart/form-data bodies
# ===========================================================================

BOUNDARY = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"  # what a browser sends

#: One part.  ``disposition`` (text or bytes) replaces the Content-Disposition
#: value made of ``name`` and ``filename`` (to send quoting, filename*, or
#: bytes no client should); ``headers`` are more (name, value) fields.
FormPart = collections.namedtuple(
    "FormPart", "name filename content content_type headers disposition",
    defaults=(None, None, b"", None, (), None))


def file_part(filename, content, name="file", content_type="application/octet-stream"):
    """A file part as curl -F and browsers send it."""
    return FormPart(name, filename, content, content_type)


def field_part(name, value):
    """A plain form field (no filename, no Content-Type)."""
    return FormPart(name, None, value)


def _header_bytes(value):
    return value if isinstance(value, bytes) else value.encode("utf-8")


def part_head(part):
    """The header block of ``part``, without the blank line after it."""
    disposition = part.disposition
    if disposition is None:
        disposition = 'form-data; name="%s"' % part.name
        if part.filename is not None:
            disposition += '; filename="%s"' % part.filename
    fields = [("Content-Disposition", disposition)]
    if part.content_type:
        fields.append(("Content-Type", part.content_type))
    fields += list(part.headers)
    return b"\r\n".join(_header_bytes(name) + b": " + _header_bytes(value)
                        for name, value in fields)


def multipart_body(parts, boundary=BOUNDARY, preamble=b"", epilogue=b""):
    """(body, Content-Type value) of a multipart/form-data request.

    ``parts`` are FormParts; the body ends with the close delimiter and a
    CRLF, as browsers send it, then ``epilogue``.
    """
    boundary = _header_bytes(boundary)
    pieces = [preamble]
    for part in parts:
        pieces += [b"--", boundary, b"\r\n", part_head(part), b"\r\n\r\n", part.content, b"\r\n"]
    pieces += [b"--", boundary, b"--\r\n", epilogue]
    return b"".join(pieces), "multipart/form-data; boundary=" + boundary.decode("latin-1")


# ===========================================================================
# The store on disk: paths and consistency
# ===========================================================================


def blob_path(directory, sha256):
    """Where the blob of ``sha256`` lives: blob/ab/cd/<sha256>."""
    return os.path.join(directory, "blob", sha256[:2], sha256[2:4], sha256)


def tree_path(directory, sha256):
    """Where the archive of ``sha256`` is expanded: explode/ab/cd/<sha256>."""
    return os.path.join(directory, "explode", sha256[:2], sha256[2:4], sha256)


def staging_leftovers(directory):
    """Every entry below the staging directories of ``directory``, relative
    to staging/ (the per-process directories themselves are not counted)."""
    root = os.path.join(directory, "staging")
    if not os.path.isdir(root):
        return []
    found = []
    for process in sorted(os.listdir(root)):
        for parent, dirs, names in os.walk(os.path.join(root, process)):
            found.extend(os.path.relpath(os.path.join(parent, name), root)
                         for name in dirs + names)
    return sorted(found)


def assert_staging_empty(directory, timeout=POLL_TIMEOUT):
    """Wait (bounded) until no staging directory of ``directory`` holds anything.

    A request's staged files are gone once it is answered; after a client
    vanished, once the server noticed.  Raises AssertionError listing what
    is left.
    """
    try:
        wait_until(lambda: not staging_leftovers(directory), timeout,
                   what="staging/ of %s to be empty" % directory)
    except AssertionError as exc:
        raise AssertionError("%s; it holds %s" % (exc, staging_leftovers(directory)[:20])) \
            from None


#: What assert_store_consistent found: {sha256: blob path} and
#: {name relative to the directory: sha256} for files/, explode/, replica/.
StoreContents = collections.namedtuple("StoreContents", "blobs names")

NAME_TOPS = ("files", "explode", "replica")  # where names of blobs live


def assert_store_consistent(directory, timeout=POLL_TIMEOUT):
    """Check the store in ``directory``; returns StoreContents.

    - staging/ holds nothing (waited for up to ``timeout`` seconds, see
      assert_staging_empty);
    - every file under blob/ is blob/ab/cd/<sha256> and its content hashes
      to that name;
    - every regular file under files/, explode/ and replica/ is a hardlink
      (same device and inode) of a blob.  Symlinks are not checked.

    Raises AssertionError naming the first path that breaks a rule.  For
    "nothing of this request is left", compare the result with one taken
    before the request.
    """
    assert_staging_empty(directory, timeout)
    blobs, inodes = {}, {}
    for path in files_under(os.path.join(directory, "blob")):
        name = os.path.basename(path)
        if os.path.relpath(path, directory) != os.path.join("blob", name[:2], name[2:4], name):
            raise AssertionError("blob %s is not at blob/ab/cd/<sha256>" % path)
        if sha256_file(path) != name:
            raise AssertionError("blob %s holds other content than its name says" % path)
        info = os.lstat(path)
        blobs[name] = path
        inodes[(info.st_dev, info.st_ino)] = name
    names = {}
    for top in NAME_TOPS:
        for path in files_under(os.path.join(directory, top)):
            info = os.lstat(path)
            if os.path.islink(path):
                continue
            relative = os.path.relpath(path, directory)
            if (info.st_dev, info.st_ino) not in inodes:
                raise AssertionError("%s is not a hardlink of any blob (%d links)"
                                     % (relative, info.st_nlink))
            names[relative] = inodes[(info.st_dev, info.st_ino)]
    return StoreContents(blobs, names)


# ===========================================================================
# Optional suites: browser tests and interop tests, on one interpreter only
# ===========================================================================
#
# Each is off unless its variable says otherwise, so a plain `pytest` (and
# every interpreter of .ci/run but one) skips them, saying why:
#   HTTP_BUCKET_BROWSER=1        browser tests run; they skip when playwright
#                                or Chromium is missing
#   HTTP_BUCKET_BROWSER=require  the same, but a missing piece fails the test
#                                (.ci/run sets this once its installs worked)
#   HTTP_BUCKET_INTEROP=1|require  the same for the Node clients in interop/
# The server never sees these (clean_environment drops HTTP_BUCKET_*).

BROWSER_VARIABLE = "HTTP_BUCKET_BROWSER"
INTEROP_VARIABLE = "HTTP_BUCKET_INTEROP"


def _suite_mode(variable):
    """'off', 'on' or 'require', from the variable's value."""
    value = os.environ.get(variable, "").strip().lower()
    if value in ("", "0", "no", "off", "false"):
        return "off"
    return "require" if value == "require" else "on"


def _suite_enabled(variable, what):
    """Raise unittest.SkipTest unless ``variable`` turns the suite on."""
    if _suite_mode(variable) == "off":
        raise unittest.SkipTest(
            "%s off: set %s=1 to run them (.ci/run does on one interpreter, CI_E2E_PYTHON)"
            % (what, variable))


def _missing(variable, reason):
    """A prerequisite is missing: SkipTest, or AssertionError under =require."""
    if _suite_mode(variable) == "require":
        raise AssertionError("%s=require, but %s" % (variable, reason))
    raise unittest.SkipTest(reason)


# ===========================================================================
# Browser tests: Debian's Chromium driven by Playwright's sync API
# ===========================================================================

CHROMIUM = "/usr/bin/chromium"  # Debian's package; HTTP_BUCKET_CHROMIUM overrides
#: Headless, as root, on a machine whose only network is loopback: without
#: the background-networking flags Chromium keeps trying Google's hosts.
#: (Playwright adds --headless itself, and gives every launch a fresh
#: --user-data-dir of its own, removed at close; it refuses one in args.)
CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
    "--no-default-browser-check", "--disable-dev-shm-usage")
BROWSER_TIMEOUT = 30.0  # Chromium's start, and every Playwright action or
                        # wait (goto, click, expect): Playwright's own default;
                        # a page of a loopback server loads in well under 1 s
DEFAULT_VIEWPORT = (1280, 800)


def chromium_executable():
    """The Chromium the browser tests launch: $HTTP_BUCKET_CHROMIUM or /usr/bin/chromium."""
    return os.environ.get("HTTP_BUCKET_CHROMIUM") or CHROMIUM


class Browser:
    """Headless Chromium (Debian's, never a downloaded one) under Playwright.

        with Browser() as browser:
            page = browser.new_page(viewport=(390, 844), color_scheme="dark")
            page.goto(server.url("/"))
            save_screenshot(page, "index-dark")

    ``start`` raises unittest.SkipTest when the suite is off
    (HTTP_BUCKET_BROWSER), when playwright is not importable or when there
    is no Chromium at chromium_executable() (AssertionError instead under
    HTTP_BUCKET_BROWSER=require); a Chromium that is there but does not
    start is an error.  Every ``new_page`` has a context of its own
    (cookies, storage, viewport, color scheme); ``close`` ends them all and
    the browser.  One Browser at a time per thread (Playwright's sync API).
    """

    def __init__(self, executable=None, args=(), timeout=BROWSER_TIMEOUT):
        self.executable = executable
        self.args = list(CHROMIUM_ARGS) + list(args)
        self.timeout = timeout
        self.browser = None  # playwright's Browser once started
        self._playwright = None

    def start(self):
        """Launch Chromium; returns self."""
        _suite_enabled(BROWSER_VARIABLE, "browser tests")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:
            _missing(BROWSER_VARIABLE, "playwright is not installed (%s): pip install -r "
                     "requirements-browser.txt" % exc)
        executable = self.executable or chromium_executable()
        if not os.access(executable, os.X_OK):
            _missing(BROWSER_VARIABLE, "no Chromium at %s: apt-get install chromium "
                     "fonts-dejavu-core (or bash .ci/install-e2e)" % executable)
        self._playwright = sync_playwright().start()
        try:
            self.browser = self._playwright.chromium.launch(
                executable_path=executable, headless=True, args=self.args,
                timeout=self.timeout * 1000)
        except BaseException:
            self._playwright.stop()
            self._playwright = None
            raise
        return self

    def new_page(self, viewport=DEFAULT_VIEWPORT, color_scheme="light", **context_options):
        """A page in a new context: ``viewport`` (width, height) in CSS pixels,
        ``color_scheme`` "light" / "dark" / "no-preference"; more keywords go
        to Playwright's Browser.new_context (locale, device_scale_factor, ...)."""
        if self.browser is None:
            raise RuntimeError("Browser not started")
        width, height = viewport
        context = self.browser.new_context(
            viewport={"width": width, "height": height}, color_scheme=color_scheme,
            **context_options)
        context.set_default_timeout(self.timeout * 1000)
        return context.new_page()

    def close(self):
        """Close every page and context, the browser, and Playwright's driver."""
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            self.browser = None
            if self._playwright is not None:
                self._playwright.stop()
                self._playwright = None

    def __enter__(self):
        if self.browser is None:
            self.start()
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


@contextlib.contextmanager
def browser_page(viewport=DEFAULT_VIEWPORT, color_scheme="light", **context_options):
    """A Chromium page for one ``with`` block: a Browser with one new_page
    (see there for the arguments and for when it skips)."""
    with Browser() as browser:
        yield browser.new_page(viewport, color_scheme, **context_options)


SCREENSHOTS_VARIABLE = "HTTP_BUCKET_SCREENSHOTS"
SCREENSHOTS_SAVED = []  # every path save_screenshot wrote in this process
_screenshots = {}       # "dir": this process's screenshot folder, once made


def screenshot_dir():
    """The folder for this run's screenshots, made on the first call.

    $HTTP_BUCKET_SCREENSHOTS when set (created if missing), else a new
    http_bucket-screenshots-XXXXXX under the temporary directory, kept
    after the run so the pictures can be looked at.  Its path is printed
    once per process on stderr (pytest shows it in the summary: conftest.py).
    """
    if "dir" not in _screenshots:
        chosen = os.environ.get(SCREENSHOTS_VARIABLE)
        if chosen:
            os.makedirs(chosen, exist_ok=True)
        else:
            chosen = tempfile.mkdtemp(prefix="http_bucket-screenshots-")
        _screenshots["dir"] = os.path.abspath(chosen)
        sys.stderr.write("screenshots of this run: %s\n" % _screenshots["dir"])
    return _screenshots["dir"]


def screenshot_path(name):
    """Where the screenshot ``name`` goes: screenshot_dir()/<name>.png, with
    every character but letters, digits, '.', '_' and '-' made '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if not safe.endswith(".png"):
        safe += ".png"
    return os.path.join(screenshot_dir(), safe)


def save_screenshot(page, name, full_page=True):
    """Save a PNG of a Playwright ``page`` as screenshot_path(name); returns the path."""
    path = screenshot_path(name)
    page.screenshot(path=path, full_page=full_page)
    SCREENSHOTS_SAVED.append(path)
    return path


# ===========================================================================
# Interop tests: Node clients in interop/ (tus-js-client)
# ===========================================================================

INTEROP_DIR = os.path.join(HERE, "interop")
TUS_DRIVER = os.path.join(INTEROP_DIR, "tus-upload.cjs")
NODE_MIN_MAJOR = 18     # tus-js-client 4.3.1's "engines"
NPM_TIMEOUT = 300.0     # npm ci of interop/ (21 small packages): a few
                        # seconds here; the bound is for a slow registry
NODE_TIMEOUT = 60.0     # one run of a driver: a few MiB over loopback

#: A node ready to run interop/'s drivers: ``node`` (its path), ``version``
#: ("20.20.2"), ``directory`` (interop/, whose node_modules is installed).
InteropNode = collections.namedtuple("InteropNode", "node version directory")

#: What a driver run gave: ``returncode``, ``result`` (its last stdout line
#: parsed as JSON, or None), ``stdout``, ``stderr``.
DriverRun = collections.namedtuple("DriverRun", "returncode result stdout stderr")

_interop = {}  # "ready": InteropNode, or "reason": why not (tried once per process)


def _node_modules_installed(directory):
    """True when every package of package-lock.json is in node_modules at its locked version."""
    try:
        with open(os.path.join(directory, "package-lock.json"), encoding="utf-8") as handle:
            packages = json.load(handle)["packages"]
    except (OSError, ValueError, KeyError):
        return False
    for where, locked in packages.items():
        if not where.startswith("node_modules/"):
            continue
        try:
            with open(os.path.join(directory, where, "package.json"), encoding="utf-8") as handle:
                if json.load(handle).get("version") != locked.get("version"):
                    return False
        except (OSError, ValueError):
            return False
    return True


def _prepare_interop(timeout):
    """An InteropNode, or a text saying what is missing."""
    node = shutil.which("node")
    if node is None:
        return "node is not on PATH (Debian: apt-get install nodejs npm)"
    try:
        version = subprocess.run([node, "--version"], stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return "%s --version failed: %s" % (node, exc)
    if major < NODE_MIN_MAJOR:
        return "node %s is too old: tus-js-client needs %d or newer" % (version, NODE_MIN_MAJOR)
    import fcntl  # POSIX only, like the server
    with open(os.path.join(INTEROP_DIR, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing
        if not _node_modules_installed(INTEROP_DIR):
            npm = shutil.which("npm")
            if npm is None:
                return "interop/node_modules is not installed and npm is not on PATH"
            command = [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts",
                       "--loglevel=error"]
            try:
                done = subprocess.run(command, cwd=INTEROP_DIR, stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return "npm ci in interop/ took over %.0f s" % timeout
            except OSError as exc:
                return "npm ci in interop/ did not start: %s" % exc
            if done.returncode != 0 or not _node_modules_installed(INTEROP_DIR):
                output = (done.stdout + done.stderr).strip().splitlines()[-5:]
                return "npm ci in interop/ failed (exit %d): %s" % (done.returncode,
                                                                   " | ".join(output))
    return InteropNode(node, version.lstrip("v"), INTEROP_DIR)


def interop_node(timeout=NPM_TIMEOUT):
    """A node (18 or newer) with interop/node_modules installed: an InteropNode.

    Runs ``npm ci`` in interop/ (at most ``timeout`` seconds) when its
    node_modules is missing or differs from package-lock.json; tried once
    per process.  Raises unittest.SkipTest when the suite is off
    (HTTP_BUCKET_INTEROP), or when node is missing or too old, or npm is
    missing or fails (AssertionError instead under HTTP_BUCKET_INTEROP=require).
    """
    _suite_enabled(INTEROP_VARIABLE, "interop tests")
    if not _interop:
        prepared = _prepare_interop(timeout)
        _interop["ready" if isinstance(prepared, InteropNode) else "reason"] = prepared
    if "reason" in _interop:
        _missing(INTEROP_VARIABLE, _interop["reason"])
    return _interop["ready"]


def tus_upload(*arguments, timeout=NODE_TIMEOUT):
    """Run ``node interop/tus-upload.cjs *arguments``: a DriverRun.

        run = tus_upload(path, server.url("/upload/a.bin"),
                         "--protocol", "ietf-draft-05", "--chunk-size", "65536")
        assert run.returncode == 0 and run.result["ok"], run

    (``--help`` lists the options.)  Skips like interop_node.  Raises
    AssertionError with the driver's output when it runs over ``timeout``
    seconds.
    """
    ready = interop_node()
    command = [ready.node, TUS_DRIVER] + [str(argument) for argument in arguments]
    try:
        done = subprocess.run(command, cwd=ready.directory, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("%s ran over %.0f s; stdout %r, stderr %r"
                             % (" ".join(command), timeout, exc.stdout, exc.stderr)) from None
    result = None
    lines = done.stdout.strip().splitlines()
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = None
    return DriverRun(done.returncode, result, done.stdout, done.stderr)
