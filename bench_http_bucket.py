#!/usr/bin/env python3
"""Benchmark of http_bucket.py (issue 6): the machine's ceilings and the server's figures.

    python3 bench_http_bucket.py              # full run, medians of 3 runs (~5-10 min)
    python3 bench_http_bucket.py --quick      # smoke run, small sizes, 1 run (< 3 min)
    python3 bench_http_bucket.py --only upload,head --runs 5 --json out.json
    python3 bench_http_bucket.py --with-1m    # adds the 1,000,000-blob startup case
    python3 bench_http_bucket.py --only peers # http_bucket against copyparty alone (~5 min)

Every measurement starts ``http_bucket.py`` as a subprocess on a free port of
127.0.0.1 over a fresh directory under the system's temporary directory, and
stops it by its PID.  Sections (``--only`` takes their names or letters):

  a ceilings  hashlib md5+sha256+sha512 in one thread and in three threads,
              sha256 alone, disk write (write + fsync), loopback TCP
  b upload    1 GiB by ``curl -T`` and ``curl -F``; PUT with --digests sha256;
              PUT with --fsync false (a separate, informative row)
  c small     2,000 distinct 16 KiB uploads over 8 keep-alive connections, PUT
              and multipart, after the file-system work of storing 2,000 such
              files (create, write, fsync, mkdir, link, fsync dir, unlink) in
              8 threads: that ceiling is measured here, just before, as it moves
  d head      HEAD /checksum/<sha256|md5|unknown>, GET /healthz, 16 connections
  e download  1 GiB GET /checksum/<sha256> by curl
  s scaling   1, 8 and 64 concurrent 1 MiB uploads
  x archives  expansion of a zip of 10,000 small files and of a 1 GiB tgz
              (members/s, MB/s); peak RSS while gzip and zip bombs of 1 GiB
              of zeros are stopped by the ratio limit
  l listing   a directory of 100,000 names listed as JSON: seconds, peak RSS
  k client    http_bucket.py push: a tree of 1,000 files summing to 1 GiB
              pushed into an empty store, then again unchanged (wall time,
              bytes that reached the server, counted by a relay); one 1 GiB
              file by push against curl -T, interleaved
  p peers     copyparty (pinned, installed by pip into a bench-only venv under
              ~/.cache/http_bucket-bench on first use; "copyparty: skipped
              (why)" when that fails) beside http_bucket, interleaved round by
              round (A B A B, at least 2 rounds, fresh servers; large
              transfers in reverse order every other round): 16 KiB
              distinct PUT and multipart uploads over 8 keep-alive
              connections with server CPU per upload; 512 MiB PUT and
              multipart by curl, the 3-digest ceiling in the same rounds, and
              the download right after; HEAD /checksum against copyparty's
              GET of a small file.  http_bucket runs at its defaults
              (--workers auto) for the goals and as one process
              (--workers 1) beside them.  Printed as a second table: each
              goal of the issue as a ratio, met or MISSED
  f startup   10,000 and 100,000 stored blobs (1,000,000 with --with-1m)
  z scale     1,000,000 generated blobs (10,000,000 with --big): start to
              index_ready and to reconciled without a snapshot and from one,
              memory per blob (private, and the shared mapped snapshot), per
              worker with --workers 2, bytes a restart writes, HEAD/s; with
              --before old.py the same for an older server on a copy of the
              journals; then 100,000 blobs on the GlusterFS volume of
              ../shared/dfs (root; started and stopped here when not mounted)
  g           peak RSS (VmHWM) is taken in b, c and the scaling section

Sections run in that order; stores of many files are deleted only at the end
(see SECTIONS).  Large transfers start after os.sync().
Tools: curl for b, e and p's large files; wrk (with generated Lua scripts)
for c, d, p and the scaling rows when it is installed (apt-get install wrk),
else a Python load generator (multiprocessing, raw sockets, keep-alive) whose
own ceiling against GET /healthz is reported.  Either way the generator's own
CPU time per request is printed beside the server's, so a reader sees whether
it could be the bottleneck.  MB means 10**6 bytes, MiB 2**20.

The table printed at the end has one row per figure: the median of the runs,
the goal of issue 6, the ratio to the goal (or to the ceiling it is measured
against) and pass/FAIL.  The JSON file holds every run's values too.
Standard library only (copyparty runs from its own venv); Python 3.9+.
"""

import argparse
import collections
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1000 * 1000

# Startup runs last: its many-file stores are the biggest deletion of the run,
# and on ext4 without a journal (this machine) creating a file scans the
# inodes deleted in the last minutes (recently_deleted in the kernel's
# profile), so every store of many files is deleted only at the very end.
SECTIONS = ("ceilings", "upload", "small", "head", "download", "scaling", "archives",
            "listing", "uploads", "limits", "resumable", "client", "peers", "startup", "scale")
LETTERS = {"a": ("ceilings",), "b": ("upload",), "c": ("small",), "d": ("head",),
           "e": ("download",), "f": ("startup",), "g": ("upload", "small"),
           "s": ("scaling",), "x": ("archives",), "l": ("listing",), "p": ("peers",),
           "u": ("uploads",), "m": ("limits",), "r": ("resumable",), "k": ("client",), "z": ("scale",)}

# Sizes of a full run and of a --quick smoke run.
FULL = dict(hash_bytes=512 * MiB, disk_bytes=1 * GiB, loopback_bytes=1 * GiB,
            big_bytes=1 * GiB, small_count=2000, small_size=16 * 1024,
            head_seconds=5, startup_counts=(10000, 100000),
            scaling_uploads=256, scaling_size=1 * MiB,
            zip_members=10000, tgz_bytes=1 * GiB, bomb_bytes=1 * GiB,
            listing_entries=100000, peer_small_count=2000, peer_big_bytes=512 * MiB,
            uploads_records=1000000, limits_uploads=6000, table_blobs=1000000,
            client_files=1000, client_bytes=1 * GiB, scale_blobs=1000000, dfs_blobs=100000)
QUICK = dict(hash_bytes=64 * MiB, disk_bytes=128 * MiB, loopback_bytes=256 * MiB,
             big_bytes=128 * MiB, small_count=400, small_size=16 * 1024,
             head_seconds=2, startup_counts=(10000,),
             scaling_uploads=64, scaling_size=1 * MiB,
             zip_members=1000, tgz_bytes=64 * MiB, bomb_bytes=256 * MiB,
             listing_entries=10000, peer_small_count=800, peer_big_bytes=128 * MiB,
            uploads_records=100000, limits_uploads=2000, table_blobs=100000,
            client_files=200, client_bytes=128 * MiB, scale_blobs=100000, dfs_blobs=10000)

SERVER_START_TIMEOUT = 30.0   # seconds until /healthz answers
CURL_TIMEOUT = 300            # seconds for one 1 GiB transfer
LOAD_TIMEOUT = 120            # seconds for one load-generator run
RSS_SAMPLE_SECONDS = 0.05     # VmRSS sampling period


def log(message):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stderr.flush()


# ===========================================================================
# Figures: every run's value, medians, goals, the table and the JSON
# ===========================================================================


class Figures:
    """Rows of the final table, in the order they were defined.

    A goal is ("min", value), ("max", value) or ("ceiling", key, factor):
    at least ``factor`` times the median of row ``key`` of the same run.
    """

    def __init__(self):
        self.rows = collections.OrderedDict()

    def define(self, key, figure, unit, goal=None, goal_text="", digits=0):
        if key not in self.rows:
            self.rows[key] = {"figure": figure, "unit": unit, "goal": goal,
                              "goal_text": goal_text, "digits": digits,
                              "runs": [], "extra": collections.defaultdict(list),
                              "notes": []}
        return self.rows[key]

    def add(self, key, value, **extra):
        row = self.rows[key]
        row["runs"].append(value)
        for name, item in extra.items():
            row["extra"][name].append(item)

    def note(self, key, text):
        if text not in self.rows[key]["notes"]:
            self.rows[key]["notes"].append(text)

    def median(self, key):
        row = self.rows.get(key)
        values = [value for value in (row["runs"] if row else []) if value is not None]
        return statistics.median(values) if values else None

    def judge(self, key):
        """(ratio, passed, goal text) of a row; ratio None when not judged."""
        row, value = self.rows[key], self.median(key)
        goal = row["goal"]
        if goal is None or value is None:
            return None, None, row["goal_text"] or ""
        if goal[0] == "ceiling":
            reference = self.median(goal[1])
            text = "≥ %g × %s" % (goal[2], self.rows[goal[1]]["figure"]
                                  if goal[1] in self.rows else goal[1])
            if reference:
                text = "≥ %.0f (%g × %.0f)" % (goal[2] * reference, goal[2], reference)
                ratio = value / reference
                return ratio, ratio >= goal[2], text
            return None, None, text
        kind, target = goal
        ratio = value / target if target else None
        text = row["goal_text"] or ("%s %s" % ("≥" if kind == "min" else "≤",
                                               self.format(target, row)))
        passed = value >= target if kind == "min" else value <= target
        return ratio, passed, text

    @staticmethod
    def format(value, row):
        if value is None:
            return "—"
        return ("%%.%df" % row["digits"]) % value

    def table(self):
        lines = [("figure", "median", "goal", "ratio / pass", "runs; notes")]
        for key, row in self.rows.items():
            value = self.median(key)
            ratio, passed, goal_text = self.judge(key)
            verdict = ""
            if passed is not None:
                verdict = "%.2f %s" % (ratio, "pass" if passed else "FAIL")
            elif ratio is not None:
                verdict = "%.2f" % ratio
            runs = ", ".join(self.format(run, row) for run in row["runs"])
            notes = "; ".join([runs] + row["notes"]) if len(row["runs"]) > 1 else "; ".join(row["notes"])
            shown = "%s %s" % (self.format(value, row), row["unit"]) if value is not None else "—"
            lines.append((row["figure"], shown, goal_text, verdict, notes))
        widths = [max(len(line[column]) for line in lines) for column in range(4)]
        out = []
        for number, line in enumerate(lines):
            out.append("| " + " | ".join(line[column].ljust(widths[column]) if column != 1
                                         else line[column].rjust(widths[column])
                                         for column in range(4)) + " | " + line[4])
            if number == 0:
                out.append("|" + "|".join("-" * (width + 2) for width in widths) + "|---")
        return "\n".join(out)

    def as_json(self):
        rows = collections.OrderedDict()
        for key, row in self.rows.items():
            ratio, passed, goal_text = self.judge(key)
            rows[key] = {"figure": row["figure"], "unit": row["unit"], "runs": row["runs"],
                         "median": self.median(key), "goal": goal_text,
                         "ratio": ratio, "pass": passed, "notes": row["notes"],
                         "extra": {name: {"runs": values, "median": _median_or_none(values)}
                                   for name, values in row["extra"].items()}}
        return rows


def _median_or_none(values):
    numbers = [value for value in values if isinstance(value, (int, float))]
    return statistics.median(numbers) if numbers else None


# ===========================================================================
# The server under test: start on a free port, wait, sample memory, stop
# ===========================================================================


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stat_fields(pid):
    """/proc/<pid>/stat after the command name: [state, ppid, ...] (None if gone)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid):
    """``pid`` and its live descendants (a server's worker processes)."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children[int(fields[1])].append(int(entry))
    members, pending = [], [pid]
    while pending:
        member = pending.pop()
        members.append(member)
        pending.extend(children.get(member, ()))
    return members


def cpu_seconds(pid):
    """User + system CPU seconds of ``pid``, of its children it has reaped, and
    of its live descendants (a server's worker processes): 0 if gone."""
    ticks = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields:  # utime, stime, cutime, cstime (proc(5) fields 14-17)
            ticks += sum(int(field) for field in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds():
    """CPU seconds of this process's children that it has reaped: the load
    generator's cost is the difference across one run (wrk, or the Python
    generator's processes; servers are reaped only when stopped)."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_status(pid):
    """{field: kB} of /proc/<pid>/status for VmRSS, VmHWM, RssAnon and
    RssFile (empty if gone)."""
    fields = {}
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                    name, value = line.split(":", 1)
                    fields[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return fields


class Server:
    """One http_bucket.py subprocess; ``stop`` ends it by PID (TERM, then KILL)."""

    name = "http_bucket"

    def __init__(self, script, directory, extra_args=(), workdir=None):
        self._launch(directory, workdir,
                     [sys.executable, script, "{port}", "-b", "127.0.0.1", "-d", directory]
                     + list(extra_args))

    def _launch(self, directory, workdir, command, env=None):
        """Start ``command`` ("{port}" in it becomes a free port), output to a log."""
        self.directory = directory
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = os.path.join(workdir or directory, "server-%d.log" % self.port)
        self.log_file = open(self.log_path, "wb")
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.started = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=self.log_file,
                                        stderr=self.log_file, stdin=subprocess.DEVNULL, env=env)
        self.pid = self.process.pid
        self.peak_sampled_kb = 0
        self._sampler = None
        self._sampling = threading.Event()

    def healthz(self, timeout=2.0):
        """The /healthz JSON, or None when the server does not answer yet."""
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()
        except (OSError, http.client.HTTPException):
            return None
        if response.status != 200:
            return None
        return json.loads(body.decode())

    def wait_listening(self, timeout=SERVER_START_TIMEOUT, poll=0.01):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("server exited with %s: %s" % (self.process.returncode,
                                                                 self.log_tail()))
            health = self.healthz()
            if health is not None:
                return health
            time.sleep(poll)
        raise RuntimeError("server did not answer /healthz in %.0f s: %s"
                           % (timeout, self.log_tail()))

    def wait_ready(self, timeout=SERVER_START_TIMEOUT, poll=0.01):
        """Seconds from launch until /healthz says index_ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.wait_listening(deadline - time.monotonic(), poll)
            if health.get("index_ready"):
                return time.monotonic() - self.started
            time.sleep(poll)
        raise RuntimeError("index not ready after %.0f s" % timeout)

    def status(self):
        return proc_status(self.pid)

    def largest(self, field):
        """The largest ``field`` (kB, e.g. VmHWM) among the server's processes:
        with workers, the one that served a single large upload."""
        return max([proc_status(member).get(field, 0) for member in process_tree(self.pid)]
                   or [0])

    def cpu(self):
        return cpu_seconds(self.pid)

    def wait_idle(self, quiet=0.2, timeout=5.0):
        """Wait (at most ``timeout`` s) until the server used no CPU for ``quiet``
        seconds, so its startup work is not charged to the first measurement."""
        deadline = time.monotonic() + timeout
        before = self.cpu()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.cpu()
            if now - before < 0.01:
                return
            before = now

    def start_sampling(self):
        """Sample VmRSS every 50 ms (a cross-check of VmHWM)."""
        self._sampling.set()
        members = process_tree(self.pid)  # the server and its workers, listed once

        def sample():
            while self._sampling.is_set():
                rss = max([proc_status(member).get("VmRSS", 0) for member in members] or [0])
                self.peak_sampled_kb = max(self.peak_sampled_kb, rss)
                time.sleep(RSS_SAMPLE_SECONDS)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop_sampling(self):
        self._sampling.clear()
        if self._sampler:
            self._sampler.join(1.0)

    def log_text(self):
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines=5):
        return " | ".join(self.log_text().strip().splitlines()[-lines:])

    def stop(self):
        self.stop_sampling()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log_file.close()


class CopypartyServer(Server):
    """copyparty as the peer (section p): its defaults, one volume that everyone
    may read and write, no accounts; its config (salts, sessions db) under the
    bench's work directory instead of ~/.config."""

    name = "copyparty"

    def __init__(self, python, directory, workdir):
        # -v DIR::rw: read and write for everybody (no move or delete right,
        # so a PUT to a taken name is stored under a new name, not over it).
        # --wram only allows uploads into a volume on a RAM disk (a tmpfs
        # /tmp): a no-op on disk, needed where the temporary directory is one.
        env = dict(os.environ, XDG_CONFIG_HOME=os.path.join(workdir, "copyparty-config"))
        self._launch(directory, workdir,
                     [python, "-m", "copyparty", "-i", "127.0.0.1", "-p", "{port}",
                      "-v", directory + "::rw", "--wram"], env)

    def healthz(self, timeout=2.0):
        """{} once GET / answers 200 (copyparty has no health route), else None."""
        try:
            status, _ = http_request(self, "GET", "/", timeout=timeout)
        except (OSError, http.client.HTTPException):
            return None
        return {} if status == 200 else None

    def wait_ready(self, timeout=SERVER_START_TIMEOUT, poll=0.01):
        self.wait_listening(timeout, poll)
        return time.monotonic() - self.started


class Servers:
    """Every server started, so the end of the run (or Ctrl-C) stops them all."""

    def __init__(self, script, workdir):
        self.script = script
        self.workdir = workdir
        self.live = []
        self.count = 0

    def fresh_dir(self, label):
        self.count += 1
        path = os.path.join(self.workdir, "store-%02d-%s" % (self.count, label))
        os.makedirs(path)
        return path

    def start(self, directory=None, extra_args=(), label="store", wait=True, one_process=True):
        directory = directory or self.fresh_dir(label)
        if one_process and "--workers" not in extra_args:
            # One process unless asked: its PID is the one whose memory and
            # CPU the figures read.
            extra_args = ("--workers", "1") + tuple(extra_args)
        server = Server(self.script, directory, extra_args, self.workdir)
        self.live.append(server)
        if wait:
            server.wait_ready()
        return server

    def start_script(self, script, directory, extra_args=(), wait=True):
        """A server from another script (an older http_bucket.py)."""
        server = Server(script, directory, extra_args, self.workdir)
        self.live.append(server)
        if wait:
            server.wait_ready()
        return server

    def start_copyparty(self, python, label="copyparty"):
        server = CopypartyServer(python, self.fresh_dir(label), self.workdir)
        self.live.append(server)
        server.wait_ready()
        return server

    def stop(self, server, remove_dir=True):
        server.stop()
        if server in self.live:
            self.live.remove(server)
        if remove_dir:
            shutil.rmtree(server.directory, ignore_errors=True)

    def stop_all(self):
        for server in list(self.live):
            try:
                self.stop(server, remove_dir=False)
            except Exception as exc:  # keep stopping the others
                log("could not stop server %d: %s" % (server.pid, exc))


def http_request(server, method, path, body=None, headers=None, timeout=30):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ===========================================================================
# a. Machine ceilings
# ===========================================================================


def random_buffers(count, size=MiB):
    return [os.urandom(size) for _ in range(count)]


def hash_rate(buffers, total, algorithms, threaded):
    """MB/s of hashing ``total`` bytes (cycling ``buffers``) with every algorithm."""
    rounds = total // len(buffers[0])

    def run(names):
        digests = [hashlib.new(name) for name in names]
        for number in range(rounds):
            data = buffers[number % len(buffers)]
            for digest in digests:
                digest.update(data)

    started = time.perf_counter()
    if threaded:
        threads = [threading.Thread(target=run, args=([name],)) for name in algorithms]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        run(algorithms)
    return rounds * len(buffers[0]) / (time.perf_counter() - started) / MB


def disk_rate(directory, total):
    """MB/s of writing ``total`` bytes in 1 MiB writes, then fsync."""
    path = os.path.join(directory, "disk-ceiling.bin")
    data = os.urandom(MiB)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(total // MiB):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    os.unlink(path)
    return total / seconds / MB


def loopback_rate(total):
    """MB/s of sendall(1 MiB) over a TCP connection on 127.0.0.1."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    received = [0, 0.0]

    def receive():
        connection, _ = listener.accept()
        buffer = bytearray(MiB)
        with connection:
            while received[0] < total:
                count = connection.recv_into(buffer)
                if not count:
                    break
                received[0] += count
        received[1] = time.perf_counter()

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    data = os.urandom(MiB)
    sender = socket.create_connection(listener.getsockname(), timeout=60)
    started = time.perf_counter()
    with sender:
        for _ in range(total // MiB):
            sender.sendall(data)
        receiver.join(60)
    listener.close()
    return received[0] / (received[1] - started) / MB


def small_file_rate(directory, count, size, threads=8):
    """Files/s of the file-system work one small upload needs, in ``threads``.

    Per file, as the store does it: create a staging file (O_EXCL), write
    ``size`` bytes, fsync, make blob/ab/cd, link the file there, fsync that
    directory, unlink the staging name.  No hashing, no HTTP.
    """
    root = tempfile.mkdtemp(prefix="small-files-", dir=directory)
    staging = os.path.join(root, "staging")
    os.makedirs(staging)
    data = os.urandom(size)

    def work(first):
        for number in range(first, count, threads):
            name = hashlib.sha256(b"%d" % number).hexdigest()
            staged = os.path.join(staging, "up-%d" % number)
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            blob_dir = os.path.join(root, "blob", name[:2], name[2:4])
            os.makedirs(blob_dir, exist_ok=True)
            os.link(staged, os.path.join(blob_dir, name))
            dir_fd = os.open(blob_dir, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
            os.unlink(staged)

    workers = [threading.Thread(target=work, args=(first,)) for first in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return count / (time.perf_counter() - started)  # files stay until the end


def define_ceilings(figures):
    figures.define("ceiling_3digest_1thread", "ceiling: md5+sha256+sha512, 1 thread", "MB/s")
    figures.define("ceiling_3digest_threads", "ceiling: md5+sha256+sha512, 3 threads (all cores)",
                   "MB/s")
    figures.define("ceiling_sha256", "ceiling: sha256 alone", "MB/s")
    figures.define("ceiling_disk", "ceiling: disk write + fsync", "MB/s")
    figures.define("ceiling_loopback", "ceiling: loopback TCP sendall 1 MiB", "MB/s")


def bench_ceilings(ctx, only_threaded=False):
    figures, sizes = ctx.figures, ctx.sizes
    define_ceilings(figures)
    buffers = random_buffers(16)
    three = ("md5", "sha256", "sha512")
    for run in range(ctx.runs):
        rate = hash_rate(buffers, sizes["hash_bytes"], three, threaded=True)
        figures.add("ceiling_3digest_threads", rate)
        log("ceiling 3 digests in threads: %.0f MB/s" % rate)
        if only_threaded:
            continue
        figures.add("ceiling_3digest_1thread", hash_rate(buffers, sizes["hash_bytes"], three, False))
        figures.add("ceiling_sha256", hash_rate(buffers, sizes["hash_bytes"], ("sha256",), False))
        figures.add("ceiling_disk", disk_rate(ctx.workdir, sizes["disk_bytes"]))
        figures.add("ceiling_loopback", loopback_rate(sizes["loopback_bytes"]))
        log("ceilings run %d: 1 thread %.0f, sha256 %.0f, disk %.0f, loopback %.0f MB/s" % (
            run + 1, figures.rows["ceiling_3digest_1thread"]["runs"][-1],
            figures.rows["ceiling_sha256"]["runs"][-1], figures.rows["ceiling_disk"]["runs"][-1],
            figures.rows["ceiling_loopback"]["runs"][-1]))
    if only_threaded:
        for key in list(figures.rows):
            if key.startswith("ceiling_") and not figures.rows[key]["runs"]:
                del figures.rows[key]


# ===========================================================================
# b, e. Large uploads and downloads with curl
# ===========================================================================


def size_label(count):
    return "%g GiB" % (count / GiB) if count >= GiB else "%g MiB" % (count / MiB)


def write_test_file(path, size, algorithms=("sha256",)):
    """Write ``size`` bytes (a text line, then random) to ``path`` and fsync it;
    returns {algorithm: hex digest}."""
    digests = [hashlib.new(name) for name in algorithms]
    log("writing a %d MiB test file" % (size // MiB))
    with open(path, "wb") as handle:
        head = b"http_bucket benchmark content, not an archive\n"
        for number in range(size // MiB):
            data = os.urandom(MiB) if number else head + os.urandom(MiB - len(head))
            for digest in digests:
                digest.update(data)
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # its writeback must not land in the first upload
    return {name: digest.hexdigest() for name, digest in zip(algorithms, digests)}


def make_big_file(ctx):
    """The large upload's content, made once."""
    if ctx.big_file:
        return ctx.big_file
    path = os.path.join(ctx.workdir, "big.bin")
    ctx.big_sha256 = write_test_file(path, ctx.sizes["big_bytes"])["sha256"]
    ctx.big_file = path
    return path


def settle():
    """Flush every dirty page before a timed transfer (a --fsync false run leaves
    a GiB behind; its writeback was charged to the next upload)."""
    os.sync()


def curl(arguments, timeout=CURL_TIMEOUT):
    """Run curl with -w "code time size"; returns (http code, seconds, output file text)."""
    command = ["curl", "-sS", "-w", "%{http_code} %{time_total}"] + arguments
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError("curl failed (%d): %s" % (result.returncode,
                                                     result.stderr.decode()[-300:]))
    code, seconds = result.stdout.decode().split()[-2:]
    return int(code), float(seconds)


UPLOAD_VARIANTS = [
    # key, figure, curl mode, server flags, goal
    ("upload_put", "1 GiB upload, curl -T (PUT)", "put", [],
     ("ceiling", "ceiling_3digest_threads", 0.9)),
    ("upload_multipart", "1 GiB upload, curl -F (multipart)", "multipart", [],
     ("ceiling", "ceiling_3digest_threads", 0.9)),
    ("upload_put_sha256", "1 GiB upload, curl -T, --digests sha256", "put",
     ["--digests", "sha256"], ("min", 600)),
    ("upload_put_nofsync", "1 GiB upload, curl -T, --fsync false (informative)", "put",
     ["--fsync", "false"], None),
]


def upload_once(ctx, server, mode):
    """One curl upload of the big file: (MB/s, response JSON)."""
    size = ctx.sizes["big_bytes"]
    response_path = os.path.join(ctx.workdir, "curl-response.json")
    if mode == "put":
        arguments = ["-o", response_path, "-T", ctx.big_file, server.url + "/upload/big.bin"]
    else:
        arguments = ["-o", response_path, "-F", "file=@%s" % ctx.big_file, server.url + "/upload"]
    code, seconds = curl(arguments)
    with open(response_path, "rb") as handle:
        answer = json.loads(handle.read().decode() or "{}")
    os.unlink(response_path)
    if code not in (200, 201):
        raise RuntimeError("upload answered %d: %s" % (code, answer))
    stored = answer["files"][0]["checksums"]["sha256"]
    if stored != ctx.big_sha256:
        raise RuntimeError("server stored sha256 %s, file has %s" % (stored, ctx.big_sha256))
    return size / seconds / MB, answer


def bench_upload(ctx):
    figures = ctx.figures
    if "ceiling_3digest_threads" not in figures.rows:
        log("measuring the 3-digest ceiling the upload goals refer to")
        bench_ceilings(ctx, only_threaded=True)
    make_big_file(ctx)
    label = size_label(ctx.sizes["big_bytes"])
    for key, figure, mode, flags, goal in UPLOAD_VARIANTS:
        figures.define(key, figure.replace("1 GiB", label), "MB/s", goal)
        rss_key = "rss_" + key
        rss_goal = ("max", 64) if not flags else None
        figures.define(rss_key, "peak RSS during " + figure.replace("1 GiB", label), "MiB",
                       rss_goal, digits=1)
        if not flags:
            figures.note(rss_key, "VmHWM of a server started for this upload alone")
    for run in range(ctx.runs):
        for key, figure, mode, flags, goal in UPLOAD_VARIANTS:
            settle()
            server = ctx.servers.start(extra_args=flags, label=key)
            try:
                base_kb = server.status().get("VmRSS", 0)
                cpu_before = server.cpu()
                server.start_sampling()
                rate, _ = upload_once(ctx, server, mode)
                server.stop_sampling()
                cpu = server.cpu() - cpu_before
                hwm_kb = server.status().get("VmHWM", 0)
            finally:
                ctx.servers.stop(server)
            figures.add(key, rate, server_cpu_s=cpu)
            figures.add("rss_" + key, hwm_kb / 1024.0, idle_mib=base_kb / 1024.0,
                        sampled_peak_mib=server.peak_sampled_kb / 1024.0)
            log("run %d %s: %.0f MB/s, server CPU %.1f s, peak RSS %.1f MiB (idle %.1f)"
                % (run + 1, key, rate, cpu, hwm_kb / 1024.0, base_kb / 1024.0))
    disk = figures.median("ceiling_disk")
    for key, figure, mode, flags, goal in UPLOAD_VARIANTS:
        row = figures.rows[key]
        cpu = _median_or_none(row["extra"]["server_cpu_s"])
        if cpu is not None:
            figures.note(key, "server CPU %.1f s" % cpu)
        if disk and figures.median(key) and "--fsync" not in flags:
            figures.note(key, "%.2f × disk write+fsync ceiling" % (figures.median(key) / disk))


def bench_download(ctx):
    figures = ctx.figures
    make_big_file(ctx)
    label = size_label(ctx.sizes["big_bytes"])
    figures.define("download", "%s download, GET /checksum/<sha256>, curl" % label, "MB/s",
                   ("min", 1000))
    server = ctx.servers.start(label="download")
    try:
        upload_once(ctx, server, "put")
        for run in range(ctx.runs):
            settle()
            code, seconds = curl(["-o", os.devnull, server.url + "/checksum/" + ctx.big_sha256])
            if code != 200:
                raise RuntimeError("download answered %d" % code)
            rate = ctx.sizes["big_bytes"] / seconds / MB
            figures.add("download", rate)
            log("run %d download: %.0f MB/s" % (run + 1, rate))
    finally:
        ctx.servers.stop(server)


# ===========================================================================
# x. Archives and l. listings
# ===========================================================================


def _timed_put(server, path, name):
    """PUT a file by curl: (seconds, the response's first file)."""
    response_path = path + ".response.json"
    code, seconds = curl(["-o", response_path, "-T", path, server.url + "/upload/" + name])
    with open(response_path, "rb") as handle:
        answer = json.loads(handle.read().decode() or "{}")
    os.unlink(response_path)
    if code not in (200, 201):
        raise RuntimeError("upload of %s answered %d: %s" % (name, code, answer))
    return seconds, answer["files"][0]


class _RandomReader:
    """A file-like object of ``size`` random bytes (tarfile reads it)."""

    def __init__(self, size):
        self.left = size

    def read(self, count=-1):
        count = self.left if count < 0 else min(count, self.left)
        self.left -= count
        return os.urandom(count)


def make_archives(ctx):
    """The zip of many small files, the tgz, and two bombs, made once."""
    import gzip
    import tarfile
    import zipfile
    sizes, paths = ctx.sizes, {}
    paths["zip"] = os.path.join(ctx.workdir, "many.zip")
    with zipfile.ZipFile(paths["zip"], "w", zipfile.ZIP_DEFLATED) as archive:
        for number in range(sizes["zip_members"]):
            archive.writestr("d%02d/f%05d.xml" % (number % 50, number),
                             b"<r n='%d'>" % number + os.urandom(600).hex().encode() + b"</r>")
    paths["tgz"] = os.path.join(ctx.workdir, "big.tgz")
    part = 16 * MiB
    with tarfile.open(paths["tgz"], "w:gz", compresslevel=1) as archive:
        for number in range(max(1, sizes["tgz_bytes"] // part)):
            info = tarfile.TarInfo("part%03d.bin" % number)
            info.size = part
            archive.addfile(info, _RandomReader(part))
    paths["gzip_bomb"] = os.path.join(ctx.workdir, "zeros.gz")
    with gzip.open(paths["gzip_bomb"], "wb", compresslevel=9) as handle:
        zeros = bytes(MiB)
        for _ in range(sizes["bomb_bytes"] // MiB):
            handle.write(zeros)
    paths["zip_bomb"] = os.path.join(ctx.workdir, "zeros.zip")
    with zipfile.ZipFile(paths["zip_bomb"], "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.bin", "w", force_zip64=True) as handle:
            for _ in range(sizes["bomb_bytes"] // MiB):
                handle.write(bytes(MiB))
    return paths


def bench_archives(ctx):
    figures = ctx.figures
    sizes = ctx.sizes
    log("making the archives")
    paths = make_archives(ctx)
    zip_label = "zip of %d small files" % sizes["zip_members"]
    tgz_label = "%s tgz of 16 MiB members" % size_label(sizes["tgz_bytes"])
    figures.define("zip_members", "expansion, %s: members/s" % zip_label, "members/s")
    figures.define("zip_mbs", "expansion, %s: MB/s of members" % zip_label, "MB/s", digits=1)
    figures.define("tgz_mbs", "upload + expansion, %s: MB/s of the tar" % tgz_label, "MB/s")
    figures.define("bomb_rss", "peak RSS while gzip and zip bombs of %s of zeros are stopped"
                   % size_label(sizes["bomb_bytes"]), "MiB", ("max", 64), digits=1)
    for run in range(ctx.runs):
        server = ctx.servers.start(label="archives")
        try:
            settle()
            seconds, answer = _timed_put(server, paths["zip"], "many.zip")
            count = answer["extracted"]["count"]
            member_bytes = sum(item.get("size", 0) for item in answer["extracted"]["files"])
            figures.add("zip_members", count / seconds)
            figures.add("zip_mbs", member_bytes / seconds / MB)
            settle()
            seconds, answer = _timed_put(server, paths["tgz"], "big.tgz")
            figures.add("tgz_mbs", answer["decompressed"]["size"] / seconds / MB)
            log("run %d: zip of %d members %.0f members/s; tgz %.0f MB/s" % (
                run + 1, count, figures.rows["zip_members"]["runs"][-1],
                figures.rows["tgz_mbs"]["runs"][-1]))
        finally:
            ctx.servers.stop(server)
        server = ctx.servers.start(label="bombs")
        try:
            for name in ("gzip_bomb", "zip_bomb"):
                _, answer = _timed_put(server, paths[name], os.path.basename(paths[name]))
                if "ratio" not in (answer.get("expansion_error") or ""):
                    raise RuntimeError("%s was not stopped by the ratio: %s" % (name, answer))
            figures.add("bomb_rss", server.status().get("VmHWM", 0) / 1024.0)
        finally:
            ctx.servers.stop(server)
    figures.note("zip_members", "whole PUT by curl: upload, 3 digests, store, tree")
    figures.note("tgz_mbs", "whole PUT by curl: upload, gunzip to a .tar blob, members; "
                            "3 digests of each")
    figures.note("bomb_rss", "VmHWM of a server that served only the two bombs")


def bench_listing(ctx):
    figures = ctx.figures
    count = ctx.sizes["listing_entries"]
    figures.define("listing_seconds", "JSON listing of a directory of %d names" % count, "s",
                   digits=2)
    figures.define("listing_rss", "peak RSS while listing %d names" % count, "MiB", digits=1)
    server = ctx.servers.start(label="listing")
    try:
        status, _ = http_request(server, "PUT", "/files/list/seed.txt", b"one content\n")
        if status not in (200, 201):
            raise RuntimeError("PUT answered %d" % status)
        directory = os.path.join(server.directory, "files", "list")
        log("linking %d names" % count)
        for number in range(count - 1):
            if number % 50000 == 0:  # ext4 allows 65,000 links to one inode
                seed = os.path.join(directory, "seed-%d.txt" % number)
                status, _ = http_request(server, "PUT", "/files/list/seed-%d.txt" % number,
                                         b"content %d\n" % number)
            os.link(seed, os.path.join(directory, "name-%06d.txt" % number))
        count = len(os.listdir(directory))
        for run in range(ctx.runs):
            started = time.monotonic()
            status, body = http_request(server, "GET", "/files/list/?format=json", timeout=120)
            seconds = time.monotonic() - started
            listed = json.loads(body.decode())["count"]
            if status != 200 or listed != count:
                raise RuntimeError("listing answered %d with %s entries" % (status, listed))
            figures.add("listing_seconds", seconds)
            figures.add("listing_rss", server.status().get("VmHWM", 0) / 1024.0)
            log("run %d: listed %d names in %.2f s" % (run + 1, listed, seconds))
    finally:
        ctx.servers.stop(server)
    figures.note("listing_rss", "VmHWM; names sorted in memory, entries streamed")


UPLOADS_NEEDLES = 100   # records of the filtered query, spread through the log


def generate_uploads_log(root, count, files=2):
    """``count`` uploads-log records in ``files`` files of dead processes,
    as real uploads would leave them (names, digests, a tree or a name,
    metadata), ids ascending within each file.  Every count // 100-th
    record carries meta job=needle: the filtered query's 100 hits.
    Returns the number of bytes written."""
    directory = os.path.join(root, "uploads")
    os.makedirs(directory, exist_ok=True)
    start = int((time.time() - count * 0.05) * 1000000)
    step = max(1, count // UPLOADS_NEEDLES)
    handles = [open(os.path.join(directory, "bench-dead-%d.jsonl" % n), "w", encoding="utf-8")
               for n in range(files)]
    written = 0
    try:
        for number in range(count):
            micros = start + number * 50000
            sha256 = hashlib.sha256(b"%d" % number).hexdigest()
            record = {
                "id": "%016d-%06x" % (micros, number % files),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(micros / 1e6)) + ".000Z",
                "name": "results-%d.xml" % number, "size": 4000 + number % 5000,
                "sha256": sha256, "mime": "application/xml",
                "blob": "blob/%s/%s/%s" % (sha256[:2], sha256[2:4], sha256),
                "decompressed": None, "tree": None,
                "names": ["files/ci/build-%d/results-%d.xml" % (number // 10, number)],
                "replicas": [], "expires": None, "keep": False, "client": "10.1.2.3",
                "meta": {"job": "needle" if number % step == step // 2 else str(number),
                         "branch": "main"}}
            line = json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"
            handles[number % files].write(line)
            written += len(line)
    finally:
        for handle in handles:
            handle.close()
    return written


def bench_uploads(ctx):
    """GET /uploads on a log of a million records: the newest page, a
    filtered query with 100 hits spread through it, RSS, and startup with
    and without the records (issue 10, part 6)."""
    figures = ctx.figures
    count = ctx.sizes["uploads_records"]
    label = "%dk" % (count // 1000)
    figures.define("uploads_newest_ms", "GET /uploads newest page (100) of %s records" % label,
                   "ms", ("max", 100), "< 100 ms", digits=1)
    figures.define("uploads_filtered_s", "GET /uploads?meta.job= (100 hits in %s records)" % label,
                   "s", ("max", 2), "< 2 s", digits=2)
    figures.define("uploads_rss_growth", "server RSS growth after the queries", "MiB", digits=1)
    figures.define("uploads_startup_delta", "startup to index_ready: with %s records minus "
                   "without" % label, "s", ("max", 2), "≤ 2 s", digits=3)
    directory = ctx.servers.fresh_dir("uploads-log")
    started = time.monotonic()
    size = generate_uploads_log(directory, count)
    log("generated %d records (%.0f MB) in %.1f s" % (count, size / MB, time.monotonic() - started))
    figures.note("uploads_newest_ms", "%d records, %.0f MB in 2 files" % (count, size / MB))
    for run in range(ctx.runs):
        empty = ctx.servers.start(label="uploads-empty")
        empty_ready = empty.wait_ready()
        ctx.servers.stop(empty)
        server = ctx.servers.start(directory)
        ready = server.wait_ready()
        figures.add("uploads_startup_delta", ready - empty_ready)
        try:
            server.wait_idle()
            before_kb = server.status().get("VmRSS", 0)
            newest = []
            for _ in range(20):
                began = time.monotonic()
                status, body = http_request(server, "GET", "/uploads?format=json")
                newest.append((time.monotonic() - began) * 1000)
                if status != 200 or json.loads(body.decode())["count"] != 100:
                    raise RuntimeError("newest page answered %d" % status)
            figures.add("uploads_newest_ms", statistics.median(newest))
            began = time.monotonic()
            status, body = http_request(server, "GET",
                                        "/uploads?format=json&meta.job=needle", timeout=120)
            filtered = time.monotonic() - began
            hits = json.loads(body.decode())["count"] if status == 200 else None
            if hits != UPLOADS_NEEDLES:
                raise RuntimeError("filtered query answered %d with %s hits" % (status, hits))
            figures.add("uploads_filtered_s", filtered)
            after_kb = server.status().get("VmRSS", 0)
            figures.add("uploads_rss_growth", (after_kb - before_kb) / 1024.0)
            log("run %d: newest page %.1f ms (median of 20), filtered %.2f s, RSS %+.1f MiB, "
                "startup %+.3f s" % (run + 1, statistics.median(newest), filtered,
                                     (after_kb - before_kb) / 1024.0, ready - empty_ready))
        finally:
            ctx.servers.stop(server, remove_dir=False)
    shutil.rmtree(directory, ignore_errors=True)


# ===========================================================================
# Load generators: wrk with generated Lua scripts, or Python processes
# ===========================================================================

MULTIPART_BOUNDARY = "bench-boundary-3f9a1c"

# Where each server takes an upload: PUT to put_prefix + name; a multipart
# POST to post_path with the file in field ``field``.  copyparty's (checked on
# 1.20.26, see section p): PUT /<name>; its basic uploader, POST /?act=bput
# with field "f" ("&j" asks for a JSON answer, as http_bucket gives one).
BUCKET_ROUTES = {"put_prefix": "/upload/", "post_path": "/upload", "field": "file"}
COPYPARTY_ROUTES = {"put_prefix": "/", "post_path": "/?act=bput&j", "field": "f"}

# One load generator run: requests answered per second, failures, requests
# answered, and the generator's own CPU seconds (all its processes/threads).
Load = collections.namedtuple("Load", "rate failed errors requests client_cpu")


def client_us_per_request(load):
    return load.client_cpu / load.requests * 1e6 if load.requests else None

# Uploads, each with a distinct body, until this thread's quota is answered;
# then the thread stops itself and says so on stdout (wrk's own rate counts
# its whole -d duration, so the bench times the quota from outside).
# Sends are counted in delay(), which wrk calls before each request it sends:
# request() is also called once on thread 0 by wrk's script check, unsent.
WRK_UPLOAD_LUA = r"""
local setup_count = 0
function setup(thread)
  thread:set("tid", setup_count)
  setup_count = setup_count + 1
end

local nonce, mode, size, quota = "", "put", 0, 0
local put_prefix, post_path, field = "/upload/", "/upload", "file"
local sent, made, answered, failed = 0, 0, 0, 0
local pad = ""
local boundary = "%(boundary)s"

function init(args)
  nonce, mode, size = args[1], args[2], tonumber(args[3])
  local total, threads = tonumber(args[4]), tonumber(args[5])
  put_prefix, post_path, field = args[6], args[7], args[8]
  quota = math.floor(total / threads)
  if tid < total %% threads then quota = quota + 1 end
  pad = string.rep("x", size)
  io.write("START " .. tid .. "\n")
  io.flush()
end

function delay()
  if sent >= quota then return 600000 end  -- this connection is done
  sent = sent + 1
  return 0
end

function request()
  made = made + 1
  local tag = string.format("%%s thread %%d upload %%d\n", nonce, tid, made)
  local content = tag .. string.sub(pad, #tag + 1)
  local name = string.format("b%%d-%%d.bin", tid, made)
  if mode == "put" then
    return wrk.format("PUT", put_prefix .. name, nil, content)
  end
  local body = "--" .. boundary .. "\r\n" ..
    "Content-Disposition: form-data; name=\"" .. field .. "\"; filename=\"" .. name .. "\"\r\n" ..
    "Content-Type: application/octet-stream\r\n\r\n" .. content ..
    "\r\n--" .. boundary .. "--\r\n"
  return wrk.format("POST", post_path,
    {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 201 and status ~= 200 then failed = failed + 1 end
  if answered == quota then
    io.write(string.format("DONE %%d %%d %%d\n", tid, answered, failed))
    io.flush()
    wrk.thread:stop()
  end
end
""" % {"boundary": MULTIPART_BOUNDARY}


def have_wrk():
    return shutil.which("wrk") is not None


def wrk_uploads(ctx, server, mode, total, size, connections, threads, routes):
    """Time ``total`` distinct uploads by wrk: (uploads/s, failed count)."""
    script = os.path.join(ctx.workdir, "upload.lua")
    with open(script, "w") as handle:
        handle.write(WRK_UPLOAD_LUA)
    nonce = "bench-%s-%d" % (os.urandom(6).hex(), ctx.next_nonce())
    command = ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % LOAD_TIMEOUT,
               "--timeout", "60s", "-s", script, server.url + "/",
               "--", nonce, mode, str(size), str(total), str(threads),
               routes["put_prefix"], routes["post_path"], routes["field"]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    events, other_output = [], []
    first_start = [None]
    finished = threading.Event()

    def read_lines():
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            now = time.monotonic()
            if line.startswith("START") and first_start[0] is None:
                first_start[0] = now
            elif line.startswith("DONE"):
                events.append((now, line.split()))
                if len(events) == threads:
                    finished.set()
            else:
                other_output.append(line)
        finished.set()

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    finished.wait(LOAD_TIMEOUT + 10)
    ended = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # ends wrk's sleep; it prints and exits
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
    reader.join(5)
    answered = sum(int(fields[2]) for _, fields in events)
    failed = sum(int(fields[3]) for _, fields in events)
    if len(events) < threads or first_start[0] is None:
        raise RuntimeError("wrk did not finish its %d uploads (%d answered): %s"
                           % (total, answered, "".join(other_output)[-500:]))
    end = max(when for when, _ in events) if events else ended
    return answered / (end - first_start[0]), failed


WRK_METHOD_LUA = 'wrk.method = "%s"\n'


def wrk_duration(ctx, server, method, path, connections, threads, seconds):
    """wrk for ``seconds``: (requests/s, non-2xx count, socket errors text, requests)."""
    script = os.path.join(ctx.workdir, "method-%s.lua" % method.lower())
    with open(script, "w") as handle:
        handle.write(WRK_METHOD_LUA % method)
    command = ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % seconds,
               "-s", script, server.url + path]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=seconds + 60)
    output = result.stdout.decode("utf-8", "replace")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rate:
        raise RuntimeError("no rate in wrk output: %s" % output[-500:])
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:([^\n]*)", output)
    requests = re.search(r"(\d+) requests in", output)
    return (float(rate.group(1)), int(non2xx.group(1)) if non2xx else 0,
            errors.group(1).strip() if errors else "", int(requests.group(1)) if requests else 0)


# -- the Python load generator (without wrk, and where wrk cannot time) ------


def build_request(spec, connection_id, number):
    """The bytes of one request of a load ``spec`` (see py_load)."""
    kind = spec["kind"]
    if kind in ("put", "multipart"):
        tag = ("%s conn %d upload %d\n" % (spec["nonce"], connection_id, number)).encode()
        content = tag + b"x" * (spec["size"] - len(tag))
        name = "b%d-%d.bin" % (connection_id, number)
        routes = spec["routes"]
        if kind == "put":
            head = "PUT %s%s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % (
                routes["put_prefix"], name, len(content))
            return head.encode() + content
        body = (("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n"
                 % (MULTIPART_BOUNDARY, routes["field"], name))
                .encode() + content + ("\r\n--%s--\r\n" % MULTIPART_BOUNDARY).encode())
        head = ("POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; "
                "boundary=%s\r\nContent-Length: %d\r\n\r\n"
                % (routes["post_path"], MULTIPART_BOUNDARY, len(body)))
        return head.encode() + body
    return ("%s %s HTTP/1.1\r\nHost: bench\r\n\r\n" % (kind, spec["path"])).encode()


def read_response(sock, buffer, head_request):
    """Read one response from ``sock``; returns (status, leftover bytes)."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        buffer += data
    head = bytes(buffer[:end]).decode("latin-1")
    status = int(head[9:12])
    length = 0
    if not head_request:
        match = re.search(r"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
        length = int(match.group(1)) if match else 0
    rest = buffer[end + 4:]
    while len(rest) < length:
        data = sock.recv(max(65536, length - len(rest)))
        if not data:
            raise ConnectionError("server closed the connection")
        rest += data
    return status, rest[length:]


def _py_connection(port, spec, connection_id, quota, ready, start, results):
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ready.release()
    start.wait()
    deadline = time.monotonic() + spec["seconds"] if spec.get("seconds") else None
    done = failed = 0
    buffer = bytearray()
    try:
        while (done < quota) if deadline is None else (time.monotonic() < deadline):
            sock.sendall(build_request(spec, connection_id, done + 1))
            status, buffer = read_response(sock, buffer, spec["kind"] == "HEAD")
            done += 1
            if status >= 300 and status != spec.get("expect"):
                failed += 1
    except OSError:
        failed += 1
    finally:
        sock.close()
    results.append((done, failed, time.monotonic()))


def _py_process(port, spec, connection_ids, quotas, ready_queue, start_event, result_queue):
    import threading as _threading  # noqa: a fresh interpreter state after fork
    ready = _threading.Semaphore(0)
    start = _threading.Event()
    results = []
    threads = [_threading.Thread(target=_py_connection,
                                 args=(port, spec, cid, quota, ready, start, results))
               for cid, quota in zip(connection_ids, quotas)]
    for thread in threads:
        thread.start()
    for _ in threads:
        ready.acquire()
    ready_queue.put(len(threads))
    start_event.wait()
    start.set()
    for thread in threads:
        thread.join()
    result_queue.put(results)


def py_load(port, spec, connections, total=None, seconds=None):
    """Run the Python generator: (requests/s, failed count, requests answered).

    ``spec``: {"kind": "put"|"multipart"|"GET"|"HEAD", "path", "size", "nonce",
    "expect": a non-2xx status that is not an error}.  Either ``total``
    requests split over the connections, or ``seconds`` of load.
    """
    spec = dict(spec, seconds=seconds)
    context = multiprocessing.get_context("fork")
    # One process per connection: threads sharing a client's GIL measured
    # 372 uploads/s where 8 processes reached 876 (16 KiB PUT, 8 connections).
    processes = min(connections, 64)
    ids = list(range(connections))
    quotas = [(total // connections + (1 if cid < total % connections else 0)) if total else 0
              for cid in ids]
    ready_queue, result_queue = context.Queue(), context.Queue()
    start_event = context.Event()
    workers = [context.Process(target=_py_process, daemon=True,
                               args=(port, spec, ids[number::processes], quotas[number::processes],
                                     ready_queue, start_event, result_queue))
               for number in range(processes)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready_queue.get(timeout=30)
    started = time.monotonic()
    start_event.set()
    outcomes = []
    for _ in workers:
        outcomes.extend(result_queue.get(timeout=LOAD_TIMEOUT))
    for worker in workers:
        worker.join(10)
    done = sum(outcome[0] for outcome in outcomes)
    failed = sum(outcome[1] for outcome in outcomes)
    ended = max(outcome[2] for outcome in outcomes)
    return done / (ended - started), failed, done


def load_uploads(ctx, server, mode, total, size, connections, routes=BUCKET_ROUTES):
    """``total`` distinct uploads (``mode`` "put" or "multipart"): a Load."""
    client_before = client_cpu_seconds()
    if ctx.client == "wrk":
        rate, failed = wrk_uploads(ctx, server, mode, total, size, connections,
                                   min(2, connections), routes)
        done = total
    else:
        spec = {"kind": mode, "size": size, "routes": routes,
                "nonce": "bench-%s-%d" % (os.urandom(6).hex(), ctx.next_nonce())}
        rate, failed, done = py_load(server.port, spec, connections, total=total)
    return Load(rate, failed, "", done, client_cpu_seconds() - client_before)


def load_requests(ctx, server, method, path, connections, seconds, expect=None, client=None):
    """``method path`` for ``seconds`` by ``client`` (default: the run's): a Load
    (failed counts unexpected statuses)."""
    client_before = client_cpu_seconds()
    if (client or ctx.client) == "wrk":
        rate, non2xx, errors, done = wrk_duration(ctx, server, method, path, connections,
                                                  min(2, connections), seconds)
        failed = 0 if expect else non2xx
    else:
        rate, failed, done = py_load(server.port, {"kind": method, "path": path,
                                                   "expect": expect}, connections,
                                     seconds=seconds)
        errors = ""
    return Load(rate, failed, errors, done, client_cpu_seconds() - client_before)


# ===========================================================================
# c. Small uploads; scaling of concurrent uploads
# ===========================================================================


def bench_small(ctx):
    figures, sizes = ctx.figures, ctx.sizes
    count, size = sizes["small_count"], sizes["small_size"]
    # A ceiling of section a, measured here, just before each run's uploads:
    # file creation on this machine swings 600..3200 files/s within minutes.
    figures.define("ceiling_small_files", "ceiling: %d KiB files stored as the store does "
                   "(no hashing, no HTTP), 8 threads" % (size // 1024), "files/s")
    for mode, title in (("put", "PUT"), ("multipart", "multipart")):
        key = "small_" + mode
        figures.define(key, "%d distinct %d KiB uploads, %s, 8 connections"
                       % (count, size // 1024, title), "uploads/s", ("min", 1600))
        figures.define("rss_" + key, "peak RSS during the %s small uploads" % title, "MiB",
                       digits=1)
    for run in range(ctx.runs):
        ceiling = small_file_rate(ctx.workdir, count, size)
        figures.add("ceiling_small_files", ceiling)
        log("run %d small-file ceiling: %.0f files/s" % (run + 1, ceiling))
        for mode in ("put", "multipart"):
            key = "small_" + mode
            server = ctx.servers.start(label=key)
            try:
                cpu_before = server.cpu()
                load = load_uploads(ctx, server, mode, count, size, 8)
                cpu_us = (server.cpu() - cpu_before) / count * 1e6
                health = server.healthz()
                hwm_kb = server.status().get("VmHWM", 0)
            finally:
                ctx.servers.stop(server, remove_dir=False)  # many files: removed at the end
            rate, failed = load.rate, load.failed
            figures.add(key, rate, failed=failed, blobs_after=health and health.get("blobs"),
                        server_cpu_us_per_upload=cpu_us,
                        client_cpu_us_per_upload=client_us_per_request(load))
            figures.add("rss_" + key, hwm_kb / 1024.0)
            if failed:
                figures.note(key, "%d uploads failed" % failed)
            if health and health.get("blobs") is not None and health["blobs"] < count:
                figures.note(key, "only %d blobs stored" % health["blobs"])
            log("run %d %s: %.0f uploads/s (%d failed, %s blobs), server CPU %.0f us/upload, "
                "load generator CPU %.0f us/upload, peak RSS %.1f MiB"
                % (run + 1, key, rate, failed, health and health.get("blobs"), cpu_us,
                   client_us_per_request(load) or 0, hwm_kb / 1024.0))
    ceiling = figures.median("ceiling_small_files")
    for mode in ("put", "multipart"):
        extra = figures.rows["small_" + mode]["extra"]
        cpu = _median_or_none(extra["server_cpu_us_per_upload"])
        if cpu is not None:
            figures.note("small_" + mode, "server CPU %.0f us/upload" % cpu)
        cpu = _median_or_none(extra["client_cpu_us_per_upload"])
        if cpu is not None:
            figures.note("small_" + mode, "load generator CPU %.0f us/upload" % cpu)
        if ceiling and figures.median("small_" + mode):
            figures.note("small_" + mode, "%.2f × small-file ceiling"
                         % (figures.median("small_" + mode) / ceiling))


LIMIT_SIZE = 16 * MiB   # --max-size of the steady-state store: 1,000 small blobs


def table_bytes_per_blob(count):
    """Bytes a blob of the eviction's table (last use, keep mark) costs:
    ``count`` blobs added the way the journal replay adds them, merged,
    measured with tracemalloc (peak during the build, and what stays)."""
    import tracemalloc
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import http_bucket
    tracemalloc.start()
    table = http_bucket.BlobTable()
    for number in range(count):
        table.add(hashlib.sha256(b"%d" % number).hexdigest(), 16384, 1796000000.0 + number)
    with table.lock:
        table._merge()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / count, peak / count


def bench_limits(ctx):
    """Uploads at steady state with --max-size (every upload makes the store
    evict) against no cap, interleaved; and the memory of use tracking."""
    figures, sizes = ctx.figures, ctx.sizes
    count, size = sizes["limits_uploads"], sizes["small_size"]
    figures.define("limits_nocap", "%d distinct %d KiB PUTs, no cap, 8 connections"
                   % (count, size // 1024), "uploads/s")
    figures.define("limits_capped", "the same with --max-size %d MiB (evicting all along)"
                   % (LIMIT_SIZE // MiB), "uploads/s")
    figures.define("limits_ratio", "uploads/s with the cap / without, same run", "×", digits=2)
    figures.define("limits_table_bytes", "use tracking per blob (%d blobs, tracemalloc)"
                   % sizes["table_blobs"], "B/blob", digits=1)
    for run in range(ctx.runs):
        rates = {}
        for key, extra in (("limits_nocap", ()), ("limits_capped",
                                                   ("--max-size", str(LIMIT_SIZE)))):
            server = ctx.servers.start(label=key, extra_args=extra)
            try:
                if extra:  # fill to the cap first: the measured uploads all evict
                    load_uploads(ctx, server, "put", LIMIT_SIZE // size, size, 8)
                load = load_uploads(ctx, server, "put", count, size, 8)
                health = server.healthz()
            finally:
                ctx.servers.stop(server, remove_dir=False)
            rates[key] = load.rate
            figures.add(key, load.rate, failed=load.failed, stored_bytes=health["stored_bytes"])
            log("run %d %s: %.0f uploads/s (%d failed), %d bytes stored"
                % (run + 1, key, load.rate, load.failed, health["stored_bytes"]))
        figures.add("limits_ratio", rates["limits_capped"] / rates["limits_nocap"])
    current, peak = table_bytes_per_blob(sizes["table_blobs"])
    figures.add("limits_table_bytes", current)
    figures.note("limits_table_bytes", "peak while built %.1f B/blob" % peak)


def resumable_put(server, path, data_path, size, cut_after):
    """Create a resumable upload of ``data_path`` and drop the connection
    after ``cut_after`` bytes: its Location."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(("PUT %s HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n"
                      "Upload-Complete: ?1\r\nUpload-Draft-Interop-Version: 10\r\n\r\n"
                      % (path, size)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        location = re.search(rb"Location: (\S+)", head).group(1).decode()
        with open(data_path, "rb") as handle:
            sent = 0
            while sent < cut_after:
                piece = handle.read(min(MiB, cut_after - sent))
                sock.sendall(piece)
                sent += len(piece)
    return location


def time_to_resume(server, location):
    """Seconds from a new connection to the server accepting appended bytes
    (the 100 Continue of the PATCH after HEAD), and the offset."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        stream = sock.makefile("rb")
        sock.sendall(("HEAD %s HTTP/1.1\r\nHost: b\r\nUpload-Draft-Interop-Version: 10"
                      "\r\n\r\n" % location).encode())
        offset = None
        while True:
            line = stream.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"upload-offset:"):
                offset = int(line.split(b":")[1])
        sock.sendall(("PATCH %s HTTP/1.1\r\nHost: b\r\nUpload-Draft-Interop-Version: 10\r\n"
                      "Content-Type: application/partial-upload\r\nUpload-Offset: %d\r\n"
                      "Upload-Complete: ?0\r\nExpect: 100-continue\r\nContent-Length: 0\r\n"
                      "\r\n" % (location, offset)).encode())
        status = stream.readline()
    seconds = time.monotonic() - started
    if b" 100 " not in status and b" 204 " not in status:
        raise RuntimeError("the append was answered %r" % status)
    return seconds, offset


def bench_resumable(ctx):
    """A 1 GiB upload as a resumable one against a plain PUT (both by curl,
    interleaved), and the time to resume after a cut: with the digests'
    state in memory, and after a restart (the data hashed again)."""
    figures, size = ctx.figures, ctx.sizes["big_bytes"]
    label = size_label(size)
    figures.define("resumable_plain", "%s PUT, plain (curl -T)" % label, "MB/s")
    figures.define("resumable_put", "%s PUT as a resumable upload in one request" % label,
                   "MB/s")
    figures.define("resumable_overhead", "resumable against plain, same run", "%",
                   ("max", 5), "< 5 %", digits=1)
    figures.define("resume_warm_ms", "resume after a cut at half: reconnect to bytes "
                   "accepted (state in memory)", "ms", digits=1)
    figures.define("resume_cold_s", "the same after a restart (half of %s hashed again)"
                   % label, "s", digits=2)
    make_big_file(ctx)
    for run in range(ctx.runs):
        rates = {}
        for key, headers in (("resumable_plain", []), ("resumable_put", [
                "-H", "Upload-Complete: ?1", "-H", "Upload-Draft-Interop-Version: 10"])):
            server = ctx.servers.start(label=key)
            try:
                settle()
                response = os.path.join(ctx.workdir, "resumable-response.json")
                code, seconds = curl(headers + ["-o", response, "-T", ctx.big_file,
                                                server.url + "/upload/big.bin"])
                with open(response, "rb") as handle:
                    answer = json.loads(handle.read().decode() or "{}")
                if code != 201 or answer["files"][0]["checksums"]["sha256"] != ctx.big_sha256:
                    raise RuntimeError("%s answered %d: %s" % (key, code, str(answer)[:300]))
            finally:
                ctx.servers.stop(server)
            rates[key] = size / seconds / MB
            figures.add(key, rates[key])
        overhead = (1 - rates["resumable_put"] / rates["resumable_plain"]) * 100
        figures.add("resumable_overhead", overhead)
        log("run %d: plain %.0f MB/s, resumable %.0f MB/s (%+.1f %%)"
            % (run + 1, rates["resumable_plain"], rates["resumable_put"], overhead))
        server = ctx.servers.start(label="resume")
        try:
            location = resumable_put(server, "/upload/cut.bin", ctx.big_file, size, size // 2)
            deadline = time.monotonic() + 60
            while True:  # until the server noticed the cut and kept what came
                warm, offset = time_to_resume(server, location)
                if offset and offset >= size // 2 - MiB or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            figures.add("resume_warm_ms", warm * 1000, offset=offset)
            server.stop()
            server = ctx.servers.start(server.directory)
            cold, offset = time_to_resume(server, location)
            figures.add("resume_cold_s", cold, offset=offset)
            log("run %d: resume at %d bytes: %.1f ms warm, %.2f s after a restart"
                % (run + 1, offset, warm * 1000, cold))
        finally:
            ctx.servers.stop(server)


def bench_scaling(ctx):
    figures, sizes = ctx.figures, ctx.sizes
    total, size = sizes["scaling_uploads"], sizes["scaling_size"]
    levels = (1, 8, 64)
    for level in levels:
        figures.define("scaling_%d" % level, "%d concurrent %d MiB uploads (PUT), total"
                       % (level, size // MiB), "MB/s")
        figures.define("rss_scaling_%d" % level, "peak RSS, %d concurrent 1 MiB uploads" % level,
                       "MiB", digits=1)
    for run in range(ctx.runs):
        for level in levels:
            key = "scaling_%d" % level
            server = ctx.servers.start(label=key)
            try:
                cpu_before = server.cpu()
                load = load_uploads(ctx, server, "put", max(total, level), size, level)
                rate, failed = load.rate, load.failed
                cpu_ms = (server.cpu() - cpu_before) / max(total, level) * 1e3
                hwm_kb = server.status().get("VmHWM", 0)
            finally:
                ctx.servers.stop(server, remove_dir=False)  # many files: removed at the end
            figures.add(key, rate * size / MB, failed=failed, server_cpu_ms_per_upload=cpu_ms)
            figures.add("rss_" + key, hwm_kb / 1024.0)
            if failed:
                figures.note(key, "%d uploads failed" % failed)
            log("run %d scaling %d: %.0f MB/s (%d failed), peak RSS %.1f MiB"
                % (run + 1, level, rate * size / MB, failed, hwm_kb / 1024.0))
    base = figures.median("scaling_1")
    for level in levels:
        key = "scaling_%d" % level
        value = figures.median(key)
        if base and value and level > 1:
            figures.note(key, "%.2f × 1 connection" % (value / base))
        cpu = _median_or_none(figures.rows[key]["extra"]["server_cpu_ms_per_upload"])
        if cpu is not None:
            figures.note(key, "server CPU %.1f ms/upload" % cpu)


# ===========================================================================
# d. Lookups
# ===========================================================================


def bench_head(ctx):
    figures, seconds = ctx.figures, ctx.sizes["head_seconds"]
    server = ctx.servers.start(label="head")
    try:
        status, body = http_request(server, "PUT", "/upload/lookup.txt",
                                    body=b"http_bucket benchmark lookup target\n")
        if status not in (200, 201):
            raise RuntimeError("could not store the lookup target: %d %s" % (status, body[:200]))
        checksums = json.loads(body.decode())["files"][0]["checksums"]
        unknown = hashlib.sha256(os.urandom(16)).hexdigest()
        cases = [("head_sha256", "HEAD /checksum/<sha256>, 16 connections", "HEAD",
                  "/checksum/" + checksums["sha256"], None, ("min", 8000)),
                 ("head_md5", "HEAD /checksum/<md5>, 16 connections", "HEAD",
                  "/checksum/" + checksums["md5"], None, ("min", 8000)),
                 ("head_miss", "HEAD /checksum/<unknown sha256> (404), 16 connections", "HEAD",
                  "/checksum/" + unknown, 404, ("min", 8000)),
                 ("get_healthz", "GET /healthz (small GET), 16 connections", "GET",
                  "/healthz", None, None)]
        for key, figure, method, path, expect, goal in cases:
            figures.define(key, figure, "req/s", goal)
        if ctx.client != "wrk":
            figures.note("get_healthz", "the Python load generator's ceiling against "
                                        "the server's cheapest endpoint")
        for run in range(ctx.runs):
            for key, figure, method, path, expect, goal in cases:
                cpu_before = server.cpu()
                load = load_requests(ctx, server, method, path, 16, seconds, expect)
                rate, unexpected = load.rate, load.failed
                cpu_us = (server.cpu() - cpu_before) / max(1, load.requests) * 1e6
                figures.add(key, rate, unexpected=unexpected, server_cpu_us_per_request=cpu_us,
                            client_cpu_us_per_request=client_us_per_request(load))
                if unexpected:
                    figures.note(key, "%d unexpected statuses" % unexpected)
                log("run %d %s: %.0f req/s%s" % (run + 1, key, rate,
                                                 " (%d unexpected)" % unexpected if unexpected else ""))
        for key, *_ in cases:
            extra = figures.rows[key]["extra"]
            cpu = _median_or_none(extra["server_cpu_us_per_request"])
            if cpu is not None:
                figures.note(key, "server CPU %.0f us/request" % cpu)
            cpu = _median_or_none(extra["client_cpu_us_per_request"])
            if cpu is not None:
                figures.note(key, "load generator CPU %.0f us/request" % cpu)
    finally:
        ctx.servers.stop(server)


# ===========================================================================
# k. The client: a tree pushed twice, one large file against curl -T
# ===========================================================================


def make_client_tree(ctx):
    """A tree of ``client_files`` files in folders of 100, summing to
    ``client_bytes`` (sizes from a fixed-seed log-normal: many small files,
    a few large ones); made once.  Its path."""
    root = os.path.join(ctx.workdir, "client-tree")
    if os.path.isdir(root):
        return root
    count, total = ctx.sizes["client_files"], ctx.sizes["client_bytes"]
    chooser = random.Random(20261130)
    weights = [chooser.lognormvariate(0, 1.5) for _ in range(count)]
    sizes = [int(total * weight / sum(weights)) for weight in weights]
    sizes[0] += total - sum(sizes)
    log("writing a tree of %d files, %s" % (count, size_label(total)))
    for number, size in enumerate(sizes):
        folder = os.path.join(root, "dir%02d" % (number // 100))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "file%04d.bin" % number), "wb") as handle:
            while size:
                piece = min(size, 4 * MiB)
                handle.write(os.urandom(piece))
                size -= piece
    os.sync()
    return root


def run_push(ctx, paths, url, *args):
    """``http_bucket.py push PATHS --to URL --json -q ARGS`` as a subprocess:
    (wall seconds, the JSON report)."""
    command = ([sys.executable, ctx.servers.script, "push"] + list(paths)
               + ["--to", url, "--json", "-q"] + list(args))
    started = time.monotonic()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=CURL_TIMEOUT)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError("push exited %d: %s %s" % (result.returncode, result.stdout[-300:],
                                                      result.stderr[-300:]))
    return seconds, json.loads(result.stdout.decode())


def client_tree_round(ctx, tree, relay_class):
    """First and second push of the tree: direct for the times, then
    through a counting relay (a fresh store) for the bytes on the wire."""
    figures = ctx.figures
    server = ctx.servers.start(label="client-tree")
    try:
        settle()
        first, report = run_push(ctx, [tree], server.url + "/files/ci/")
        second, again = run_push(ctx, [tree], server.url + "/files/ci/")
    finally:
        ctx.servers.stop(server)
    server = ctx.servers.start(label="client-tree-relay")
    relay = relay_class(server.port)
    try:
        settle()
        run_push(ctx, [tree], relay.url("files/ci/"))
        first_bytes = relay.upstream
        relay.reset_counts()
        run_push(ctx, [tree], relay.url("files/ci/"))
        second_bytes = relay.upstream
    finally:
        relay.close()
        ctx.servers.stop(server)
    figures.add("client_first_s", first, sent=report["sent"], bytes_sent=report["bytes_sent"])
    figures.add("client_first_mb", first_bytes / MB)
    figures.add("client_second_s", second, skipped=again["skipped"])
    figures.add("client_second_kb", second_bytes / 1000.0)
    log("tree: first push %.2f s (%d sent, %.1f MB up), second %.2f s (%d skipped, "
        "%d bytes up)" % (first, report["sent"], first_bytes / MB, second, again["skipped"],
                          second_bytes))


def client_file_round(ctx, order):
    """One large file by push and by curl -T, each into a fresh store, in
    ``order``: {key: MB/s}."""
    size, rates = ctx.sizes["big_bytes"], {}
    for key in order:
        server = ctx.servers.start(label=key)
        try:
            settle()
            if key == "client_push_rate":
                seconds, report = run_push(ctx, [ctx.big_file], server.url + "/files/big/")
                if report["sent"] != 1:
                    raise RuntimeError("push did not send the file: %s" % report)
            else:
                code, seconds = curl(["-o", "/dev/null", "-f", "-T", ctx.big_file,
                                      server.url + "/files/big/big.bin"])
                if code != 201:
                    raise RuntimeError("curl -T answered %d" % code)
        finally:
            ctx.servers.stop(server)
        rates[key] = size / seconds / MB
        ctx.figures.add(key, rates[key])
    return rates


def bench_client(ctx):
    """The client (http_bucket.py push): a tree of 1,000 files summing to
    1 GiB pushed into an empty store and again unchanged (wall time with
    the interpreter's start, and the bytes that reached the server, counted
    by a relay); one 1 GiB file by push (hashing included) against curl -T,
    interleaved."""
    from http_bucket_testing import TcpRelay  # the tests' relay (standard library)
    figures, sizes = ctx.figures, ctx.sizes
    tree = make_client_tree(ctx)
    label = "%d files, %s" % (sizes["client_files"], size_label(sizes["client_bytes"]))
    figures.define("client_first_s", "push of a tree (%s) into an empty store" % label, "s",
                   digits=2)
    figures.define("client_first_mb", "... bytes that reached the server", "MB", digits=1)
    figures.define("client_second_s", "push of the same tree again (unchanged)", "s", digits=2)
    figures.define("client_second_kb", "... bytes that reached the server (no bodies)", "kB",
                   ("max", 1000), "no file bodies", digits=1)
    big = size_label(sizes["big_bytes"])
    figures.define("client_push_rate", "%s file by push (hash, lookup, resumable upload)" % big,
                   "MB/s")
    figures.define("client_curl_rate", "%s file by curl -T, same runs" % big, "MB/s")
    figures.define("client_push_vs_curl", "push against curl -T", "%", digits=1)
    make_big_file(ctx)
    for run in range(ctx.runs):
        client_tree_round(ctx, tree, TcpRelay)
        order = ("client_push_rate", "client_curl_rate")
        rates = client_file_round(ctx, order if run % 2 == 0 else order[::-1])
        ratio = rates["client_push_rate"] / rates["client_curl_rate"] * 100
        figures.add("client_push_vs_curl", ratio)
        log("run %d: %s by push %.0f MB/s, by curl -T %.0f MB/s (%.1f %%)"
            % (run + 1, big, rates["client_push_rate"], rates["client_curl_rate"], ratio))


# ===========================================================================
# p. Peers: copyparty beside http_bucket, interleaved round by round
# ===========================================================================

# What was checked by hand on this version (and is rechecked by a trial
# upload before each run): ``-v DIR::rw`` lets anyone read and write without
# an account; PUT /<name> answers 201 with the size and a sha512 prefix, and
# stores under a new name when <name> is taken (no delete right, no
# overwrite); POST /?act=bput with the file in field "f" is its basic
# uploader; both hash with sha512 alone (--put-ck, --bup-ck) and never fsync;
# GET and HEAD /<name> serve the file.  Pinned so that runs of different days
# compare the same program.
COPYPARTY_VERSION = "1.20.26"
COPYPARTY_VENV = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                              "http_bucket-bench", "copyparty-venv")
PIP_TIMEOUT = 600             # seconds for creating the venv or installing copyparty
LOOKUP_CONTENT = b"http_bucket benchmark lookup target\n"

# Each side of a comparison: a key for its rows, a title, and http_bucket's
# flags (None: copyparty with its defaults).  The goals are measured at the
# defaults ("bucket": --workers auto, said explicitly because Servers.start
# otherwise asks for one process); "bucket_one" is the one-process server,
# shown beside them.
Side = collections.namedtuple("Side", "key title flags")
SIDES = collections.OrderedDict((side.key, side) for side in (
    Side("bucket", "http_bucket (defaults: --workers auto)", ["--workers", "auto"]),
    Side("copyparty", "copyparty", None),
    Side("bucket_one", "http_bucket --workers 1", ["--workers", "1"]),
    Side("bucket_nofsync", "http_bucket --fsync false", ["--workers", "auto", "--fsync", "false"]),
    Side("bucket_sha256", "http_bucket --digests sha256",
         ["--workers", "auto", "--digests", "sha256"]),
))


class PeerUnavailable(Exception):
    """copyparty cannot be installed or started here; the message says why."""


def _last_line(output):
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def installed_copyparty(python):
    """The copyparty version importable by ``python``, or None."""
    try:
        result = subprocess.run([python, "-c", "import importlib.metadata as m; "
                                 "print(m.version('copyparty'))"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.decode().strip() if result.returncode == 0 else None


def copyparty_python(venv):
    """The python of the bench-only ``venv`` with copyparty COPYPARTY_VERSION,
    made by ``python3 -m venv`` and pip on first use and reused after.
    Raises PeerUnavailable with the failing step's last line."""
    python = os.path.join(venv, "bin", "python")
    if installed_copyparty(python) == COPYPARTY_VERSION:
        return python
    steps = [("pip install copyparty==%s" % COPYPARTY_VERSION,
              [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "copyparty==" + COPYPARTY_VERSION])]
    if not os.path.exists(python):
        steps.insert(0, ("python3 -m venv", [sys.executable, "-m", "venv", venv]))
    for title, command in steps:
        log("copyparty: %s (in %s)" % (title, venv))
        try:
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=PIP_TIMEOUT)
            failure = None if result.returncode == 0 else _last_line(result.stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            failure = str(exc)
        if failure:
            if title.endswith("venv"):  # a venv without pip would fail the same way next time
                shutil.rmtree(venv, ignore_errors=True)
            raise PeerUnavailable("%s failed: %s" % (title, failure))
    found = installed_copyparty(python)
    if found != COPYPARTY_VERSION:
        raise PeerUnavailable("%s has copyparty %s after pip, not %s"
                              % (python, found, COPYPARTY_VERSION))
    return python


def check_copyparty(ctx, python):
    """Start copyparty once and PUT a small file: raises PeerUnavailable if that fails."""
    try:
        server = ctx.servers.start_copyparty(python, "copyparty-check")
    except RuntimeError as exc:
        raise PeerUnavailable("it did not start: %s" % exc)
    try:
        status, body = http_request(server, "PUT", "/check.txt", LOOKUP_CONTENT)
        if status != 201 or hashlib.sha512(LOOKUP_CONTENT).hexdigest()[:56] not in body.decode():
            raise PeerUnavailable("PUT /check.txt answered %d: %r" % (status, body[:200]))
    except (OSError, http.client.HTTPException) as exc:
        raise PeerUnavailable("PUT /check.txt failed: %s" % exc)
    finally:
        ctx.servers.stop(server)


def supports_flag(script, flag):
    """Whether ``script --help`` lists ``flag``."""
    try:
        result = subprocess.run([sys.executable, script, "--help"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return re.search(r"(^|[\s\[,])%s\b" % re.escape(flag), result.stdout.decode()) is not None


def prepare_peers(ctx):
    """Fill ctx.peer: copyparty's python (or why it is skipped) and whether
    this http_bucket has --workers (or why that row is n/a)."""
    peer = ctx.peer
    peer.update(version=COPYPARTY_VERSION, venv=ctx.copyparty_venv, python=None, skipped=None,
                workers_missing=None, rounds=max(2, ctx.runs))
    try:
        python = copyparty_python(ctx.copyparty_venv)
        check_copyparty(ctx, python)
        peer["python"] = python
    except PeerUnavailable as exc:
        peer["skipped"] = str(exc)
        log("copyparty: skipped (%s)" % exc)
    if not supports_flag(ctx.servers.script, "--workers"):
        peer["workers_missing"] = "n/a: --workers not supported by this http_bucket"
        log("peers: this http_bucket has no --workers: every side runs one process")


def peer_sides(ctx, *keys):
    """The sides among ``keys`` that can run here (copyparty installed, --workers known)."""
    sides = []
    for key in keys:
        if key == "copyparty" and not ctx.peer["python"]:
            continue
        if key == "bucket_one" and ctx.peer["workers_missing"]:
            continue  # without --workers, "bucket" is already one process
        sides.append(SIDES[key])
    return sides


def start_side(ctx, side, label):
    """A fresh server of ``side``, ready and idle; (server, its routes)."""
    if side.flags is None:
        server = ctx.servers.start_copyparty(ctx.peer["python"], label)
        routes = COPYPARTY_ROUTES
    else:
        flags = list(side.flags)
        if ctx.peer["workers_missing"] and "--workers" in flags:
            del flags[flags.index("--workers"):flags.index("--workers") + 2]
        server = ctx.servers.start(extra_args=flags, label=label,
                                   one_process="--workers" not in flags)
        routes = BUCKET_ROUTES
    server.wait_idle()
    return server, routes


def stored_files(server):
    """Files the server holds: http_bucket's blobs on disk (with workers, one
    worker's /healthz counts what that one knows so far), or copyparty's
    volume listing."""
    if server.name == "http_bucket":
        return sum(len(files) for _, _, files in os.walk(os.path.join(server.directory, "blob")))
    return sum(1 for entry in os.scandir(server.directory)
               if entry.is_file() and not entry.name.startswith("."))


def define_peer_row(ctx, key, figure, unit, digits=0):
    ctx.figures.define(key, "peers: " + figure, unit, digits=digits)


# -- 1, 2. small distinct uploads over keep-alive connections ---------------


def peer_small(ctx, rounds):
    figures = ctx.figures
    count, size = ctx.sizes["peer_small_count"], ctx.sizes["small_size"]
    plans = (("put", "PUT", peer_sides(ctx, "bucket", "copyparty", "bucket_one",
                                       "bucket_nofsync")),
             ("multipart", "multipart", peer_sides(ctx, "bucket", "copyparty", "bucket_one")))
    for mode, title, sides in plans:
        for side in sides:
            figure = "%d distinct %d KiB uploads, %s, 8 connections: %s" % (
                count, size // 1024, title, side.title)
            define_peer_row(ctx, "peer_small_%s_%s" % (mode, side.key), figure, "uploads/s")
            define_peer_row(ctx, "peer_cpu_small_%s_%s" % (mode, side.key),
                            "server CPU per %d KiB %s upload: %s" % (size // 1024, title,
                                                                    side.title),
                            "ms", digits=3)
        for run in range(rounds):
            for side in sides:
                # The first run after the ceilings' disk test was the slowest
                # of its side in two runs of two (1,113 and 1,298 uploads/s
                # against 1,932-2,205): its writeback was charged to it.
                settle()
                server, routes = start_side(ctx, side, "peer-small-%s-%s" % (mode, side.key))
                if server is None:
                    continue
                try:
                    cpu_before = server.cpu()
                    load = load_uploads(ctx, server, mode, count, size, 8, routes)
                    cpu_ms = (server.cpu() - cpu_before) / count * 1e3
                    stored = stored_files(server)
                finally:
                    ctx.servers.stop(server, remove_dir=False)  # many files: removed at the end
                key = "peer_small_%s_%s" % (mode, side.key)
                figures.add(key, load.rate, failed=load.failed, stored=stored,
                            client_cpu_us_per_request=client_us_per_request(load),
                            server_cpu_us_per_request=cpu_ms * 1e3)
                figures.add("peer_cpu_small_%s_%s" % (mode, side.key), cpu_ms)
                if load.failed:
                    figures.note(key, "%d uploads failed" % load.failed)
                if stored is not None and stored < count:
                    figures.note(key, "only %d files stored" % stored)
                log("round %d %s %s: %.0f uploads/s (%d failed, %s stored), server CPU %.3f "
                    "ms/upload, load generator CPU %.0f us/upload" % (
                        run + 1, mode, side.title, load.rate, load.failed, stored, cpu_ms,
                        client_us_per_request(load) or 0))


# -- 3. large uploads, and downloading them ----------------------------------


def peer_file(ctx):
    """The large upload's content for section p: (path, {algorithm: hex}), made once."""
    if not ctx.peer.get("file"):
        path = os.path.join(ctx.workdir, "peer-big.bin")
        ctx.peer["file"] = path, write_test_file(path, ctx.sizes["peer_big_bytes"],
                                                 ("sha256", "sha512"))
    return ctx.peer["file"]


def curl_upload(server, routes, mode, path):
    """Upload ``path`` whole by curl -T (PUT) or -F (multipart): (seconds, answer text)."""
    response_path = path + ".response"
    if mode == "put":
        target = server.url + routes["put_prefix"] + os.path.basename(path)
        arguments = ["-T", path, target]
    else:
        arguments = ["-F", "%s=@%s" % (routes["field"], path), server.url + routes["post_path"]]
    code, seconds = curl(["-o", response_path] + arguments)
    with open(response_path, "rb") as handle:
        answer = handle.read().decode("utf-8", "replace")
    os.unlink(response_path)
    if code not in (200, 201):
        raise RuntimeError("%s upload to %s answered %d: %s" % (mode, server.name, code,
                                                                answer[:300]))
    return seconds, answer


def check_stored_digest(server, answer, digests):
    """Raise unless the answer names the file's digest (http_bucket: sha256 in
    JSON; copyparty: the first 56 hex digits of sha512, in text or JSON)."""
    if server.name == "http_bucket":
        stored = json.loads(answer)["files"][0]["checksums"]["sha256"]
        if stored != digests["sha256"]:
            raise RuntimeError("http_bucket stored sha256 %s, file has %s"
                               % (stored, digests["sha256"]))
    elif digests["sha512"][:56] not in answer:
        raise RuntimeError("copyparty's answer lacks the file's sha512: %s" % answer[:300])


def peer_large_once(ctx, side, mode, with_download):
    """One large upload to a fresh server: dict of MB/s, CPU s, peak RSS, download MB/s."""
    path, digests = peer_file(ctx)
    size = ctx.sizes["peer_big_bytes"]
    settle()
    server, routes = start_side(ctx, side, "peer-big-%s-%s" % (mode, side.key))
    try:
        server.start_sampling()
        cpu_before = server.cpu()
        seconds, answer = curl_upload(server, routes, mode, path)
        cpu = server.cpu() - cpu_before
        server.stop_sampling()
        hwm_kb = server.largest("VmHWM")
        check_stored_digest(server, answer, digests)
        download = None
        if with_download:
            settle()
            where = ("/checksum/" + digests["sha256"] if server.name == "http_bucket"
                     else "/" + os.path.basename(path))
            code, download_seconds = curl(["-o", os.devnull, server.url + where])
            if code != 200:
                raise RuntimeError("download from %s answered %d" % (server.name, code))
            download = size / download_seconds / MB
    finally:
        ctx.servers.stop(server)
    return {"rate": size / seconds / MB, "cpu": cpu,
            "hwm_mib": max(hwm_kb, server.peak_sampled_kb) / 1024.0, "download": download}


def peer_large(ctx, rounds):
    """Round-major: each round has the 3-digest ceiling, then every upload, so
    goal 3's PUT, multipart, ceiling and copyparty figures pair within a round."""
    figures = ctx.figures
    label = size_label(ctx.sizes["peer_big_bytes"])
    titles = {"put": "curl -T (PUT)", "multipart": "curl -F (multipart)"}
    plan = ([("put", side) for side in peer_sides(ctx, "bucket", "copyparty", "bucket_sha256",
                                                  "bucket_one")]
            + [("multipart", side) for side in peer_sides(ctx, "bucket", "copyparty")])
    define_peer_row(ctx, "peer_ceiling_3digest", "ceiling: md5+sha256+sha512, 3 threads "
                    "(all cores), in each round", "MB/s")
    for mode, side in plan:
        define_peer_row(ctx, "peer_big_%s_%s" % (mode, side.key),
                        "%s upload, %s: %s" % (label, titles[mode], side.title), "MB/s")
        if mode == "put" and side.key in ("bucket", "copyparty", "bucket_one"):
            define_peer_row(ctx, "peer_rss_big_put_%s" % side.key,
                            "peak RSS during the %s PUT: %s" % (label, side.title), "MiB",
                            digits=1)
            define_peer_row(ctx, "peer_download_%s" % side.key, "%s download by curl, "
                            "right after its upload: %s" % (label, side.title), "MB/s")
    for run in range(rounds):
        rate = hash_rate(random_buffers(16), ctx.sizes["hash_bytes"],
                         ("md5", "sha256", "sha512"), threaded=True)
        figures.add("peer_ceiling_3digest", rate)
        log("round %d ceiling 3 digests in threads: %.0f MB/s" % (run + 1, rate))
        # Every other round in reverse: the first large write after a store
        # was deleted is slower (measured: whichever of PUT and multipart ran
        # first was 5-10 % behind), so no one side or mode always pays it.
        for mode, side in (plan if run % 2 == 0 else plan[::-1]):
            with_download = mode == "put" and side.key in ("bucket", "copyparty", "bucket_one")
            result = peer_large_once(ctx, side, mode, with_download)
            figures.add("peer_big_%s_%s" % (mode, side.key), result["rate"],
                        server_cpu_s=result["cpu"])
            if with_download:
                figures.add("peer_rss_big_put_%s" % side.key, result["hwm_mib"])
                figures.add("peer_download_%s" % side.key, result["download"])
            log("round %d %s %s: %.0f MB/s, server CPU %.1f s, peak RSS %.1f MiB%s" % (
                run + 1, mode, side.title, result["rate"], result["cpu"], result["hwm_mib"],
                ", download %.0f MB/s" % result["download"] if result["download"] else ""))


# -- 4, 5. lookups: HEAD /checksum against copyparty's GET of a small file ---


def store_lookup_target(server, routes):
    """PUT the small lookup file: the path that reads it back."""
    status, body = http_request(server, "PUT", routes["put_prefix"] + "lookup.txt",
                                LOOKUP_CONTENT)
    if status not in (200, 201):
        raise RuntimeError("%s: PUT of the lookup target answered %d" % (server.name, status))
    if server.name == "http_bucket":
        return "/checksum/" + json.loads(body.decode())["files"][0]["checksums"]["sha256"]
    return "/lookup.txt"


def lookup_row(key, method, client):
    return "peer_%s%s_%s" % (method.lower(), "_py" if client else "", key)


def peer_lookups(ctx, rounds):
    figures, seconds = ctx.figures, ctx.sizes["head_seconds"]
    running = collections.OrderedDict()
    try:
        for side in peer_sides(ctx, "bucket", "copyparty", "bucket_one"):
            server, routes = start_side(ctx, side, "peer-lookup-" + side.key)
            if server is not None:
                running[side.key] = server, store_lookup_target(server, routes)
        # The goal rows first (http_bucket's HEAD, copyparty's GET), then the
        # like-with-like ones: GET against GET, and HEAD against HEAD by the
        # Python generator, as wrk 4.1 cannot time copyparty's HEAD: its parser
        # does not know the request was a HEAD and waits for the body that
        # copyparty's (correct) Content-Length announces; http_bucket's HEAD
        # says Content-Length: 0 (the size is in X-Blob-Size).
        cases = [(key, method, client) for key, method, client in (
            ("bucket", "HEAD", None), ("bucket_one", "HEAD", None), ("copyparty", "GET", None),
            ("bucket_one", "GET", None), ("bucket_one", "HEAD", "python"),
            ("copyparty", "HEAD", "python")) if key in running]
        for key, method, client in cases:
            define_peer_row(ctx, lookup_row(key, method, client), "%s of a %d-byte file, 16 "
                            "connections%s: %s" % (method, len(LOOKUP_CONTENT),
                                                   ", Python generator" if client else "",
                                                   SIDES[key].title), "req/s")
        for run in range(rounds):
            for key, method, client in cases:
                server, path = running[key]
                cpu_before = server.cpu()
                load = load_requests(ctx, server, method, path, 16, seconds, client=client)
                cpu_us = (server.cpu() - cpu_before) / max(1, load.requests) * 1e6
                row = lookup_row(key, method, client)
                if not load.requests:  # None keeps the rounds of every row aligned
                    figures.note(row, "no request answered in round %d" % (run + 1))
                    figures.add(row, None)
                    continue
                figures.add(row, load.rate, failed=load.failed, server_cpu_us_per_request=cpu_us,
                            client_cpu_us_per_request=client_us_per_request(load))
                if load.failed or load.errors:
                    figures.note(row, "%d unexpected statuses %s" % (load.failed, load.errors))
                log("round %d %s %s%s: %.0f req/s, server CPU %.0f us/request, load generator "
                    "CPU %.0f us/request" % (run + 1, method, SIDES[key].title,
                                             " (Python generator)" if client else "", load.rate,
                                             cpu_us, client_us_per_request(load) or 0))
    finally:
        for server, _ in running.values():
            ctx.servers.stop(server)


def bench_peers(ctx):
    prepare_peers(ctx)
    rounds = ctx.peer["rounds"]
    log("peers: copyparty %s, %d interleaved rounds"
        % (ctx.peer["skipped"] and "skipped" or ctx.peer["version"], rounds))
    peer_small(ctx, rounds)
    peer_large(ctx, rounds)
    peer_lookups(ctx, rounds)
    for key, row in ctx.figures.rows.items():
        client = _median_or_none(row["extra"].get("client_cpu_us_per_request", []))
        if key.startswith("peer_") and client is not None:
            ctx.figures.note(key, "load generator CPU %.0f us/request" % client)


# -- the peer table -----------------------------------------------------------


def _present(values):
    return [value for value in values if value is not None]


def peer_row(figure, unit, value_runs, reference_runs=(), goal=None, digits=0,
             label="copyparty", missing=""):
    """One row of the peer table: {figure, reference, value, ratio, goal, met} as
    text, and "numbers".

    ``value_runs`` and ``reference_runs`` are per-round values (None where a
    round has none); ``reference`` is copyparty's unless ``label`` names
    another.  The ratio is the median over rounds of value / reference, both
    of one round (what interleaving is for), or value / x for a goal
    ("min", x) or ("max", x) without a reference.  ``goal``: ("ratio", f):
    ratio >= f; ("min", x) or ("max", x): the value's median alone against x;
    None: informative.  ``missing`` says why there is no value."""
    def shown(number):
        return ("%%.%df %%s" % digits) % (number, unit)

    values, references = _present(value_runs), _present(reference_runs)
    value = statistics.median(values) if values else None
    reference = statistics.median(references) if references else None
    pairs = [(one, other) for one, other in zip(value_runs, reference_runs)
             if one is not None and other]
    ratio = None
    if pairs:
        ratio = statistics.median(one / other for one, other in pairs)
    elif value is not None and goal and goal[0] in ("min", "max"):
        ratio = value / goal[1]
    met = None
    if goal and value is not None:
        if goal[0] == "ratio":
            met = None if ratio is None else ratio >= goal[1]
        else:
            met = value >= goal[1] if goal[0] == "min" else value <= goal[1]
    if goal is None:
        goal_text = "(informative)"
    elif goal[0] == "ratio":
        factor = "%g" % goal[1]
        goal_text = "≥ %s× %s" % (factor if "." in factor else factor + ".0", label)
    else:
        goal_text = "%s %s" % ("≥" if goal[0] == "min" else "≤", shown(goal[1]))
    if reference is not None:
        reference_text = shown(reference) if label == "copyparty" else "%s: %s" % (
            label, shown(reference))
    else:
        reference_text = "—" if label != "copyparty" else "not measured"
    return {"figure": figure, "reference": reference_text,
            "value": shown(value) if value is not None else (missing or "not measured"),
            "ratio": "%.2f×" % ratio if ratio is not None else "—", "goal": goal_text,
            "met": "n/a" if met is None else ("met" if met else "MISSED"),
            "numbers": {"value": value, "reference": reference, "ratio": ratio,
                        "value_runs": list(value_runs), "reference_runs": list(reference_runs),
                        "goal": list(goal) if goal else None, "met": met, "unit": unit}}


def peer_rows(ctx):
    """The targets of the peer comparison, each a peer_row, in the issue's order."""
    figures, peer = ctx.figures, ctx.peer

    def runs(key):
        return list(figures.rows[key]["runs"]) if key in figures.rows else []

    big = size_label(ctx.sizes["peer_big_bytes"])
    small = "%d KiB" % (ctx.sizes["small_size"] // 1024)
    workers = peer.get("workers_missing") or ""
    one = "one process (--workers 1)"
    rows = [
        peer_row("1. %s distinct PUT, 8 keep-alive connections" % small, "uploads/s",
                 runs("peer_small_put_bucket"), runs("peer_small_put_copyparty"),
                 ("ratio", 1.0)),
        peer_row("1. server CPU per %s PUT" % small, "ms", runs("peer_cpu_small_put_bucket"),
                 runs("peer_cpu_small_put_copyparty"), ("max", 0.8), digits=3),
        peer_row("2. %s distinct multipart uploads, 8 connections" % small, "uploads/s",
                 runs("peer_small_multipart_bucket"), runs("peer_small_multipart_copyparty"),
                 ("ratio", 2.0)),
        peer_row("3. %s PUT against multipart, same body, 3 digests" % big, "MB/s",
                 runs("peer_big_put_bucket"), runs("peer_big_multipart_bucket"),
                 ("ratio", 0.95), label="multipart"),
        peer_row("3. %s PUT, http_bucket --digests sha256" % big, "MB/s",
                 runs("peer_big_put_bucket_sha256"), runs("peer_big_put_copyparty"),
                 ("ratio", 1.5)),
        peer_row("3. %s PUT, 3 digests, against all-core hashing of them" % big, "MB/s",
                 runs("peer_big_put_bucket"), runs("peer_ceiling_3digest"),
                 ("ratio", 0.9), label="ceiling"),
        peer_row("4. --workers auto: HEAD /checksum against GET of a small file", "req/s",
                 runs("peer_head_bucket"), runs("peer_get_copyparty"),
                 ("ratio", 10.0), missing=workers),
        peer_row("4. --workers auto: %s distinct PUT" % small, "uploads/s",
                 runs("peer_small_put_bucket"), runs("peer_small_put_copyparty"),
                 ("ratio", 1.3), missing=workers),
        peer_row("5. HEAD /checksum against GET of a small file, %s" % one, "req/s",
                 runs("peer_head_bucket_one"), runs("peer_get_copyparty"), ("ratio", 2.0)),
        peer_row("5. %s download by curl" % big, "MB/s", runs("peer_download_bucket"),
                 runs("peer_download_copyparty"), ("min", 1000)),
        upload_rss_row(ctx),
        startup_row(ctx),
        peer_row("%s PUT, %s" % (small, one), "uploads/s", runs("peer_small_put_bucket_one"),
                 runs("peer_small_put_copyparty")),
        peer_row("server CPU per %s PUT, %s" % (small, one), "ms",
                 runs("peer_cpu_small_put_bucket_one"), runs("peer_cpu_small_put_copyparty"),
                 digits=3),
        peer_row("%s multipart, %s" % (small, one), "uploads/s",
                 runs("peer_small_multipart_bucket_one"),
                 runs("peer_small_multipart_copyparty")),
        peer_row("%s PUT, http_bucket --fsync false (copyparty never fsyncs)" % small,
                 "uploads/s", runs("peer_small_put_bucket_nofsync"),
                 runs("peer_small_put_copyparty")),
        peer_row("server CPU per %s multipart upload" % small, "ms",
                 runs("peer_cpu_small_multipart_bucket"),
                 runs("peer_cpu_small_multipart_copyparty"), digits=3),
        peer_row("GET of a small file, both (http_bucket: GET /checksum), %s" % one, "req/s",
                 runs("peer_get_bucket_one"), runs("peer_get_copyparty")),
        peer_row("HEAD of a small file, both (Python generator), %s" % one, "req/s",
                 runs("peer_head_py_bucket_one"), runs("peer_head_py_copyparty")),
        peer_row("%s PUT, 3 digests (copyparty: sha512 alone)" % big, "MB/s",
                 runs("peer_big_put_bucket"), runs("peer_big_put_copyparty")),
        peer_row("%s PUT, 3 digests, %s" % (big, one), "MB/s",
                 runs("peer_big_put_bucket_one"), runs("peer_big_put_copyparty")),
        peer_row("%s multipart (copyparty: act=bput)" % big, "MB/s",
                 runs("peer_big_multipart_bucket"), runs("peer_big_multipart_copyparty")),
        peer_row("peak RSS during the %s PUT (the worker that took it)" % big, "MiB",
                 runs("peer_rss_big_put_bucket"), runs("peer_rss_big_put_copyparty"), digits=1),
    ]
    if peer.get("skipped"):
        for row in rows:
            if row["reference"] == "not measured":
                row["reference"] = "skipped"
    return rows


def upload_rss_row(ctx):
    """Goal 5's RSS during a 1 GiB upload: section b's figure, else section p's
    large PUT (of its size, which the figure names)."""
    figures = ctx.figures
    key, size = "rss_upload_put", ctx.sizes["big_bytes"]
    if figures.median(key) is None:
        key, size = "peer_rss_big_put_bucket", ctx.sizes["peer_big_bytes"]
    runs = figures.rows[key]["runs"] if key in figures.rows else []
    return peer_row("5. peak RSS during a %s PUT" % size_label(size), "MiB", runs,
                    goal=("max", 64), digits=1, label="—",
                    missing="not measured (sections upload, peers)")


def startup_row(ctx):
    """Goal 5's startup time per 100,000 blobs, from section f's largest store."""
    counts = [int(key.split("_")[1]) for key in ctx.figures.rows
              if re.match(r"startup_\d+$", key) and ctx.figures.median(key) is not None]
    runs, figure = [], "5. startup to index_ready, per 100,000 blobs"
    if counts:
        count = max(counts)
        runs = [None if run is None else run * 100000.0 / count
                for run in ctx.figures.rows["startup_%d" % count]["runs"]]
        figure += " (store of %d)" % count
    return peer_row(figure, "s", runs, goal=("max", 1.0), digits=3, label="—",
                    missing="not measured (section startup)")


def peer_table(rows):
    header = ("figure", "copyparty / reference", "http_bucket", "ratio", "goal", "met")
    keys = ("figure", "reference", "value", "ratio", "goal", "met")
    lines = [header] + [tuple(row[key] for key in keys) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    out = []
    for number, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                                     for column, (cell, width) in enumerate(zip(line, widths)))
                   + " |")
        if number == 0:
            out.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(out)


def load_generator_lines(ctx):
    """The load generator's own CPU per request beside the servers', per figure."""
    lines = []
    for key, row in ctx.figures.rows.items():
        client = _median_or_none(row["extra"].get("client_cpu_us_per_request", []))
        server = _median_or_none(row["extra"].get("server_cpu_us_per_request", []))
        if key.startswith("peer_") and client is not None:
            lines.append("  %-75s %5.0f us/request (server %5.0f us, %.2f × the server's)"
                         % (row["figure"][len("peers: "):], client, server or 0,
                            client / server if server else 0))
    return lines


def peer_report(ctx, rows):
    """The text printed after the main table: copyparty's state, the table of
    ``rows`` (peer_rows), the load generator's CPU."""
    peer = ctx.peer
    if peer.get("skipped"):
        head = "copyparty: skipped (%s); http_bucket's rows measured alone" % peer["skipped"]
    else:
        head = ("http_bucket against copyparty %s (%s -m copyparty -i 127.0.0.1 -p PORT "
                "-v DIR::rw --wram), medians of %d interleaved rounds"
                % (peer["version"], peer["python"], peer["rounds"]))
    text = [head, peer_table(rows),
            "value cells: medians over rounds; ratio: the median over rounds of http_bucket "
            "/ the reference of the same round, or median / goal where there is no reference",
            "load generator (%s): its own CPU per request, medians:" % ctx.client]
    return "\n".join(text + load_generator_lines(ctx))


# ===========================================================================
# f. Startup over many stored blobs
# ===========================================================================


def _generate_part(root, start, stop, journal_name):
    """Blob files and their journal lines for blobs ``start`` .. ``stop`` - 1."""
    blob_root = os.path.join(root, "blob")
    made = set()
    now = time.time()
    lines = []
    for number in range(start, stop):
        content = b"http_bucket bench blob %d\n" % number
        sha256 = hashlib.sha256(content).hexdigest()
        directory = os.path.join(blob_root, sha256[:2], sha256[2:4])
        if directory not in made:
            os.makedirs(directory, exist_ok=True)
            made.add(directory)
        fd = os.open(os.path.join(directory, sha256), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        os.write(fd, content)
        os.close(fd)
        # The format Journal.blob writes (algorithms sorted by name), and the
        # pin an upload to /upload records: without it the blob would be an
        # orphan, reclaimed at startup.
        lines.append("B\t%.3f\t%d\tmd5=%s\tsha256=%s\tsha512=%s\n" % (
            now, len(content), hashlib.md5(content).hexdigest(), sha256,
            hashlib.sha512(content).hexdigest()))
        lines.append("P\t%.3f\t%s\t0.000\n" % (now, sha256))
        if len(lines) >= 10000:
            _append(os.path.join(root, "index", journal_name), lines)
    _append(os.path.join(root, "index", journal_name), lines)


def _append(path, lines):
    with open(path, "a", encoding="ascii") as handle:
        handle.write("".join(lines))
    del lines[:]


def generate_store(root, count):
    """A store of ``count`` small distinct blobs with journals, made without HTTP."""
    for name in ("blob", "index"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    parts = 2 if count >= 50000 else 1
    context = multiprocessing.get_context("fork")
    bounds = [count * part // parts for part in range(parts + 1)]
    workers = [context.Process(target=_generate_part,
                               args=(root, bounds[part], bounds[part + 1],
                                     "benchgen-%d-%d.log" % (os.getpid(), part)))
               for part in range(parts)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(1800)
        if worker.exitcode != 0:
            raise RuntimeError("blob generation failed (exit %s)" % worker.exitcode)


def remove_tree(path):
    """rm -rf ``path``: two rm processes over the blob trees of the stores in it
    (shutil.rmtree took ~3 min for 1M blobs)."""
    tops = sorted(glob.glob(os.path.join(path, "blob", "*")) +
                  glob.glob(os.path.join(path, "*", "blob", "*")))
    removers = [subprocess.Popen(["rm", "-rf"] + tops[half::2]) for half in (0, 1)
                if tops[half::2]]
    for remover in removers:
        remover.wait(1800)
    subprocess.run(["rm", "-rf", path], timeout=1800)
    shutil.rmtree(path, ignore_errors=True)  # where rm is missing


def foreign_journals(server):
    """Journals in index/ other than the live server's own (merged away when done)."""
    marker = "-%d-" % server.pid
    try:
        names = os.listdir(os.path.join(server.directory, "index"))
    except OSError:
        return []
    return [name for name in names if name.endswith(".log") and marker not in name]


def measure_startup(ctx, directory, count, timeout):
    """One server start over ``directory``: dict of seconds and RSS."""
    server = ctx.servers.start(directory=directory, wait=False, label="startup")
    try:
        server.wait_listening(timeout, poll=0.005)
        listening = time.monotonic() - server.started
        ready = server.wait_ready(timeout, poll=0.005)
        rss_ready_kb = server.status().get("VmRSS", 0)
        deadline = time.monotonic() + timeout
        while foreign_journals(server) and time.monotonic() < deadline:
            time.sleep(0.01)
        background = time.monotonic() - server.started if not foreign_journals(server) else None
        time.sleep(0.3)  # let the background thread's garbage settle
        status = server.status()
        health = server.healthz()
        match = re.search(r"indexed (\d+) blobs in ([\d.]+) s", server.log_text())
    finally:
        ctx.servers.stop(server, remove_dir=False)
    return {"listening": listening, "ready": ready, "background": background,
            "rss_ready_kb": rss_ready_kb, "rss_kb": status.get("VmRSS", 0),
            "hwm_kb": status.get("VmHWM", 0), "blobs": health and health.get("blobs"),
            "server_blobs": int(match.group(1)) if match else None,
            "server_seconds": float(match.group(2)) if match else None}


def bench_startup(ctx):
    figures = ctx.figures
    counts = list(ctx.sizes["startup_counts"]) + ([1000000] if ctx.with_1m else [])
    figures.define("startup_empty", "startup, empty store: launch to index_ready", "s", digits=3)
    figures.define("rss_empty", "RSS of an empty-store server", "MiB", digits=1)
    stores = {}  # removed with the work directory at the end of the run
    for count in counts:
        label = "%dM" % (count // 1000000) if count >= 1000000 else "%dk" % (count // 1000)
        figures.define("startup_%d" % count, "startup, %s blobs: index_ready, net of empty start"
                       % label, "s", ("max", count / 100000.0),
                       "≤ %.2f s (1 s per 100k)" % (count / 100000.0), digits=3)
        figures.define("startup_bg_%d" % count, "startup, %s blobs: background scan done" % label,
                       "s", digits=2)
        figures.define("bytes_per_blob_%d" % count, "index RSS per blob, %s blobs" % label,
                       "B/blob", ("max", 300))
    for count in counts:
        directory = ctx.servers.fresh_dir("startup-%d" % count)
        started = time.monotonic()
        generate_store(directory, count)
        stores[count] = directory
        log("generated %d blobs in %.1f s" % (count, time.monotonic() - started))
    for run in range(ctx.runs):
        empty_dir = ctx.servers.fresh_dir("startup-empty")
        empty = measure_startup(ctx, empty_dir, 0, SERVER_START_TIMEOUT)
        shutil.rmtree(empty_dir, ignore_errors=True)
        figures.add("startup_empty", empty["ready"], listening=empty["listening"])
        figures.add("rss_empty", empty["rss_kb"] / 1024.0)
        for count in counts:
            timeout = max(60.0, count / 1000.0)
            result = measure_startup(ctx, stores[count], count, timeout)
            net = result["ready"] - empty["ready"]
            per_blob = (result["rss_kb"] - empty["rss_kb"]) * 1024.0 / count
            per_blob_ready = (result["rss_ready_kb"] - empty["rss_kb"]) * 1024.0 / count
            figures.add("startup_%d" % count, net, raw=result["ready"],
                        listening=result["listening"], server_says=result["server_seconds"],
                        blobs=result["blobs"])
            figures.add("startup_bg_%d" % count, result["background"])
            figures.add("bytes_per_blob_%d" % count, per_blob,
                        at_ready=per_blob_ready, rss_mib=result["rss_kb"] / 1024.0)
            if result["blobs"] != count:
                figures.note("startup_%d" % count, "server counted %s blobs" % result["blobs"])
            log("run %d startup %d: listening %.3f s, ready %.3f s (server says %s s), "
                "background done %s s, %.0f B/blob (%.0f at ready)"
                % (run + 1, count, result["listening"], result["ready"],
                   result["server_seconds"], "%.2f" % result["background"]
                   if result["background"] else "?", per_blob, per_blob_ready))
    for count in counts:
        row = figures.rows["startup_%d" % count]
        figures.note("startup_%d" % count, "raw %.3f s from launch, server says %s s"
                     % (_median_or_none(row["extra"]["raw"]),
                        _median_or_none(row["extra"]["server_says"])))
        row = figures.rows["bytes_per_blob_%d" % count]
        figures.note("bytes_per_blob_%d" % count, "after background scan; %.0f at index_ready"
                     % _median_or_none(row["extra"]["at_ready"]))


# ===========================================================================
# z. Scale: a store of a million blobs (ten with --big); GlusterFS
# ===========================================================================

DFS_DIR = os.path.join(HERE, "..", "shared", "dfs")


def index_bytes(directory):
    """Bytes of the journals and snapshots in ``directory``/index."""
    total = 0
    for entry in os.scandir(os.path.join(directory, "index")):
        if entry.name.endswith((".log", ".bin")):
            total += entry.stat().st_size
    return total


def proc_io(pid):
    fields = {}
    try:
        with open("/proc/%d/io" % pid) as handle:
            for line in handle:
                name, _, value = line.partition(":")
                fields[name] = int(value)
    except OSError:
        pass
    return fields


def measure_start(ctx, start, timeout):
    """One start (``start()`` returns the Server, not waited for): seconds
    to index_ready and to reconciled, memory once reconciled, bytes the
    process wrote meanwhile."""
    server = start()
    try:
        ready = server.wait_ready(timeout, poll=0.01)
        deadline = time.monotonic() + timeout
        health = server.healthz()
        while not (health and health.get("reconciled")) and time.monotonic() < deadline:
            time.sleep(0.01)
            health = server.healthz()
        reconciled = time.monotonic() - server.started if health.get("reconciled") else None
        time.sleep(0.3)
        pids = process_tree(server.pid)
        status = [proc_status(pid) for pid in pids]
        written = sum(proc_io(pid).get("write_bytes", 0) for pid in pids)
        return server, {"ready": ready, "reconciled": reconciled, "blobs": health.get("blobs"),
                        "anon_kb": [item.get("RssAnon", 0) for item in status],
                        "file_kb": [item.get("RssFile", 0) for item in status],
                        "pss_kb": [pss_kb(pid) for pid in pids],
                        "hwm_kb": max(item.get("VmHWM", 0) for item in status),
                        "written": written}
    except BaseException:
        ctx.servers.stop(server, remove_dir=False)
        raise


def pss_kb(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def scale_label(count):
    return "%dM" % (count // 1000000) if count >= 1000000 else "%dk" % (count // 1000)


def copy_index(source, target):
    """A store at ``target`` sharing ``source``'s blobs (a symlink) with a
    copy of its journals: an older server rewrites the journals it reads."""
    os.makedirs(os.path.join(target, "index"))
    for entry in os.scandir(os.path.join(source, "index")):
        if entry.name.endswith(".log"):
            shutil.copyfile(entry.path, os.path.join(target, "index", entry.name))
    os.symlink(os.path.join(source, "blob"), os.path.join(target, "blob"))


def bench_scale(ctx):
    figures = ctx.figures
    counts = [ctx.sizes["scale_blobs"]] + ([10000000] if ctx.big else [])
    empty_dir = ctx.servers.fresh_dir("scale-empty")
    empty = ctx.servers.start(directory=empty_dir, label="scale-empty")
    time.sleep(0.5)
    empty_anon = proc_status(empty.pid).get("RssAnon", 0)
    ctx.servers.stop(empty)
    for count in counts:
        label = scale_label(count)
        per_million = max(count / 1000000.0, 1.0)  # the goals are per 1M: a listing of
        # every blob/ab/cd directory (65,536) costs the same for fewer blobs
        rows = [
            ("cold_ready", "start to index_ready, no snapshot", "s",
             ("max", 10 * per_million), "≤ %g s (10 s per 1M)" % (10 * per_million), 2),
            ("cold_reconciled", "start to reconciled, no snapshot (the whole blob tree "
             "listed)", "s", None, "", 2),
            ("ready", "start to index_ready, from the snapshot", "s", ("max", 1.0), "≤ 1 s", 2),
            ("reconciled", "start to reconciled, from the snapshot", "s",
             ("max", 3 * per_million), "≤ %g s (3 s per 1M)" % (3 * per_million), 2),
            ("anon_per_blob", "index memory per blob, private (RssAnon over an empty server)",
             "B/blob", ("max", 48), "≤ 48 B/blob with the shared part", 1),
            ("shared_per_blob", "index memory per blob, shared (the mapped snapshot)",
             "B/blob", None, "", 1),
            ("hwm", "peak RSS of a start from the snapshot", "MiB", None, "", 0),
            ("written", "bytes written by a start from the snapshot", "MB",
             None, "journals: none copied", 1),
            ("workers_anon", "private memory per worker, --workers 2", "MiB", None, "", 1),
            ("workers_pss", "PSS per worker, --workers 2 (shared pages split)", "MiB", None, "", 1),
            ("head_md5", "HEAD /checksum/<md5> on the big store, 16 connections", "req/s",
             None, "", 0)]
        if ctx.before:
            rows[2:2] = [("before_ready", "before: start to index_ready", "s", None, "", 2),
                         ("before_reconciled", "before: start to reconciled", "s", None, "", 2),
                         ("before_anon_per_blob", "before: RSS per blob (RssAnon)", "B/blob",
                          None, "", 0),
                         ("before_hwm", "before: peak RSS", "MiB", None, "", 0),
                         ("before_written", "before: bytes written by a start", "MB",
                          None, "", 1)]
        for key, figure, unit, goal, goal_text, digits in rows:
            figures.define("scale_%s_%s" % (key, label), "%s, %s blobs: %s" % (
                "scale", label, figure), unit, goal, goal_text, digits=digits)

        def add(key, value, **extra):
            figures.add("scale_%s_%s" % (key, label), value, **extra)

        directory = ctx.servers.fresh_dir("scale-%s" % label)
        started = time.monotonic()
        generate_store(directory, count)
        log("scale: generated %d blobs in %.1f s (%.0f MB of journals)"
            % (count, time.monotonic() - started, index_bytes(directory) / MB))
        timeout = max(120.0, 60 * per_million)
        if ctx.before:
            for run in range(ctx.runs):
                copy = ctx.servers.fresh_dir("scale-before-%s" % label)
                shutil.rmtree(copy)
                copy_index(directory, copy)
                for _attempt in range(2):  # the second start: as after a restart
                    server, result = measure_start(ctx, lambda: ctx.servers.start_script(
                        ctx.before, copy, wait=False), timeout)
                    ctx.servers.stop(server, remove_dir=False)
                add("before_ready", result["ready"])
                add("before_reconciled", result["reconciled"])
                add("before_anon_per_blob", (result["anon_kb"][0] - empty_anon) * 1024.0 / count)
                add("before_hwm", result["hwm_kb"] / 1024.0)
                add("before_written", result["written"] / MB)
                log("scale before %s run %d: ready %.2f s, reconciled %s s, %.0f B/blob, "
                    "wrote %.0f MB" % (label, run + 1, result["ready"], result["reconciled"],
                                       (result["anon_kb"][0] - empty_anon) * 1024.0 / count,
                                       result["written"] / MB))
                os.unlink(os.path.join(copy, "blob"))
                shutil.rmtree(copy, ignore_errors=True)
        generated = os.path.join(ctx.workdir, "scale-journals-%s" % label)
        shutil.copytree(os.path.join(directory, "index"), generated)
        for run in range(ctx.runs):
            # Cold: the journals as generated, no snapshot.
            shutil.rmtree(os.path.join(directory, "index"))
            shutil.copytree(generated, os.path.join(directory, "index"))
            server, cold = measure_start(ctx, lambda: ctx.servers.start(
                directory=directory, wait=False), timeout)
            ctx.servers.stop(server, remove_dir=False)  # writes the snapshot
            add("cold_ready", cold["ready"])
            add("cold_reconciled", cold["reconciled"])
            for attempt in range(2):  # the second: nothing left to fold
                server, warm = measure_start(ctx, lambda: ctx.servers.start(
                    directory=directory, wait=False), timeout)
                if attempt == 0:
                    ctx.servers.stop(server, remove_dir=False)
            snapshot = os.path.getsize(os.path.join(directory, "index", "snapshot.bin"))
            add("ready", warm["ready"], blobs=warm["blobs"])
            add("reconciled", warm["reconciled"])
            add("anon_per_blob", (warm["anon_kb"][0] - empty_anon) * 1024.0 / count)
            add("shared_per_blob", snapshot / float(count))
            add("hwm", warm["hwm_kb"] / 1024.0)
            add("written", warm["written"] / MB)
            if run == 0:
                md5 = hashlib.md5(b"http_bucket bench blob %d\n" % (count // 2)).hexdigest()
                load = load_requests(ctx, server, "HEAD", "/checksum/" + md5, 16, 5)
                add("head_md5", load.rate)
                if load.failed:
                    figures.note("scale_head_md5_%s" % label, "%d failed" % load.failed)
            ctx.servers.stop(server, remove_dir=False)
            server, workers = measure_start(ctx, lambda: ctx.servers.start(
                directory=directory, extra_args=("--workers", "2"), wait=False), timeout)
            ctx.servers.stop(server, remove_dir=False)
            children = list(zip(workers["anon_kb"], workers["pss_kb"]))[1:]
            add("workers_anon", statistics.mean(anon for anon, _ in children) / 1024.0)
            add("workers_pss", statistics.mean(pss for _, pss in children) / 1024.0)
            log("scale %s run %d: cold ready %.2f s, reconciled %s s; from the snapshot ready "
                "%.2f s, reconciled %s s, %.1f B/blob private + %.1f shared, wrote %.1f MB; "
                "workers %s" % (label, run + 1, cold["ready"], cold["reconciled"],
                                warm["ready"], warm["reconciled"],
                                (warm["anon_kb"][0] - empty_anon) * 1024.0 / count,
                                snapshot / float(count), warm["written"] / MB, children))
        figures.note("scale_anon_per_blob_%s" % label, "empty server: %.1f MiB RssAnon"
                     % (empty_anon / 1024.0))
        shutil.rmtree(generated, ignore_errors=True)
    bench_scale_dfs(ctx)


def bench_scale_dfs(ctx):
    """The same reconcile on the GlusterFS volume of ../shared/dfs (root only)."""
    count = ctx.sizes["dfs_blobs"]
    label = scale_label(count)
    key = "scale_dfs_reconciled_%s" % label
    figures = ctx.figures
    figures.define(key, "scale, GlusterFS, %s blobs: start to reconciled, from the snapshot"
                   % label, "s", ("max", 60 * count / 1000000.0),
                   "≤ %g s (60 s per 1M)" % (60 * count / 1000000.0), digits=2)
    figures.define(key + "_cold", "scale, GlusterFS, %s blobs: start to reconciled, no snapshot "
                   "(the whole blob tree listed)" % label, "s", digits=2)
    mounted = os.path.ismount("/mnt/dfs-a")
    if not mounted:
        if os.getuid() != 0 or not os.path.exists(os.path.join(DFS_DIR, "dfs-up.sh")):
            figures.note(key, "skipped: not root, or no ../shared/dfs")
            return
        run = subprocess.run(["bash", os.path.join(DFS_DIR, "dfs-up.sh")],
                             capture_output=True, timeout=600)
        if run.returncode != 0:
            figures.note(key, "skipped: dfs-up.sh failed")
            log("dfs-up.sh failed: %s" % run.stderr.decode(errors="replace")[-500:])
            return
    directory = tempfile.mkdtemp(prefix="bench-scale-", dir="/mnt/dfs-a")
    try:
        started = time.monotonic()
        generate_store(directory, count)
        log("scale dfs: generated %d blobs on GlusterFS in %.1f s"
            % (count, time.monotonic() - started))
        timeout = max(600.0, count / 100.0)
        for run in range(ctx.runs):
            server, cold = measure_start(ctx, lambda: ctx.servers.start(
                directory=directory, wait=False), timeout)
            ctx.servers.stop(server, remove_dir=False)
            server, warm = measure_start(ctx, lambda: ctx.servers.start(
                directory=directory, wait=False), timeout)
            ctx.servers.stop(server, remove_dir=False)
            if run == 0:
                figures.add(key + "_cold", cold["reconciled"])
            figures.add(key, warm["reconciled"])
            # Only the first start has no snapshot (it writes one at its end).
            log("scale dfs run %d: %s reconciled %s s, from the snapshot %s s"
                % (run + 1, "cold (no snapshot)" if run == 0 else "first start",
                   cold["reconciled"], warm["reconciled"]))
    finally:
        subprocess.run(["rm", "-rf", directory], timeout=1800)
        if not mounted:
            subprocess.run(["bash", os.path.join(DFS_DIR, "dfs-down.sh")],
                           capture_output=True, timeout=300)


# ===========================================================================
# Driver
# ===========================================================================


class Context:
    def __init__(self, args, workdir, servers, figures):
        self.sizes = QUICK if args.quick else FULL
        self.runs = args.runs
        self.workdir = workdir
        self.servers = servers
        self.figures = figures
        self.with_1m = args.with_1m
        self.big = args.big
        self.before = os.path.abspath(args.before) if args.before else None
        self.client = args.client
        self.big_file = self.big_sha256 = None
        self.copyparty_venv = args.copyparty_venv
        self.peer = {}  # section p: copyparty's state and the large file (prepare_peers)
        self._nonce = 0

    def next_nonce(self):
        self._nonce += 1
        return self._nonce


def server_version(script):
    """sha256 of the server script and the git commit it was checked out at."""
    with open(script, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    commit = None
    try:
        result = subprocess.run(["git", "log", "-1", "--format=%h %s", "--", script],
                                cwd=os.path.dirname(script), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, timeout=10)
        dirty = subprocess.run(["git", "diff", "--quiet", "--", script],
                               cwd=os.path.dirname(script), timeout=10).returncode
        commit = result.stdout.decode().strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"sha256": digest, "git": commit}


def tool_version(command):
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=10)
        return result.stdout.decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def selected_sections(text):
    if not text:
        return list(SECTIONS)
    chosen = []
    for word in text.split(","):
        word = word.strip().lower()
        names = LETTERS.get(word, (word,))
        for name in names:
            if name not in SECTIONS:
                raise SystemExit("--only: unknown section %r (one of %s or letters %s)"
                                 % (word, ", ".join(SECTIONS), "".join(sorted(LETTERS))))
            if name not in chosen:
                chosen.append(name)
    return [name for name in SECTIONS if name in chosen]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per figure (default: 3, or 1 with --quick)")
    parser.add_argument("--json", default="bench-results.json", help="where to write results")
    parser.add_argument("--with-1m", action="store_true",
                        help="add the 1,000,000-blob startup case (minutes, ~1 GB of files)")
    parser.add_argument("--big", action="store_true",
                        help="the scale section adds a 10,000,000-blob store (~45 GB of "
                        "disk for the blob files, an hour)")
    parser.add_argument("--before", default=None, metavar="SCRIPT",
                        help="the scale section also measures this older http_bucket.py "
                        "on the same store (git show REV:http_bucket.py > old.py)")
    parser.add_argument("--only", default="", help="sections to run: %s (or letters %s)"
                        % (",".join(SECTIONS), ",".join(sorted(LETTERS))))
    parser.add_argument("--client", choices=("wrk", "python"), default=None,
                        help="load generator (default: wrk when installed)")
    parser.add_argument("--server", default=os.path.join(HERE, "http_bucket.py"),
                        help="the server script to benchmark (default: %(default)s)")
    parser.add_argument("--copyparty-venv", default=COPYPARTY_VENV, metavar="DIR",
                        help="bench-only venv holding copyparty %s for the peers section, "
                        "made on first use (default: %%(default)s)" % COPYPARTY_VERSION)
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.client is None:
        args.client = "wrk" if have_wrk() else "python"
    if args.client == "wrk" and not have_wrk():
        parser.error("wrk is not installed (apt-get install wrk), use --client python")
    args.sections = selected_sections(args.only)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not shutil.which("curl") and {"upload", "download", "peers"} & set(args.sections):
        raise SystemExit("curl is needed for the upload, download and peers sections")
    figures = Figures()
    workdir = tempfile.mkdtemp(prefix="http_bucket_bench-")
    servers = Servers(os.path.abspath(args.server), workdir)
    ctx = Context(args, workdir, servers, figures)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
            "quick": args.quick, "runs": args.runs, "sections": args.sections,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
            "client": args.client, "wrk": tool_version(["wrk", "--version"]) if have_wrk() else None,
            "curl": tool_version(["curl", "--version"]), "server": args.server,
            "server_version": server_version(os.path.abspath(args.server)),
            "units": "MB = 10**6 bytes, MiB = 2**20 bytes"}
    log("sections %s, %d run(s), client %s, work dir %s"
        % (",".join(args.sections), args.runs, args.client, workdir))
    started = time.monotonic()
    failures = {}
    try:
        for name in args.sections:
            section_started = time.monotonic()
            meta.setdefault("loadavg_at_section", {})[name] = os.getloadavg()
            try:
                globals()["bench_" + name](ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failures[name] = "%s: %s" % (type(exc).__name__, exc)
                log("section %s failed: %s" % (name, failures[name]))
                servers.stop_all()
            log("section %s took %.1f s" % (name, time.monotonic() - section_started))
    finally:
        servers.stop_all()
        remove_tree(workdir)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = os.getloadavg()
    table = figures.table()
    print("\nhttp_bucket benchmark (%s, %d run(s), medians; client: %s; %s)"
          % ("quick" if args.quick else "full", args.runs, args.client, meta["units"]))
    print(table)
    peers = None
    if ctx.peer:
        rows = peer_rows(ctx)
        report = peer_report(ctx, rows)
        print("\n" + report)
        peers = {"copyparty": {key: value for key, value in ctx.peer.items() if key != "file"},
                 "rows": rows, "report": report}
    for name, text in failures.items():
        print("section %s FAILED: %s" % (name, text))
    with open(args.json, "w") as handle:
        json.dump({"meta": meta, "failures": failures, "figures": figures.as_json(),
                   "table": table, "peers": peers}, handle, indent=1)
    log("wrote %s in %.0f s" % (args.json, meta["seconds"]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
