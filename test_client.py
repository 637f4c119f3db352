"""The client: ``http_bucket.py push`` and ``pull`` against real servers.

The client runs as a subprocess (``python3 http_bucket.py push ...``), so
exit statuses and output are what a CI job sees.  A TcpRelay between it
and the server counts the bytes each way (a second push sends no file
bodies), cuts a connection mid-file (the push or pull resumes), answers
503/507 with Retry-After (retried), and stands in for an HTTP proxy.

    python3 -m unittest -v test_client
"""

import hashlib
import http.server
import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zipfile

from http_bucket_testing import (SERVER_SCRIPT, ServerProcess, TcpRelay, clean_environment,
                                 files_under, free_port)

import http_bucket

KIB = 1024
MIB = 1024 * 1024
CLIENT_TIMEOUT = 60  # one client run; the slowest here takes a few seconds
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


def client_environment(extra=None):
    """The caller's environment without server settings or proxies, plus ``extra``."""
    environ = {name: value for name, value in clean_environment().items()
               if name.lower() not in PROXY_VARIABLES}
    environ.update(extra or {})
    return environ


class Run:
    """One client run: ``returncode``, ``stdout``, ``stderr``, and
    ``report`` (the --json object, when it printed one)."""

    def __init__(self, completed):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.report = None
        if self.stdout.strip().startswith("{"):
            self.report = json.loads(self.stdout)

    def __repr__(self):
        return "<Run exit %d\nstdout: %s\nstderr: %s>" % (self.returncode, self.stdout,
                                                         self.stderr)


def client(*args, env=None, json_report=True):
    """Run ``http_bucket.py ARGS`` (with --json unless told not to): a Run."""
    command = [sys.executable, SERVER_SCRIPT] + [str(arg) for arg in args]
    if json_report:
        command.append("--json")
    completed = subprocess.run(command, env=client_environment(env), capture_output=True,
                               text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)
    return Run(completed)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def make_tree(root):
    """A tree of files, subfolders, a zip, an empty file and unicode
    names; {relative path: bytes}."""
    archive = os.path.join(root, "reports.zip")
    os.makedirs(root)
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("junit/a.xml", b"<testsuite name='a'/>")
        zipped.writestr("junit/b.xml", b"<testsuite name='b'/>")
    files = {"logs/build.log": b"line\n" * 2000, "logs/deep/er/x.bin": os.urandom(300 * KIB),
             "empty": b"", "caf\u00e9 \u2713/\u65e5\u672c\u8a9e.txt": "\u00fc".encode() * 10,
             "same-a.txt": b"same content", "same-b.txt": b"same content"}
    for name, data in files.items():
        write(os.path.join(root, name), data)
    with open(archive, "rb") as handle:
        files["reports.zip"] = handle.read()
    return files


def stored(directory, *segments):
    """{relative path: bytes} of every file under files/<segments>."""
    base = os.path.join(directory, "files", *segments)
    found = {}
    for relative in files_under(base, relative=True):
        with open(os.path.join(base, relative), "rb") as handle:
            found[relative.replace(os.sep, "/")] = handle.read()
    return found


def local_files(root):
    found = {}
    for relative in files_under(root, relative=True):
        with open(os.path.join(root, relative), "rb") as handle:
            found[relative.replace(os.sep, "/")] = handle.read()
    return found


class ClientCase(unittest.TestCase):
    """A server for the class and a relay before it; a scratch folder per test."""

    ARGS = ("--fsync", "false")
    ENV = None

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-client-")
        cls.server = ServerProcess(os.path.join(cls.directory, "store"), cls.ARGS,
                                   env=cls.ENV).start()
        cls.relay = TcpRelay(cls.server.port)

    @classmethod
    def tearDownClass(cls):
        cls.relay.close()
        cls.server.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="case-", dir=self.directory)
        self.store = self.server.directory
        self.relay.reset_counts()

    def url(self, path):
        return self.relay.url(path)

    def assertLanded(self, run, **counts):
        self.assertEqual(run.returncode, 0, run)
        for key, value in counts.items():
            self.assertEqual(run.report[key], value, "%s in %r" % (key, run))
        self.assertEqual(run.report["failed"], 0, run)


class PushTest(ClientCase):

    def test_first_push_then_unchanged_then_one_changed(self):
        tree = os.path.join(self.work, "tree")
        files = make_tree(tree)
        total = sum(len(data) for data in files.values())
        first = client("push", tree, "--to", self.url("files/ci/1/"))
        self.assertLanded(first, files=len(files), skipped=0)
        self.assertEqual(first.report["sent"] + first.report["deployed"], len(files))
        self.assertEqual(stored(self.store, "ci", "1", "tree"), files)
        self.assertGreaterEqual(self.relay.upstream, total)
        zipped = hashlib.sha256(b"<testsuite name='a'/>").hexdigest()
        reply = self.server.request("HEAD", "/checksum/" + zipped)
        self.assertEqual(reply.status, 200, "the zip's member was expanded")

        self.relay.reset_counts()
        second = client("push", tree, "--to", self.url("files/ci/1/"))
        self.assertLanded(second, skipped=len(files), sent=0, deployed=0, bytes_sent=0)
        self.assertLess(self.relay.upstream, 4 * KIB, "no file bodies: %d bytes went up"
                        % self.relay.upstream)

        changed = os.urandom(200 * KIB)
        write(os.path.join(tree, "logs", "deep", "er", "x.bin"), changed)
        self.relay.reset_counts()
        third = client("push", tree, "--to", self.url("files/ci/1/"))
        self.assertLanded(third, sent=1, skipped=len(files) - 1, bytes_sent=len(changed))
        self.assertLess(self.relay.upstream, len(changed) + 8 * KIB)
        self.assertEqual(stored(self.store, "ci", "1", "tree", "logs", "deep", "er"),
                         {"x.bin": changed})

    def test_present_content_is_deployed_without_its_body(self):
        tree = os.path.join(self.work, "tree")
        files = make_tree(tree)
        self.assertLanded(client("push", tree + "/", "--to", self.url("files/deploy/a/")))
        self.relay.reset_counts()
        again = client("push", tree + "/", "--to", self.url("files/deploy/b/"),
                       "--meta", "build=42", "--meta", "who=j\u00fcrgen", "--keep")
        self.assertLanded(again, deployed=len(files), sent=0, bytes_sent=0)
        self.assertLess(self.relay.upstream, 64 * KIB)
        self.assertEqual(stored(self.store, "deploy", "b"), files)
        records = self.server.request("GET", "/uploads?format=json&meta.build=42").json()
        self.assertEqual(len(records["uploads"]), len(files), records)
        self.assertEqual(records["uploads"][0]["meta"], {"build": "42", "who": "j\u00fcrgen"})
        self.assertTrue(all(record["keep"] for record in records["uploads"]), records)
        # The same names again with a retention: deployed again, so it applies.
        third = client("push", tree + "/", "--to", self.url("files/deploy/b/"),
                       "--retain-days", "3")
        self.assertLanded(third, deployed=len(files), skipped=0)
        listing = self.server.request("GET", "/files/deploy/b/?format=json").json()
        self.assertTrue(all(entry.get("expires") for entry in listing["entries"]
                            if entry["type"] == "file"), listing)

    def test_file_arguments_exact_names_upload_and_excludes(self):
        one = os.path.join(self.work, "one.txt")
        write(one, b"one")
        self.assertLanded(client("push", one, "--to", self.url("files/exact/renamed.txt")))
        self.assertEqual(stored(self.store, "exact"), {"renamed.txt": b"one"})
        archive = os.path.join(self.work, "results.zip")
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("r/only-here.xml", b"<only-here/>")
        self.assertLanded(client("push", archive, one, "--to", self.url("upload/")), files=2)
        member = hashlib.sha256(b"<only-here/>").hexdigest()
        self.assertEqual(self.server.request("HEAD", "/checksum/" + member).status, 200)
        folder = os.path.join(self.work, "dist")
        for name in ("keep.txt", "skip.tmp", "cache/x.txt", "sub/keep2.txt"):
            write(os.path.join(folder, name), name.encode())
        run = client("push", folder, "--to", self.url("files/ex/"), "--exclude", "*.tmp",
                     "--exclude", "cache")
        self.assertLanded(run, files=2)
        self.assertEqual(sorted(stored(self.store, "ex")), ["dist/keep.txt", "dist/sub/keep2.txt"])
        twin = os.path.join(self.work, "other", "keep.txt")
        write(twin, b"another keep.txt")
        clash = client("push", os.path.join(folder, "keep.txt"), twin, "--to", self.url("files/ex/"))
        self.assertEqual(clash.returncode, 1, clash)
        self.assertEqual(clash.report["failures"], [{"file": twin, "error": (
            "files/ex/keep.txt is where %s goes already" % os.path.join(folder, "keep.txt"))}])

    def test_dry_run_changes_nothing(self):
        tree = os.path.join(self.work, "tree")
        files = make_tree(tree)
        run = client("push", tree, "--to", self.url("files/dry/"), "--dry-run")
        self.assertEqual(run.returncode, 0, run)
        self.assertEqual(run.report["would_send"] + run.report["would_deploy"], len(files))
        self.assertEqual(run.report["bytes_sent"], 0)
        self.assertFalse(os.path.exists(os.path.join(self.store, "files", "dry")))

    def test_a_cut_connection_is_resumed(self):
        data = os.urandom(24 * MIB)
        path = os.path.join(self.work, "big.bin")
        write(path, data)
        cut = 8 * MIB
        self.relay.cut_upstream(cut)
        run = client("push", path, "--to", self.url("files/cut/"), "--resumable-from", "1mb")
        self.assertLanded(run, sent=1)
        self.assertEqual(stored(self.store, "cut"), {"big.bin": data})
        self.assertIn("retry", run.stderr)
        # Resumed, not sent again: 24 MiB and what the server had not read
        # when the offset was asked (its socket buffer), not 8 + 24 MiB.
        self.assertLess(self.relay.upstream, len(data) + cut // 2, self.relay.upstream)
        self.assertIn("resumable upload", self.server.log_text())

    def test_retry_after_on_503_and_507(self):
        tree = os.path.join(self.work, "tree")
        write(os.path.join(tree, "a.txt"), os.urandom(64 * KIB))
        write(os.path.join(tree, "b.txt"), os.urandom(64 * KIB))
        self.relay.refuse(503, {"Retry-After": "1"}, 1, "POST", "/checksum")
        self.relay.refuse(507, {"Retry-After": "1"}, 2, "PUT", "/files/")
        started = time.monotonic()
        run = client("push", tree, "--to", self.url("files/retried/"), "-j", "1")
        self.assertLanded(run, sent=2)
        self.assertEqual(self.relay.refused, 3)
        self.assertGreaterEqual(time.monotonic() - started, 2.9, "Retry-After: 1 honored")
        self.assertEqual(len(re.findall(r"retry \d/5 of .* in 1\.0 s: 50[37] refused", run.stderr)), 3,
                         run.stderr)
        self.assertEqual(len(stored(self.store, "retried", "tree")), 2)

    def test_507_without_retry_after_fails_at_once_naming_the_file(self):
        path = os.path.join(self.work, "huge.bin")
        write(path, b"x" * 1000)
        self.relay.refuse(507, {}, 1, "PUT")
        run = client("push", path, "--to", self.url("files/full/"))
        self.assertEqual(run.returncode, 1, run)
        self.assertEqual(run.report["failures"][0]["file"], path)
        self.assertIn("507 refused by the test relay", run.stderr)
        self.assertNotIn("retry", run.stderr)

    def test_a_file_changing_while_pushed_is_reported(self):
        path = os.path.join(self.work, "growing.log")
        original = os.urandom(4 * MIB)
        write(path, original)

        def grow():
            with open(path, "ab") as handle:
                handle.write(b"more")
        self.relay.when_upstream(2 * MIB, grow)
        run = client("push", path, "--to", self.url("files/changing/"))
        self.assertEqual(run.returncode, 1, run)
        self.assertIn("changed while it was pushed", run.report["failures"][0]["error"])
        stored_now = stored(self.store, "changing")
        self.assertIn(stored_now.get("growing.log"), (None, original),
                      "never stored under a wrong digest")

    def test_progress_lines(self):
        path = os.path.join(self.work, "p.bin")
        write(path, os.urandom(64 * KIB))
        master, slave = pty.openpty()
        try:
            completed = subprocess.run(
                [sys.executable, SERVER_SCRIPT, "push", path, "--to", self.url("files/tty/")],
                env=client_environment(), stdout=subprocess.PIPE, stderr=slave,
                stdin=subprocess.DEVNULL, timeout=CLIENT_TIMEOUT)
            os.close(slave)
            slave = None
            shown = b""
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                shown += data
        finally:
            os.close(master)
            if slave is not None:
                os.close(slave)
        self.assertEqual(completed.returncode, 0)
        self.assertIn(b"\r\x1b[K", shown, "a live line on a terminal")
        self.assertIn(b"push: ", shown)
        summary = completed.stdout.decode()
        self.assertRegex(summary, r"^push: 1 file \(64\.0 KiB\): 1 sent, 0 deployed, "
                                  r"0 skipped, 0 failed; 64\.0 KiB sent in \d+\.\d s\n$")


class ProgressTest(unittest.TestCase):
    """The progress lines where no terminal is: at most one every 10 s."""

    def test_a_line_every_ten_seconds_in_logs(self):
        stream = io.StringIO()
        progress = http_bucket.Progress("push", stream, live=False, quiet=False)
        progress.phase("sending", 10, 10 * MIB)
        progress.advance(4 * MIB)
        progress.finish("sent")
        progress.tick()
        self.assertEqual(stream.getvalue(), "", "nothing before 10 s")
        progress.last_logged -= http_bucket.PROGRESS_LOG_EVERY
        progress.phase_started -= 2.0
        progress.tick()
        progress.tick()
        self.assertRegex(stream.getvalue(), r"^push: sending 1/10 files, 4\.0 MiB/10\.0 MiB, "
                                            r"[\d.]+ MiB/s, ETA \d+ s\n$")


class ErrorsTest(ClientCase):

    ENV = {"BUCKET_TOKEN": "server-secret"}

    def test_a_bad_token_fails_with_one_line_and_is_never_printed(self):
        path = os.path.join(self.work, "a.txt")
        write(path, b"a")
        run = client("push", path, "--to", self.url("files/tok/"),
                     env={"BUCKET_TOKEN": "wrong-token-value"}, json_report=False)
        self.assertEqual(run.returncode, 1, run)
        self.assertEqual(run.stderr.count("\n"), 1, run)
        self.assertRegex(run.stderr, r"^http_bucket push: error: 401 a valid token is needed "
                                     r"to write \(check --token-file or BUCKET_TOKEN\)\n$")
        self.assertNotIn("wrong-token-value", run.stdout + run.stderr)
        token_file = os.path.join(self.work, "token")
        write(token_file, b"server-secret\n")
        good = client("push", path, "--to", self.url("files/tok/"), "--token-file", token_file)
        self.assertLanded(good, sent=1)
        self.assertNotIn("server-secret", good.stdout + good.stderr)

    def test_an_unreachable_server_fails_with_one_line(self):
        path = os.path.join(self.work, "a.txt")
        write(path, b"a")
        url = "http://127.0.0.1:%d/files/x/" % free_port()
        run = client("push", path, "--to", url, "--retries", "0", json_report=False)
        self.assertEqual(run.returncode, 1, run)
        self.assertRegex(run.stderr, r"^http_bucket push: error: http://127\.0\.0\.1:\d+/"
                                     r"\S*: Connection refused\n$")
        pulled = client("pull", url, os.path.join(self.work, "out"), "--retries", "0",
                        json_report=False)
        self.assertEqual(pulled.returncode, 1, pulled)
        self.assertEqual(pulled.stderr.count("\n"), 1, pulled)

    def test_usage_errors_exit_2(self):
        for args in (("push", "nothing-here", "--to", self.url("files/x/")),
                     ("push", SERVER_SCRIPT, "--to", "ftp://host/files/"),
                     ("push", SERVER_SCRIPT, "--to", self.url("elsewhere/")),
                     ("push", SERVER_SCRIPT),
                     ("pull", self.url("files/x/")),
                     ("push", SERVER_SCRIPT, "--to", self.url("files/x/"), "--meta", "no-equals"),
                     ("push", SERVER_SCRIPT, "--to", self.url("files/x/"),
                      "--token-file", "/nonexistent")):
            run = client(*args, json_report=False)
            self.assertEqual(run.returncode, 2, (args, run))
            self.assertIn("error", run.stderr)


class PullTest(ClientCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        tree = os.path.join(cls.directory, "source")
        cls.files = make_tree(tree)
        cls.files["big/large.bin"] = os.urandom(12 * MIB)
        write(os.path.join(tree, "big", "large.bin"), cls.files["big/large.bin"])
        run = client("push", tree + "/", "--to", cls.relay.url("files/pull/"))
        assert run.returncode == 0, run

    def test_into_an_empty_folder(self):
        out = os.path.join(self.work, "out")
        run = client("pull", self.url("files/pull/"), out)
        self.assertLanded(run, fetched=len(self.files), skipped=0)
        self.assertEqual(local_files(out), self.files)
        self.assertFalse([name for name in os.listdir(os.path.join(out, "big"))
                          if name.startswith(http_bucket.PART_PREFIX)])

    def test_only_what_is_missing_or_different_is_fetched(self):
        out = os.path.join(self.work, "out")
        write(os.path.join(out, "big", "large.bin"), self.files["big/large.bin"])
        write(os.path.join(out, "logs", "build.log"), b"stale")
        write(os.path.join(out, "mine.txt"), b"left alone")
        run = client("pull", self.url("files/pull/"), out)
        self.assertLanded(run, fetched=len(self.files) - 1, skipped=1)
        self.assertLess(self.relay.downstream, 2 * MIB, "the large file was not fetched")
        self.assertEqual(local_files(out), dict(self.files, **{"mine.txt": b"left alone"}))
        again = client("pull", self.url("files/pull/logs/"), os.path.join(out, "logs"))
        self.assertLanded(again, fetched=0, skipped=2)

    def test_a_cut_download_is_resumed(self):
        out = os.path.join(self.work, "out")
        size = len(self.files["big/large.bin"])
        self.relay.cut_downstream(5 * MIB)
        run = client("pull", self.url("files/pull/big/"), out, "-j", "1")
        self.assertLanded(run, fetched=1)
        self.assertIn("retry", run.stderr)
        self.assertEqual(local_files(out), {"large.bin": self.files["big/large.bin"]})
        self.assertLess(self.relay.downstream, size + 256 * KIB, "resumed, not fetched again")

    def test_a_part_left_by_an_earlier_run_is_resumed(self):
        out = os.path.join(self.work, "out")
        data = self.files["big/large.bin"]
        item = http_bucket.PullItem(["large.bin"], "file", len(data),
                                    hashlib.sha256(data).hexdigest())
        write(http_bucket.part_path(os.path.join(out, "large.bin"), item), data[:8 * MIB])
        run = client("pull", self.url("files/pull/big/"), out)
        self.assertLanded(run, fetched=1, bytes_received=len(data) - 8 * MIB)
        self.assertEqual(local_files(out), {"large.bin": data})

    def test_one_file_and_explode_trees(self):
        out = os.path.join(self.work, "out")
        self.assertLanded(client("pull", self.url("files/pull/logs/build.log"), out), fetched=1)
        self.assertEqual(local_files(out), {"build.log": self.files["logs/build.log"]})
        sha = hashlib.sha256(self.files["reports.zip"]).hexdigest()
        tree = os.path.join(self.work, "tree")
        run = client("pull", self.url("explode/%s/%s/%s/" % (sha[:2], sha[2:4], sha)), tree)
        self.assertLanded(run, fetched=2)
        self.assertEqual(sorted(local_files(tree)), ["junit/a.xml", "junit/b.xml"])

    def test_through_an_http_proxy_and_around_it(self):
        out = os.path.join(self.work, "out")
        with TcpRelay(self.server.port) as proxy:
            target = "http://bucket.invalid:%d/files/pull/logs/" % self.server.port
            run = client("pull", target, out, env={"HTTP_PROXY": proxy.url()})
            self.assertLanded(run, fetched=2)
            self.assertGreater(proxy.connections, 0)
            path = os.path.join(self.work, "p.txt")
            write(path, b"through the proxy")
            pushed = client("push", path, "--to", target.replace("pull/logs", "proxied"),
                            env={"http_proxy": proxy.url()})
            self.assertLanded(pushed, sent=1)
            proxy.reset_counts()
            direct = client("pull", self.server.url("files/pull/logs/"),
                            os.path.join(self.work, "out2"),
                            env={"HTTP_PROXY": proxy.url(), "NO_PROXY": "127.0.0.1"})
            self.assertLanded(direct, fetched=2)
            self.assertEqual(proxy.connections, 0)


@unittest.skipUnless(shutil.which("openssl"), "the openssl command is not installed")
class TLSTest(unittest.TestCase):
    """HTTPS: the server's certificate checked (--cacert), also through a
    CONNECT proxy, and a large file resumed over TLS."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-client-tls-")
        cls.cert = os.path.join(cls.directory, "cert.pem")
        key = os.path.join(cls.directory, "key.pem")
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", key, "-out", cls.cert],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if made.returncode != 0:
            shutil.rmtree(cls.directory, True)
            raise unittest.SkipTest("openssl could not make a certificate: %s"
                                    % made.stdout.decode(errors="replace")[-300:])
        cls.server = ServerProcess(os.path.join(cls.directory, "store"),
                                   ("--fsync", "false", "--certfile", cls.cert, "--keyfile", key)
                                   ).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, True)

    def test_push_and_pull_over_https(self):
        work = tempfile.mkdtemp(prefix="tls-", dir=self.directory)
        data = os.urandom(3 * MIB)
        path = os.path.join(work, "t.bin")
        write(path, data)
        url = self.server.url("files/tls/")
        refused = client("push", path, "--to", url, json_report=False)
        self.assertEqual(refused.returncode, 1, refused)
        self.assertRegex(refused.stderr, r"^http_bucket push: error: TLS: .*--cacert")
        run = client("push", path, "--to", url, "--cacert", self.cert, "--resumable-from", "1mb")
        self.assertEqual((run.returncode, run.report["sent"]), (0, 1), run)
        with TcpRelay(self.server.port) as proxy:
            target = "https://localhost:%d/files/tls/" % self.server.port
            pulled = client("pull", target, os.path.join(work, "out"), "--cacert", self.cert,
                            env={"HTTPS_PROXY": proxy.url()})
            self.assertEqual((pulled.returncode, pulled.report["fetched"]), (0, 1), pulled)
            self.assertGreater(proxy.tunnels, 0, "HTTPS_PROXY was used (CONNECT)")
        self.assertEqual(local_files(os.path.join(work, "out")), {"t.bin": data})


class EvilListing(http.server.BaseHTTPRequestHandler):
    """A server whose listing names paths out of the folder, and a link out."""

    ENTRIES = [{"name": "../escape.txt", "type": "file", "size": 2, "sha256": None},
               {"name": "..", "type": "file", "size": 2, "sha256": None},
               {"name": "link", "type": "symlink", "target": "../../etc/passwd"},
               {"name": "ok.txt", "type": "file", "size": 2,
                "sha256": hashlib.sha256(b"ok").hexdigest()}]

    def do_HEAD(self):
        self.answer(b"")

    def do_GET(self):
        if "format=json" in self.path:
            self.answer(json.dumps({"path": "files/evil/", "entries": self.ENTRIES,
                                    "count": 4, "next": None}).encode())
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("ETag", '"%s"' % hashlib.sha256(b"ok").hexdigest())
            self.end_headers()
            self.wfile.write(b"ok")

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class PullSafetyTest(unittest.TestCase):

    def test_names_that_would_escape_are_refused(self):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EvilListing)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        work = tempfile.mkdtemp(prefix="http_bucket-evil-")
        try:
            out = os.path.join(work, "a", "out")
            run = client("pull", "http://127.0.0.1:%d/files/evil/" % server.server_port, out)
            self.assertEqual(run.returncode, 1, run)
            self.assertEqual(run.report["fetched"], 1)
            self.assertEqual(sorted(f["file"] for f in run.report["failures"]),
                             ["..", "../escape.txt", "link"])
            self.assertTrue(all("refused" in f["error"] for f in run.report["failures"]))
            self.assertEqual(files_under(work, relative=True), [os.path.join("a", "out", "ok.txt")])
        finally:
            server.shutdown()
            server.server_close()
            shutil.rmtree(work, ignore_errors=True)


class PackagingTest(unittest.TestCase):

    def test_pyproject_gives_the_command_at_the_module_version(self):
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "pyproject.toml"), encoding="utf-8") as handle:
            text = handle.read()
        self.assertIn('http-bucket = "http_bucket:main"', text)
        self.assertIn('py-modules = ["http_bucket"]', text)
        # One version, the module's: setuptools reads __version__ without importing it.
        self.assertIn('dynamic = ["version"]', text)
        self.assertIn('version = {attr = "http_bucket.__version__"}', text)

    def test_serve_names_the_server(self):
        help_text = subprocess.run([sys.executable, SERVER_SCRIPT, "serve", "--help"],
                                   capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
        self.assertEqual(help_text.returncode, 0)
        self.assertIn("--directory", help_text.stdout)
        for command in ("push", "pull"):
            own = subprocess.run([sys.executable, SERVER_SCRIPT, command, "--help"],
                                 capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
            self.assertEqual(own.returncode, 0)
            self.assertIn("usage: ", own.stdout)
            self.assertIn("Exit status", own.stdout)


if __name__ == "__main__":
    unittest.main()
