"""Hardening of http_bucket (issue 5): access, TLS, overload, faults, data safety, logs.

Every test drives real server processes (``sys.executable http_bucket.py PORT
-b 127.0.0.1 -d DIR``) on temporary directories, through ``http.client``,
raw sockets (for what well-behaved clients never send) and curl.  Servers are
stopped by PID; every wait is bounded.

Part numbers follow issue 5:

1. access: BUCKET_TOKEN, BUCKET_READ_TOKEN, --token-file, the bind warning
2. TLS: a self-signed certificate made at run time with the openssl command
3. overload: --max-connections, --timeout, 200 slowloris clients, header caps
4. faults: disk full is a real ENOSPC from a 2 MiB tmpfs mounted as
   ARCHIVE_DIR (root only, skipped otherwise; nothing is injected); client
   disconnects; kill -9 mid-upload and mid-expansion, then a restart;
   SIGTERM with an upload in flight
5. data safety: read-only blobs, ``--verify``
7. logging: text and ``--log-format json`` access and "stored" lines

Part 6 (parser fuzzing) is not covered here.
"""

import hashlib
import http.client
import io
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zipfile

from http_bucket_testing import (
    POLL_TIMEOUT, SERVER_SCRIPT, assert_staging_empty, assert_store_consistent, b64,
    clean_environment, files_under, file_part, free_port, multipart_body, read_raw_response,
    reply_of, sha256_file, start_server, wait_until)

MIB = 1024 * 1024
FSYNC_OFF = ("--fsync", "false")  # speed; kill -9 keeps the page cache anyway


# ===========================================================================
# Helpers: raw exchanges, staged sizes, zips
# ===========================================================================


def staged_sizes(directories):
    """Sizes of the files in staging directories (ones vanishing are skipped)."""
    sizes = []
    for directory in directories:
        for name in os.listdir(directory):
            try:
                sizes.append(os.stat(os.path.join(directory, name)).st_size)
            except FileNotFoundError:
                pass
    return sizes


def make_zip(count, salt, size=48):
    """A zip of ``count`` small distinct members in a few directories."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for number in range(count):
            content = ("%s member %d\n" % (salt, number)).encode() * (size // 16)
            archive.writestr("d%02d/f%05d.txt" % (number % 17, number), content)
    return buffer.getvalue()


def read_response(sock, method="GET"):
    """Parse one HTTP response from ``sock``; the caller closes the socket."""
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        return reply_of(response)
    finally:
        response.close()


def raw_exchange(port, head, body_pieces=(), timeout=20.0, method="PUT"):
    """Send ``head`` and body pieces on a fresh socket, then read the answer.

    Like curl, stops sending once the server has started to answer (a
    refusal before the whole body), and ignores a send the server cut off.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(head)
            for piece in body_pieces:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(sock, method)
    finally:
        sock.close()


def closed_within(sock, timeout):
    """Seconds until the peer closed ``sock`` (EOF or reset), or None.

    Data the server sends first (an error response) is read and ignored.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return None
        except OSError:  # reset
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started


class HardeningCase(unittest.TestCase):
    """Temporary directories and servers cleaned up after each test."""

    def make_dir(self):
        directory = tempfile.mkdtemp(prefix="http_bucket-hardening-")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    def start_server(self, directory=None, *args, **options):
        """A started server (--fsync false), stopped after the test."""
        server = start_server(directory or self.make_dir(), *FSYNC_OFF, *args, **options)
        self.addCleanup(server.stop)
        return server

    def assertChallenges(self, response):
        """A 401's challenges: one per line, Bearer then Basic (browsers
        ignore a Basic challenge that follows Bearer on the same line)."""
        challenges = response.headers.get_all("WWW-Authenticate")
        self.assertEqual([value.split()[0] for value in challenges], ["Bearer", "Basic"])
        self.assertTrue(all('realm="http_bucket"' in value for value in challenges), challenges)

    def assertRefusal(self, response, status, fragment):
        """Status and JSON error {"code", "status": "error", "error"} of a refusal."""
        self.assertEqual(response.status, status, response.body[:400])
        payload = json.loads(response.body)
        self.assertEqual(payload["code"], status)
        self.assertEqual(payload["status"], "error")
        self.assertIn(fragment, payload["error"])
        return payload

    def assertOnlyFreshStaging(self, server):
        """After a restart: the dead processes' staging is gone, ours is empty."""
        root = os.path.join(server.directory, "staging")
        ours = server.staging_dirs()
        self.assertEqual(sorted(os.listdir(root)), sorted(os.path.basename(d) for d in ours))
        for directory in ours:
            self.assertEqual(os.listdir(directory), [])

    def assertIndexed(self, server, blobs):
        """Every blob answers HEAD by md5, which needs its index record."""
        connection = server.connection()
        try:
            for path in blobs.values():
                with open(path, "rb") as handle:
                    content = handle.read()
                digest = hashlib.md5(content).hexdigest()
                connection.request("HEAD", "/checksum/" + digest)
                response = connection.getresponse()
                response.read()
                self.assertEqual(response.status, 200, "%s (%s)" % (digest, path))
        finally:
            connection.close()


# ===========================================================================
# 1. Access
# ===========================================================================


def bearer(token):
    return {"Authorization": "Bearer " + token}


def basic(token, user="ci"):
    return {"Authorization": "Basic " + b64(("%s:%s" % (user, token)).encode())}


class WriteTokenTests(HardeningCase):
    """BUCKET_TOKEN protects POST, PUT and DELETE; reads stay open."""

    TOKEN = "write-" + secrets.token_hex(16)
    WRONG = "wrong-" + secrets.token_hex(16)

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-hardening-")
        cls.server = start_server(cls.directory, *FSYNC_OFF, env={"BUCKET_TOKEN": cls.TOKEN})

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, True)

    def assertUnauthorized(self, response, what="write"):
        self.assertRefusal(response, 401, "a valid token is needed to " + what)
        self.assertChallenges(response)

    def test_writes_without_a_valid_token_are_refused(self):
        content = os.urandom(1000)
        body, content_type = multipart_body([file_part("denied.bin", content)])
        attempts = [
            ("PUT", "/upload/denied.bin", content, {}),
            ("PUT", "/files/denied/name", content, {}),
            ("POST", "/upload", body, {"Content-Type": content_type}),
            ("POST", "/files/denied/", body, {"Content-Type": content_type}),
            ("DELETE", "/files/denied/name", None, {}),
            ("DELETE", "/checksum/" + hashlib.sha256(content).hexdigest(), None, {}),
            ("PUT", "/upload/denied.bin", content, bearer(self.WRONG)),
            ("PUT", "/upload/denied.bin", content, bearer("")),
            ("PUT", "/upload/denied.bin", content, bearer(self.TOKEN[:-1])),
            ("PUT", "/upload/denied.bin", content, bearer(self.TOKEN + "x")),
            ("PUT", "/upload/denied.bin", content, basic(self.WRONG)),
            ("PUT", "/upload/denied.bin", content, basic("", user=self.TOKEN)),
            ("PUT", "/upload/denied.bin", content, {"Authorization": self.TOKEN}),
            ("PUT", "/upload/denied.bin", content, {"Authorization": "Basic !!notbase64"}),
            ("PUT", "/upload/denied.bin", content, {"Authorization": "Token " + self.TOKEN}),
        ]
        for method, path, data, headers in attempts:
            with self.subTest(method=method, path=path, headers=headers):
                self.assertUnauthorized(self.server.request(method, path, data, headers))
        sha256 = hashlib.sha256(content).hexdigest()
        self.assertFalse(os.path.exists(os.path.join(
            self.directory, "blob", sha256[:2], sha256[2:4], sha256)))
        self.assertFalse(os.path.exists(os.path.join(self.directory, "files", "denied")))
        self.assertEqual(self.server.request(
            "HEAD", "/checksum/" + hashlib.md5(content).hexdigest()).status, 404)

    def test_refused_before_the_body_is_read(self):
        # 1 GiB announced, nothing sent: the 401 must not wait for the body.
        head = (b"PUT /upload/huge.bin HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                % (1 << 30))
        started = time.monotonic()
        response = raw_exchange(self.server.port, head, timeout=10)
        self.assertUnauthorized(response)
        self.assertLess(time.monotonic() - started, 5)

    def test_bearer_and_basic_with_the_token_write(self):
        for number, headers in enumerate([bearer(self.TOKEN), basic(self.TOKEN),
                                          basic(self.TOKEN, user=""),
                                          {"Authorization": "bearer " + self.TOKEN}]):
            content = os.urandom(700)
            with self.subTest(headers=headers):
                response = self.server.request("PUT", "/files/ok/%d.bin" % number, content,
                                               headers)
                self.assertEqual(response.status, 201, response.body)
                response = self.server.request("GET", "/files/ok/%d.bin" % number)
                self.assertEqual((response.status, response.body), (200, content))
        response = self.server.request("DELETE", "/files/ok/0.bin", headers=bearer(self.TOKEN))
        self.assertEqual(response.status, 200, response.body)

    def test_reads_stay_open_without_a_read_token(self):
        content = os.urandom(900)
        self.assertEqual(self.server.request(
            "PUT", "/upload/open.bin", content, bearer(self.TOKEN)).status, 201)
        sha256 = hashlib.sha256(content).hexdigest()
        for method, path in [("HEAD", "/checksum/" + sha256), ("GET", "/checksum/" + sha256),
                             ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/config"),
                             ("GET", "/files/?format=json"), ("GET", "/")]:
            with self.subTest(path=path):
                self.assertEqual(self.server.request(method, path).status, 200)

    def test_config_and_log_never_show_the_token(self):
        self.server.request("PUT", "/upload/x", b"x", bearer(self.WRONG))
        self.server.request("PUT", "/upload/y", b"y", basic(self.TOKEN))
        self.server.request("PUT", "/upload/z", b"z", bearer(self.TOKEN))
        tag = secrets.token_hex(6)
        response = self.server.request("GET", "/config?tag=" + tag)
        self.assertEqual(response.status, 200)
        self.assertNotIn(self.TOKEN, response.body.decode())
        self.assertNotIn(self.TOKEN[6:], response.body.decode())
        config = json.loads(response.body)
        self.assertTrue(config["token"])  # says that one is set, never which
        # The access line follows the response: wait for the last one.
        # Each access line is written after its response: the one of
        # /upload/z may follow the one of /config.
        log = wait_until(lambda: tag in self.server.log_text()
                         and "/upload/z" in self.server.log_text() and self.server.log_text(),
                         POLL_TIMEOUT, what="the access lines of /upload/z and /config?tag=" + tag)
        self.assertIn("/upload/z", log)  # the log was written at all
        for secret in (self.TOKEN, self.TOKEN[6:], self.WRONG,
                       basic(self.TOKEN)["Authorization"][6:]):
            self.assertNotIn(secret, log)


class ReadTokenTests(HardeningCase):
    """BUCKET_READ_TOKEN protects reads; the write token comes from a file."""

    WRITE = "filewrite-" + secrets.token_hex(16)
    READ = "read-" + secrets.token_hex(16)

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-hardening-")
        cls.token_file = cls.directory + ".token"  # outside ARCHIVE_DIR
        with open(cls.token_file, "w") as handle:
            handle.write(cls.WRITE + "\n")
        os.chmod(cls.token_file, 0o600)
        cls.server = start_server(cls.directory, *FSYNC_OFF, "--token-file", cls.token_file,
                                  env={"BUCKET_READ_TOKEN": cls.READ})

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, True)
        os.unlink(cls.token_file)

    def test_token_file_gives_the_write_token(self):
        content = os.urandom(800)
        response = self.server.request("PUT", "/upload/file-token.bin", content, bearer(self.WRITE))
        self.assertEqual(response.status, 201, response.body)
        for headers in ({}, bearer(self.READ), bearer("wrong")):
            with self.subTest(headers=headers):
                response = self.server.request("PUT", "/upload/file-token.bin", content, headers)
                self.assertRefusal(response, 401, "a valid token is needed to write")
                self.assertChallenges(response)

    def test_reads_need_the_read_or_write_token(self):
        content = os.urandom(600)
        self.assertEqual(self.server.request(
            "PUT", "/upload/read.bin", content, bearer(self.WRITE)).status, 201)
        md5 = hashlib.md5(content).hexdigest()
        for method, path in [("GET", "/checksum/" + md5), ("GET", "/metrics"),
                             ("GET", "/config"), ("GET", "/files/?format=json")]:
            with self.subTest(path=path):
                for headers in ({}, bearer("wrong"), basic("wrong")):
                    response = self.server.request(method, path, headers=headers)
                    self.assertRefusal(response, 401, "a valid token is needed to read")
                    self.assertChallenges(response)
                for headers in (bearer(self.READ), basic(self.READ), bearer(self.WRITE)):
                    self.assertEqual(self.server.request(method, path, headers=headers).status,
                                     200, headers)
        response = self.server.request("HEAD", "/checksum/" + md5)
        self.assertEqual(response.status, 401)
        self.assertChallenges(response)
        self.assertEqual(self.server.request("HEAD", "/checksum/" + md5,
                                             headers=bearer(self.READ)).status, 200)
        self.assertEqual(self.server.request("GET", "/checksum/" + md5,
                                             headers=bearer(self.READ)).body, content)

    def test_unusable_token_file_stops_startup(self):
        empty = self.directory + ".empty-token"
        open(empty, "w").close()
        self.addCleanup(os.unlink, empty)
        for path, fragment in ((self.directory + ".missing-token", "cannot read"),
                               (empty, "holds no token")):
            with self.subTest(fragment=fragment):
                done = subprocess.run([sys.executable, SERVER_SCRIPT, str(free_port()),
                                       "-b", "127.0.0.1", "-d", self.directory,
                                       "--token-file", path], env=clean_environment(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(fragment, done.stderr.decode())
                self.assertIn("token_file", done.stderr.decode())

    def test_healthz_stays_open(self):
        response = self.server.request("GET", "/healthz")
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.body)["status"], "ok")

    def test_no_token_in_config_or_log(self):
        self.server.request("GET", "/metrics", headers=bearer(self.READ))
        self.server.request("GET", "/metrics", headers=basic(self.WRITE))
        tag = secrets.token_hex(6)
        response = self.server.request("GET", "/config?tag=" + tag, headers=bearer(self.READ))
        self.assertEqual(response.status, 200)
        for secret in (self.WRITE, self.READ):
            self.assertNotIn(secret, response.body.decode())
        # Each access line is written after its response: the one of
        # /metrics may follow the one of /config.
        log = wait_until(lambda: tag in self.server.log_text()
                         and "/metrics" in self.server.log_text() and self.server.log_text(),
                         POLL_TIMEOUT, what="the access lines of /metrics and /config?tag=" + tag)
        self.assertIn("/metrics", log)
        for secret in (self.WRITE, self.READ, basic(self.WRITE)["Authorization"][6:]):
            self.assertNotIn(secret, log)


class BindWarningTests(HardeningCase):
    """A warning at startup when listening beyond loopback without a write token."""

    WARNING = re.compile(r"warning.*BUCKET_TOKEN", re.I)

    def test_warns_on_all_interfaces_without_a_token(self):
        # Bound to 0.0.0.0 briefly; only 127.0.0.1 ever connects.
        server = self.start_server(None, bind="0.0.0.0")
        self.assertEqual(server.request("GET", "/healthz").status, 200)
        self.assertRegex(server.log_text(), self.WARNING)

    def test_no_warning_with_a_token_or_on_loopback(self):
        guarded = self.start_server(None, bind="0.0.0.0",
                                    env={"BUCKET_TOKEN": secrets.token_hex(8)})
        loopback = self.start_server(None)
        for server in (guarded, loopback):
            self.assertIn("serving on", server.log_text())
            self.assertNotRegex(server.log_text(), self.WARNING)


# ===========================================================================
# 2. TLS
# ===========================================================================


@unittest.skipUnless(shutil.which("openssl"), "the openssl command is not installed")
class TLSTests(HardeningCase):
    """--certfile/--keyfile with a self-signed certificate made here."""

    @classmethod
    def setUpClass(cls):
        cls.tls_dir = tempfile.mkdtemp(prefix="http_bucket-tls-")
        cls.cert = os.path.join(cls.tls_dir, "cert.pem")
        cls.key = os.path.join(cls.tls_dir, "key.pem")
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", cls.key, "-out", cls.cert],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if made.returncode != 0:
            shutil.rmtree(cls.tls_dir, True)
            raise unittest.SkipTest("openssl could not make a certificate: %s"
                                    % made.stdout.decode(errors="replace")[-300:])
        cls.context = ssl.create_default_context(cafile=cls.cert)
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-hardening-")
        # --timeout 5: a response shorter than its Content-Length fails in 5 s, not 30.
        cls.server = start_server(cls.directory, *FSYNC_OFF, "--certfile", cls.cert,
                                  "--keyfile", cls.key, "--timeout", "5", context=cls.context)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, True)
        shutil.rmtree(cls.tls_dir, True)

    def test_upload_and_lookup_over_https(self):
        content = os.urandom(300 * 1024)
        response = self.server.request("PUT", "/upload/tls.bin", content)
        self.assertEqual(response.status, 201, response.body)
        sha256 = hashlib.sha256(content).hexdigest()
        self.assertEqual(json.loads(response.body)["files"][0]["checksums"]["sha256"], sha256)
        self.assertEqual(self.server.request("HEAD", "/checksum/" + sha256).status, 200)
        response = self.server.request("GET", "/checksum/" + hashlib.md5(content).hexdigest())
        self.assertEqual((response.status, response.body), (200, content))
        self.assertIn("https://127.0.0.1:%d/" % self.server.port, self.server.log_text())

    def test_untrusting_client_and_plain_http_are_turned_away(self):
        untrusting = http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, timeout=10, context=ssl.create_default_context())
        with self.assertRaises(ssl.SSLError):
            untrusting.request("GET", "/healthz")
        untrusting.close()
        # Plain HTTP to the TLS port: a short plain-text 400 saying so (as
        # nginx answers), then the connection is closed.
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as plain:
            plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = b""
            while True:
                data = plain.recv(65536)
                if not data:
                    break
                answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b"Content-Type: text/plain", head)
        self.assertIn(b"this port speaks HTTPS; use https://127.0.0.1:%d/" % self.server.port,
                      body)
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed")
    def test_curl_with_cacert_and_insecure(self):
        content = os.urandom(5000)
        path = os.path.join(self.tls_dir, "curl-upload.bin")
        with open(path, "wb") as handle:
            handle.write(content)
        base = "https://127.0.0.1:%d" % self.server.port
        done = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", self.cert,
                               "-T", path, base + "/upload/"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        stored = json.loads(done.stdout)
        self.assertEqual(stored["code"], 201)
        self.assertEqual(stored["files"][0]["checksums"]["sha256"],
                         hashlib.sha256(content).hexdigest())
        md5 = hashlib.md5(content).hexdigest()
        for flags in (["-k"], ["--cacert", self.cert]):
            done = subprocess.run(["curl", "-sS", "-f", "-I", "--max-time", "20"] + flags
                                  + [base + "/checksum/" + md5],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn(b" 200", done.stdout.split(b"\r\n", 1)[0])
        done = subprocess.run(["curl", "-sS", "--max-time", "20", base + "/healthz"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertNotEqual(done.returncode, 0)  # no trust without --cacert or -k


# ===========================================================================
# 3. Overload
# ===========================================================================


def metric(server, name, headers=None):
    response = server.request("GET", "/metrics", headers=headers)
    for line in response.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError("no metric %s in %s" % (name, response.body[:500]))


class MaxConnectionsTests(HardeningCase):
    WORKERS = ()  # the cap counts every worker's connections (SharedCounters)

    def test_sixth_connection_gets_503_then_service_resumes(self):
        server = self.start_server(None, "--max-connections", "5", *self.WORKERS)
        # Only the /metrics request itself may be counted before we start.
        wait_until(lambda: metric(server, "http_bucket_connections") == 1, 10,
                   what="http_bucket_connections 1")
        idle = [self.held_connection(server) for _ in range(5)]
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sixth:
                response = read_response(sixth)
            self.assertRefusal(response, 503, "too many connections")
            self.assertGreaterEqual(int(response.headers.get("Retry-After", "0")), 1)
            # The five held connections are served, not dropped.
            idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            self.assertEqual(read_response(idle[0]).status, 200)
        finally:
            for sock in idle:
                sock.close()

        def served():
            try:
                return server.request("GET", "/healthz", timeout=5).status == 200
            except (OSError, http.client.HTTPException):
                return False

        wait_until(served, 10, 0.1, what="service after the connections closed")

        def refused_count():
            try:
                return metric(server, "http_bucket_refused_connections_total")
            except AssertionError:  # a 503: closed connections' threads still ending
                return None
        refused = wait_until(lambda: refused_count() or None, 10, 0.1,
                             what="/metrics counting the refused connection")
        self.assertGreaterEqual(refused, 1)


    @staticmethod
    def held_connection(server):
        """A keep-alive connection the server took (answered 200 on it).
        One refused because the /metrics connection before it was not yet
        counted out (it is, as its thread ends) is opened again."""
        def accepted():
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            if read_response(sock).status == 200:
                return sock
            sock.close()
            return None
        return wait_until(accepted, 10, 0.05, what="a connection under the cap")


class EarlyAnswerTests(HardeningCase):
    """An answer sent before the body was read reaches a client still sending."""

    def test_a_413_before_the_body_is_read_by_a_client_still_sending(self):
        server = self.start_server(None, "--max-content-length", "1mb")
        body = os.urandom(8 * 1024 * 1024)  # more than the socket buffers hold
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"PUT /upload/big.bin HTTP/1.1\r\nHost: t\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            sock.sendall(body)  # a reset would end this (the server closed unread)
            reply = read_raw_response(sock.makefile("rb"))
        self.assertRefusal(reply, 413, "MAX_CONTENT_LENGTH")
        self.assertEqual(server.request("GET", "/healthz").status, 200)


class MaxConnectionsWorkersTests(MaxConnectionsTests):
    WORKERS = ("--workers", "2")


class TimeoutTests(HardeningCase):
    """--timeout 1: idle and stalled connections are closed; header caps."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-hardening-")
        cls.server = start_server(cls.directory, *FSYNC_OFF, "--timeout", "1")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, True)

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def assertClosedSoon(self, sock, what):
        seconds = closed_within(sock, 8)
        print("\n  %s: closed by the server after %s s" % (
            what, "%.2f" % seconds if seconds is not None else "> 8"), file=sys.stderr)
        self.assertIsNotNone(seconds, "%s still open after 8 s (--timeout 1)" % what)

    def test_idle_connection_is_closed(self):
        self.assertClosedSoon(self.connect(), "idle connection")

    def test_idle_keep_alive_connection_is_closed(self):
        sock = self.connect()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        self.assertEqual(response.status, 200)
        response.read()
        self.assertClosedSoon(sock, "idle keep-alive connection")

    def test_stalled_request_head_is_closed(self):
        sock = self.connect()
        sock.sendall(b"PUT /upload/stall HTTP/1.1\r\nHost: t\r\nX-Half: ")
        self.assertClosedSoon(sock, "stalled request head")

    def test_stalled_body_is_closed_and_leaves_nothing(self):
        sock = self.connect()
        sock.sendall(b"PUT /upload/stalled.bin HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                     % MIB + os.urandom(64 * 1024))
        self.assertClosedSoon(sock, "stalled body")
        assert_staging_empty(self.server.directory)
        self.assertEqual(files_under(os.path.join(self.directory, "blob")), [])

    def test_slow_body_drip_is_dropped(self):
        # Two body bytes a second pass every per-read timeout; a client that
        # never finishes must still lose its connection slot at some point.
        sock = self.connect()
        sock.sendall(b"PUT /upload/drip.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        sock.setblocking(False)
        started = time.monotonic()
        closed = None
        while closed is None and time.monotonic() - started < 10:
            try:
                if sock.recv(4096) == b"":
                    closed = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = time.monotonic() - started
                break
            try:
                sock.send(b"a")
            except OSError:
                closed = time.monotonic() - started
                break
            time.sleep(0.5)
        print("\n  body dripped at 2 bytes/s: %s" % (
            "closed after %.2f s" % closed if closed is not None else "still open after 10 s"),
            file=sys.stderr)
        self.assertIsNotNone(closed, "a body dripped at 2 bytes/s holds its connection "
                             "(and a --max-connections slot) indefinitely with --timeout 1")
        assert_staging_empty(self.server.directory)

    def test_request_framing_abuse_is_refused(self):
        cases = [
            (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400, "Content-Length"),
            (b"Content-Length: 5\r\nContent-Length: 5\r\n", 400, "Content-Length"),
            (b"Content-Length: -1\r\n", 400, "bad Content-Length"),
            (b"Content-Length: 0x10\r\n", 400, "bad Content-Length"),
            (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400,
             "both Transfer-Encoding and Content-Length"),
            (b"Transfer-Encoding: gzip, chunked\r\n", 400, "unsupported Transfer-Encoding"),
            (b"Content-Length: %d\r\n" % (17 << 30), 413, "MAX_CONTENT_LENGTH"),
            (b"Content-Length: 99999999999999999999999999\r\n", 413, "MAX_CONTENT_LENGTH"),
            (b"Expect: 200-ok\r\nContent-Length: 5\r\n", 417, "Expect"),
            (b"", 411, "Content-Length"),
        ]
        for headers, status, fragment in cases:
            with self.subTest(headers=headers):
                response = raw_exchange(self.server.port, b"PUT /upload/framing.bin HTTP/1.1\r\n"
                                        b"Host: t\r\n" + headers + b"\r\n", timeout=10)
                self.assertRefusal(response, status, fragment)
        chunked = b"PUT /upload/chunked.bin HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        for body, fragment in [(b"zz\r\nabc\r\n0\r\n\r\n", "bad chunk size"),
                               (b"3;" + b"x" * 2000 + b"\r\nabc\r\n0\r\n\r\n", "chunk-size line"),
                               (b"3\r\nabcXY0\r\n\r\n", "CRLF")]:
            with self.subTest(body=body[:20]):
                self.assertRefusal(raw_exchange(self.server.port, chunked, [body], timeout=10),
                                   400, fragment)
        assert_staging_empty(self.server.directory)
        self.assertEqual(files_under(os.path.join(self.directory, "blob")), [])

    def head_exchange(self, head):
        return raw_exchange(self.server.port, head, timeout=10, method="GET")

    def test_header_count_cap(self):
        lines = b"".join(b"X-Many-%d: v\r\n" % number for number in range(99))
        response = self.head_exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + lines + b"\r\n")
        self.assertEqual(response.status, 200)  # 100 header lines: allowed
        lines += b"X-Many-99: v\r\n"
        response = self.head_exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + lines + b"\r\n")
        self.assertRefusal(response, 431, "more than 100 header lines")
        many = b"".join(b"X-Flood: %d\r\n" % number for number in range(5000))
        response = self.head_exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
        self.assertRefusal(response, 431, "more than 100 header lines")
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)

    def test_header_line_cap(self):
        ok = b"X-Long: " + b"a" * (8192 - 10) + b"\r\n"  # 8192 bytes with CRLF
        response = self.head_exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + ok + b"\r\n")
        self.assertEqual(response.status, 200)
        for size in (8193 - 10, 64 * 1024, 1024 * 1024):
            line = b"X-Long: " + b"a" * size + b"\r\n"
            with self.subTest(size=len(line)):
                response = self.head_exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\n"
                                              + line + b"\r\n")
                self.assertRefusal(response, 431, "header line over 8192 bytes")
        response = self.head_exchange(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertRefusal(response, 414, "request line over 8192 bytes")
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)


class SlowlorisTests(HardeningCase):
    """200 clients sending their headers a byte every 0.5 s (--timeout 2)."""

    CLIENTS = 200
    INTERVAL = 0.5
    TIMEOUT = 2

    def test_normal_upload_succeeds_and_slow_clients_are_dropped(self):
        server = self.start_server(None, "--timeout", str(self.TIMEOUT))
        slow = []  # [socket, opened at, dropped at]
        for number in range(self.CLIENTS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(b"PUT /upload/slow-%d HTTP/1.1\r\nHost: t\r\nX-Slow: " % number)
            sock.setblocking(False)
            slow.append([sock, time.monotonic(), None])
        stop = threading.Event()

        def drip():
            """A byte per connection every INTERVAL; notes when each is dropped."""
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                for entry in slow:
                    if entry[2] is not None:
                        continue
                    try:
                        if entry[0].recv(4096) == b"":
                            entry[2] = time.monotonic()
                            continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        entry[2] = time.monotonic()
                        continue
                    try:
                        entry[0].send(b"a")
                    except BlockingIOError:
                        pass
                    except OSError:
                        entry[2] = time.monotonic()
                if all(entry[2] is not None for entry in slow):
                    return
                stop.wait(self.INTERVAL)

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        self.addCleanup(stop.set)
        time.sleep(self.INTERVAL * 2)  # the slow clients are dripping now
        content = os.urandom(MIB)
        started = time.monotonic()
        response = server.request("PUT", "/upload/normal.bin", content, timeout=30)
        upload_seconds = time.monotonic() - started
        lookup = server.request("HEAD", "/checksum/" + hashlib.md5(content).hexdigest())
        print("\n  normal 1 MiB upload beside %d slow clients: %.2f s"
              % (self.CLIENTS, upload_seconds), file=sys.stderr)
        self.assertEqual(response.status, 201, response.body)
        self.assertEqual(lookup.status, 200)
        self.assertLess(upload_seconds, 10)
        dripper.join(self.TIMEOUT * 3 + 15)
        stop.set()
        dropped = [entry[2] - entry[1] for entry in slow if entry[2] is not None]
        if dropped:
            print("  slow clients dropped: %d of %d, after %.2f s to %.2f s (--timeout %d)"
                  % (len(dropped), self.CLIENTS, min(dropped), max(dropped), self.TIMEOUT),
                  file=sys.stderr)
        self.assertEqual(len(dropped), self.CLIENTS, "slow clients still connected")
        self.assertLess(max(dropped), self.TIMEOUT * 3 + 3)
        self.assertEqual(server.request("GET", "/healthz").status, 200)
        wait_until(lambda: metric(server, "http_bucket_connections") <= 2, 10,
                   what="http_bucket_connections <= 2")


# ===========================================================================
# 4. Faults
# ===========================================================================


def tmpfs_or_skip(test, size="2m"):
    """A fresh tmpfs of ``size`` (unmounted at cleanup), or skip the test."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        test.skipTest("mounting a tmpfs needs root")
    directory = tempfile.mkdtemp(prefix="http_bucket-tmpfs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", directory],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    if mounted.returncode != 0:
        os.rmdir(directory)
        test.skipTest("cannot mount a tmpfs: %s" % mounted.stdout.decode(errors="replace"))

    def unmount():
        if subprocess.run(["umount", directory], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", directory], timeout=30)
        os.rmdir(directory)

    test.addCleanup(unmount)
    return directory


class DiskFullTests(HardeningCase):
    """ARCHIVE_DIR on a 2 MiB tmpfs: uploads past it answer 507, keep nothing."""

    def test_disk_full_answers_507_and_keeps_nothing(self):
        directory = tmpfs_or_skip(self)
        server = self.start_server(directory)
        content = os.urandom(3 * MIB)
        pieces = [content[start:start + 64 * 1024] for start in range(0, len(content), 64 * 1024)]
        body, content_type = multipart_body([file_part("full.bin", content)])
        attempts = [
            ("PUT /upload/full.bin", b"Content-Length: %d\r\n" % len(content), pieces),
            ("PUT /files/full/name.bin", b"Content-Length: %d\r\n" % len(content), pieces),
            ("PUT /upload/chunked.bin", b"Transfer-Encoding: chunked\r\n",
             [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces] + [b"0\r\n\r\n"]),
            ("POST /upload", b"Content-Type: %s\r\nContent-Length: %d\r\n"
             % (content_type.encode(), len(body)),
             [body[start:start + 64 * 1024] for start in range(0, len(body), 64 * 1024)]),
        ]
        for request_line, headers, data in attempts:
            with self.subTest(request=request_line):
                head = request_line.encode() + b" HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n"
                response = raw_exchange(server.port, head, data, timeout=30)
                self.assertRefusal(response, 507, "not enough disk space")
                assert_staging_empty(server.directory)
                self.assertEqual(files_under(os.path.join(directory, "blob")), [])
                self.assertEqual(files_under(os.path.join(directory, "files")), [])
        for digest in (hashlib.md5(content).hexdigest(), hashlib.sha256(content).hexdigest()):
            self.assertEqual(server.request("HEAD", "/checksum/" + digest).status, 404)
        # Still serving, and the space the refused uploads took is back.
        small = os.urandom(200 * 1024)
        self.assertEqual(server.request("GET", "/healthz").status, 200)
        self.assertEqual(server.request("PUT", "/upload/small.bin", small).status, 201)
        self.assertEqual(server.request("PUT", "/upload/small2.bin", os.urandom(MIB)).status, 201)

    def test_disk_full_during_archive_expansion(self):
        directory = tmpfs_or_skip(self)
        server = self.start_server(directory)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for number in range(12):
                archive.writestr("member-%02d.bin" % number, os.urandom(100 * 1024))
        response = server.request("PUT", "/upload/fills.zip", buffer.getvalue())
        self.assertRefusal(response, 507, "not enough disk space")
        assert_staging_empty(server.directory)
        self.assertEqual(files_under(os.path.join(directory, "explode")), [])
        blobs = assert_store_consistent(directory).blobs
        self.assertLessEqual(len(blobs), 1, "member blobs left behind: %s" % sorted(blobs))
        self.assertEqual(server.request("GET", "/healthz").status, 200)


class DisconnectTests(HardeningCase):
    """A client that goes away at any point leaves nothing behind."""

    def test_disconnects_leave_nothing(self):
        server = self.start_server()
        content = os.urandom(4 * MIB)
        body, content_type = multipart_body([file_part("gone.bin", content)])
        zipped = make_zip(50, "disconnect")
        cases = [
            ("raw PUT", b"PUT /upload/gone.bin HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
             % len(content), content[:MIB + 123]),
            ("PUT to files/", b"PUT /files/gone/name.bin HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
             % len(content), content[:2 * MIB]),
            ("multipart", b"POST /upload HTTP/1.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
             % (content_type.encode(), len(body)), body[:MIB + 500]),
            ("multipart before the closing boundary",
             b"POST /files/gone/ HTTP/1.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
             % (content_type.encode(), len(body)), body[:-10]),
            ("chunked mid-chunk", b"PUT /upload/chunks.bin HTTP/1.1\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n", b"100000\r\n" + content[:MIB] + b"\r\n"
             + b"100000\r\n" + content[:300000]),
            ("zip one byte short", b"PUT /upload/gone.zip HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
             % len(zipped), zipped[:-1]),
            ("inside the headers", b"PUT /upload/head.bin HTTP/1.1\r\nContent-Len", b""),
        ]
        staging = server.staging_dirs()
        for what, head, sent in cases:
            with self.subTest(what):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sock.sendall(head + sent)
                if len(sent) > MIB:  # the upload is on its way to disk
                    wait_until(lambda: any(size > 0 for size in staged_sizes(staging)), 10,
                               what="a staged file with data")
                sock.close()
                assert_staging_empty(server.directory)
        self.assertEqual(files_under(os.path.join(server.directory, "blob")), [])
        self.assertEqual(files_under(os.path.join(server.directory, "files")), [])
        self.assertEqual(files_under(os.path.join(server.directory, "explode")), [])
        self.assertEqual(server.request("GET", "/healthz").status, 200)


class CrashTests(HardeningCase):
    """kill -9 mid-upload and mid-expansion; a restart finds a consistent store."""

    WORKERS = ()  # CrashWorkersTests: the same with --workers 2

    def start_server(self, directory=None, *args, **options):
        return super().start_server(directory, *(self.WORKERS + args), **options)

    def store_some(self, server):
        """Complete uploads that must survive: {sha256: content}."""
        kept = {}
        for number in range(3):
            content = os.urandom(20000 + number)
            self.assertEqual(server.request("PUT", "/upload/kept-%d.bin" % number, content).status, 201)
            kept[hashlib.sha256(content).hexdigest()] = content
        content = os.urandom(30000)
        self.assertEqual(server.request("PUT", "/files/kept/named.bin", content).status, 201)
        kept[hashlib.sha256(content).hexdigest()] = content
        zipped = make_zip(20, "kept-" + secrets.token_hex(4))
        self.assertEqual(server.request("PUT", "/upload/kept.zip", zipped).status, 201)
        kept[hashlib.sha256(zipped).hexdigest()] = zipped
        return kept

    def check_restart(self, directory, kept):
        # Startup reclaims what the killed process left unnamed, in the
        # background: look at the store once that is done.
        server = self.start_server(directory, reconciled=True)
        self.assertOnlyFreshStaging(server)
        blobs = assert_store_consistent(directory).blobs
        for sha256, content in kept.items():
            self.assertIn(sha256, blobs)
            for digest in (sha256, hashlib.sha512(content).hexdigest()):
                self.assertEqual(server.request("HEAD", "/checksum/" + digest).status, 200)
        self.assertIndexed(server, blobs)
        for tree in self.explode_trees(directory):
            self.assertIn(len(files_under(tree)), (20, 3000), "partial tree %s" % tree)
        return server, blobs

    @staticmethod
    def explode_trees(directory):
        root = os.path.join(directory, "explode")
        return [os.path.join(root, a, b, key) for a in os.listdir(root)
                for b in os.listdir(os.path.join(root, a))
                for key in os.listdir(os.path.join(root, a, b))]

    def test_kill_during_streaming_uploads(self):
        directory = self.make_dir()
        server = self.start_server(directory)
        kept = self.store_some(server)
        block = os.urandom(MIB)
        empty, content_type = multipart_body([file_part("inflight.bin", b"")])
        part_head, _, rest = empty.partition(b"\r\n--")
        part_tail = b"\r\n--" + rest
        heads = [
            b"PUT /upload/big.bin HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (200 * MIB),
            b"PUT /files/inflight/name.bin HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (200 * MIB),
            b"POST /files/inflight/ HTTP/1.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (content_type.encode(), len(part_head) + 200 * MIB + len(part_tail)) + part_head,
            b"PUT /upload/chunked.bin HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]
        socks = []
        for head in heads:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            self.addCleanup(sock.close)
            sock.sendall(head)
            socks.append(sock)
        staging = server.staging_dirs()
        for round_number in range(6):  # "slowly": a MiB per upload per round
            for number, sock in enumerate(socks):
                if number == 3:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                else:
                    sock.sendall(block)
            time.sleep(0.05)
        wait_until(lambda: len([size for size in staged_sizes(staging) if size >= MIB]) >= 3,
                   10, what="three uploads with a MiB staged")
        server.kill()
        self.assertNotEqual(staged_sizes(staging), [], "nothing was in flight")
        restarted, blobs = self.check_restart(directory, kept)
        self.assertEqual(files_under(os.path.join(directory, "files", "inflight")), [])
        self.assertEqual(len(blobs), len(kept) + 20, sorted(blobs))  # + the kept zip's members
        response = restarted.request("GET", "/files/kept/named.bin")
        self.assertEqual(response.status, 200)
        self.assertIn(hashlib.sha256(response.body).hexdigest(), kept)

    def test_kill_during_archive_expansion(self):
        directory = self.make_dir()
        server = self.start_server(directory)
        kept = self.store_some(server)
        hits = []
        for phase in ("staging members", "publishing members"):
            zipped = make_zip(3000, phase + secrets.token_hex(4))
            answered = []

            def upload(port=server.port, zipped=zipped, answered=answered):
                try:
                    answered.append(raw_exchange(
                        port, b"PUT /upload/many.zip HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                        % len(zipped), [zipped], timeout=60))
                except (OSError, http.client.HTTPException):
                    pass

            staging, journals = server.staging_dirs(), server.journal_paths()
            journal_start = sum(os.path.getsize(journal) for journal in journals)

            def midway(phase=phase, staging=staging, journals=journals, start=journal_start):
                if answered:
                    return "finished"
                if phase == "staging members":
                    return len(staged_sizes(staging)) >= 800
                grown = sum(os.path.getsize(journal) for journal in journals) - start
                return grown >= 800 * 200  # ~260 bytes a record

            uploader = threading.Thread(target=upload, daemon=True)
            uploader.start()
            try:
                state = wait_until(midway, 60, 0.002, what="the expansion midway")
            except AssertionError:
                state = False  # a miss, reported below like one that finished first
            server.kill()
            uploader.join(30)
            hits.append((phase, state))
            print("\n  kill -9 while %s: %s" % (
                phase, "hit" if state is True else "missed (%s)" % state), file=sys.stderr)
            server, blobs = self.check_restart(directory, kept)
        # The archive cut off while its members were published is whole again.
        response = server.request("PUT", "/upload/many.zip", zipped)
        self.assertIn(response.status, (200, 201), response.body)
        extracted = json.loads(response.body)["files"][0]["extracted"]
        self.assertEqual(extracted["count"], 3000)
        assert_store_consistent(directory).blobs
        if not any(state is True for _, state in hits):
            self.skipTest("the kill never landed mid-expansion: %s" % hits)

    def test_sigterm_lets_the_upload_in_flight_finish(self):
        directory = self.make_dir()
        server = self.start_server(directory)
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.addCleanup(idle.close)
        content = os.urandom(6 * MIB)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.addCleanup(sock.close)
        sock.sendall(b"PUT /upload/term.bin HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(content)
                     + content[:2 * MIB])
        staging = server.staging_dirs()
        wait_until(lambda: any(size >= MIB for size in staged_sizes(staging)), 10,
                   what="a MiB of the upload staged")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        self.assertIsNone(server.proc.poll(), "exited with an upload in flight")
        for start in range(2 * MIB, len(content), MIB):
            sock.sendall(content[start:start + MIB])
            time.sleep(0.1)
        response = read_response(sock, "PUT")
        self.assertEqual(response.status, 201, response.body)
        sha256 = hashlib.sha256(content).hexdigest()
        self.assertEqual(json.loads(response.body)["files"][0]["checksums"]["sha256"], sha256)
        try:
            status = server.proc.wait(20)
        except subprocess.TimeoutExpired:
            status = "still running"
        print("\n  SIGTERM to exit with an upload in flight: %.2f s"
              % (time.monotonic() - signalled), file=sys.stderr)
        self.assertEqual(status, 0, server.log_text()[-2000:])
        blob = os.path.join(directory, "blob", sha256[:2], sha256[2:4], sha256)
        self.assertEqual(sha256_file(blob), sha256)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


class CrashWorkersTests(CrashTests):
    """kill -9 of the parent and its workers, and SIGTERM through the parent."""
    WORKERS = ("--workers", "2")


# ===========================================================================
# 5. Data safety
# ===========================================================================


class DataSafetyTests(HardeningCase):
    def test_blobs_and_names_are_read_only(self):
        server = self.start_server()
        self.assertEqual(server.request("PUT", "/files/ro/a.txt", b"read only\n" * 50).status, 201)
        self.assertEqual(server.request("PUT", "/upload/b.bin", os.urandom(5000)).status, 201)
        self.assertEqual(server.request("PUT", "/upload/c.zip", make_zip(5, "ro")).status, 201)
        paths = [path for top in ("blob", "files", "explode")
                 for path in files_under(os.path.join(server.directory, top))]
        self.assertGreaterEqual(len(paths), 1 + 1 + 1 + 5 + 1 + 5)
        for path in paths:
            mode = os.lstat(path).st_mode
            self.assertEqual(stat.S_IMODE(mode) & 0o222, 0, "%s is writable (%o)" % (path, mode))

    def run_verify(self, directory):
        done = subprocess.run([sys.executable, SERVER_SCRIPT, "--verify", "-d", directory],
                              env=clean_environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        return done.returncode, done.stdout.decode() + done.stderr.decode()

    @staticmethod
    def snapshot(directory):
        shot = {}
        for parent, dirs, names in os.walk(directory):
            for name in dirs + names:
                path = os.path.join(parent, name)
                st = os.lstat(path)
                content = None
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as handle:
                        content = handle.read()
                shot[os.path.relpath(path, directory)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                          content)
        return shot

    def test_verify_reports_bit_rot_and_changes_nothing(self):
        directory = self.make_dir()
        server = self.start_server(directory)
        for number in range(4):
            self.assertEqual(server.request(
                "PUT", "/upload/v%d.bin" % number, os.urandom(10000 + number)).status, 201)
        self.assertEqual(server.stop(), 0)
        status, output = self.run_verify(directory)
        self.assertEqual(status, 0, output)
        self.assertNotIn("MISMATCH", output)
        blobs = files_under(os.path.join(directory, "blob"))
        self.assertEqual(len(blobs), 4)
        victim = blobs[1]
        os.chmod(victim, stat.S_IMODE(os.stat(victim).st_mode) | stat.S_IWUSR)
        with open(victim, "r+b") as handle:
            handle.seek(5000)
            byte = handle.read(1)
            handle.seek(5000)
            handle.write(bytes([byte[0] ^ 0x01]))  # one flipped bit
        os.chmod(victim, 0o444)
        before = self.snapshot(directory)
        status, output = self.run_verify(directory)
        self.assertEqual(status, 1, output)
        mismatches = [line for line in output.splitlines() if "MISMATCH" in line]
        self.assertEqual(len(mismatches), 1, output)
        self.assertIn(os.path.relpath(victim, directory), mismatches[0])
        self.assertEqual(self.snapshot(directory), before, "--verify changed the store")


# ===========================================================================
# 7. Logging
# ===========================================================================


class AccessLogTests(HardeningCase):
    """One access line per request and one "stored" line per upload, no secret."""

    TOKEN = "logtoken-" + secrets.token_hex(16)

    def exercise(self, server):
        """A mix of requests; returns [(method, unique path, status, body bytes)]."""
        tag = secrets.token_hex(4)
        done = []

        def request(method, path, body=None, headers=None):
            response = server.request(method, path, body, headers)
            done.append((method, path, response.status, len(response.body)))
            return response

        request("GET", "/healthz?tag=" + tag)
        request("GET", "/nosuch-" + tag)
        content = os.urandom(3000)
        request("PUT", "/upload/log-%s.bin" % tag, content, bearer(self.TOKEN))
        request("PUT", "/upload/denied-%s.bin" % tag, b"nope", bearer("wrong-" + self.TOKEN))
        request("PUT", "/upload/basic-%s.bin" % tag, os.urandom(100), basic(self.TOKEN))
        request("HEAD", "/checksum/%s?tag=%s" % (hashlib.sha256(content).hexdigest(), tag))
        request("GET", "/checksum/%s?tag=%s" % (hashlib.md5(content).hexdigest(), tag))
        zipped = make_zip(3, tag)
        request("PUT", "/upload/log-%s.zip" % tag, zipped, bearer(self.TOKEN))
        uploads = {hashlib.sha256(content).hexdigest(): "log-%s.bin" % tag,
                   hashlib.sha256(zipped).hexdigest(): "log-%s.zip" % tag}
        return done, uploads

    def log_lines(self, server, expected_paths):
        def complete():
            text = server.log_text()
            return all(path in text for path in expected_paths) and text
        return wait_until(complete, POLL_TIMEOUT, what="every request in the log").splitlines()

    def assertNoSecret(self, text):
        for secret in (self.TOKEN, basic(self.TOKEN)["Authorization"][6:]):
            self.assertNotIn(secret, text)

    def test_text_log(self):
        server = self.start_server(None, env={"BUCKET_TOKEN": self.TOKEN})
        done, uploads = self.exercise(server)
        lines = self.log_lines(server, [path for _, path, _, _ in done])
        for method, path, status, size in done:
            with self.subTest(method=method, path=path):
                found = [line for line in lines if path in line and method in line]
                self.assertEqual(len(found), 1, found)
                words = found[0].replace('"', " ").split()
                self.assertIn("127.0.0.1", words)
                self.assertIn(str(status), words)
                self.assertIn(str(size), words)
                self.assertRegex(found[0], r"\d+(\.\d+)?\s*(ms|s)\b")
        for sha256, name in uploads.items():
            found = [line for line in lines if "stored" in line and sha256 in line]
            self.assertEqual(len(found), 1, found)
            self.assertIn(name, found[0])
        self.assertEqual(len([line for line in lines if "stored" in line and "basic-" in line]), 1)
        self.assertNoSecret("\n".join(lines))

    def test_json_log_fields(self):
        server = self.start_server(None, "--log-format", "json",
                                   env={"BUCKET_TOKEN": self.TOKEN})
        done, uploads = self.exercise(server)
        lines = self.log_lines(server, [path for _, path, _, _ in done])
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        for method, path, status, size in done:
            with self.subTest(method=method, path=path):
                found = [event for event in events if event.get("path") == path]
                self.assertEqual(len(found), 1, found)
                event = found[0]
                self.assertEqual((event.get("client"), event.get("method"), event.get("status"),
                                  event.get("bytes")), ("127.0.0.1", method, status, size))
                duration = [event[key] for key in ("ms", "duration_ms", "duration")
                            if key in event]
                self.assertTrue(duration and isinstance(duration[0], (int, float)), event)
        for sha256, name in uploads.items():
            found = [event for event in events if event.get("sha256") == sha256
                     and event.get("event") == "stored"]
            self.assertEqual(len(found), 1, found)
            self.assertEqual(found[0].get("name"), name)
        self.assertNoSecret("\n".join(lines))

    def test_json_log_every_line_is_json(self):
        # A log collector parses every line: startup and shutdown lines too.
        server = self.start_server(None, "--log-format", "json",
                                   env={"BUCKET_TOKEN": self.TOKEN})
        self.exercise(server)
        self.assertEqual(server.stop(), 0)
        not_json = []
        for line in server.log_text().splitlines():
            try:
                if not isinstance(json.loads(line), dict):
                    not_json.append(line)
            except ValueError:
                not_json.append(line)
        self.assertEqual(not_json, [], "lines a JSON log collector cannot parse")

    def test_refused_requests_are_logged(self):
        server = self.start_server()
        tag = secrets.token_hex(4)
        heads = {
            431: b"GET /h431-%s HTTP/1.1\r\n" % tag.encode()
                 + b"".join(b"X-%d: v\r\n" % n for n in range(150)) + b"\r\n",
            414: b"GET /h414-%s%s HTTP/1.1\r\n\r\n" % (tag.encode(), b"a" * 9000),
            400: b"GET /h400-%s HTTP/9.9 extra\r\n\r\n" % tag.encode(),
        }
        for status, head in heads.items():
            self.assertEqual(raw_exchange(server.port, head, method="GET").status, status)
        text = wait_until(lambda: all("h%d-%s" % (status, tag) in server.log_text()
                                      for status in heads) and server.log_text(),
                          POLL_TIMEOUT, what="an access line for each refusal")
        for status in heads:
            with self.subTest(status=status):
                found = [line for line in text.splitlines() if "h%d-%s" % (status, tag) in line]
                self.assertEqual(len(found), 1, "no access line for the %d refusal" % status)
                self.assertIn(" %d " % status, found[0])


if __name__ == "__main__":
    unittest.main()
