"""Several http_bucket processes sharing one ARCHIVE_DIR (README: "Scale-out").

Two real server processes on one directory: on the local disk always, and
on a GlusterFS volume mounted twice (../shared/dfs) when HTTP_BUCKET_DFS=1
and /mnt/dfs-a and /mnt/dfs-b are mounted (bash ../shared/dfs/dfs-up.sh).
"""

import concurrent.futures
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "http_bucket.py")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """One server process on ``directory``; stopped by PID."""

    def __init__(self, directory, *args):
        self.directory = directory
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, str(self.port), "-b", "127.0.0.1", "-d", directory,
             "--fsync", "false"] + list(args),
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                status, body = self.request("GET", "/healthz")
                if status == 200 and json.loads(body)["index_ready"]:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start")

    def request(self, method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class SharedDirectoryTests(unittest.TestCase):
    """What one process stores, the other answers for; nothing is lost."""

    root = None  # a directory both processes use

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(dir=cls.root)
        cls.a = Server(cls.tmp)
        cls.b = Server(cls.tmp)

    @classmethod
    def tearDownClass(cls):
        cls.a.stop()
        cls.b.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def blob_files(self):
        found = []
        for parent, _dirs, files in os.walk(os.path.join(self.tmp, "blob")):
            found += files
        return found

    def test_stored_by_one_answered_by_the_other(self):
        content = os.urandom(5000)
        status, _ = self.a.request("PUT", "/upload/one.bin", content)
        self.assertEqual(status, 201)
        for algorithm in ("md5", "sha256", "sha512"):
            digest = hashlib.new(algorithm, content).hexdigest()
            status, _ = self.b.request("HEAD", "/checksum/" + digest)
            self.assertEqual(status, 200, algorithm)
        status, body = self.b.request("GET", "/checksum/" + hashlib.md5(content).hexdigest())
        self.assertEqual((status, body), (200, content))

    def test_concurrent_identical_uploads_make_one_blob(self):
        content = os.urandom(3 * 1024 * 1024)
        sha256 = hashlib.sha256(content).hexdigest()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(
                lambda server: server.request("PUT", "/upload/same.bin", content),
                [self.a, self.b, self.a, self.b]))
        self.assertTrue(all(status in (200, 201) for status, _ in results), results)
        stored = [json.loads(body)["files"][0]["stored"] for _, body in results]
        self.assertGreaterEqual(stored.count("existing"), 3, stored)
        self.assertEqual(self.blob_files().count(sha256), 1)

    def test_no_process_deletes_what_another_still_uses(self):
        content = os.urandom(2000)
        digest = hashlib.md5(content).hexdigest()
        self.assertEqual(self.a.request("PUT", "/files/shared/n1", content)[0], 201)
        self.assertEqual(self.b.request("PUT", "/files/shared/n2", content)[0], 201)
        status, body = self.b.request("DELETE", "/files/shared/n1")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["reclaimed"], 0)
        self.assertEqual(self.a.request("HEAD", "/checksum/" + digest)[0], 200)
        status, body = self.a.request("DELETE", "/files/shared/n2")
        self.assertEqual(json.loads(body)["reclaimed"], 1)
        self.assertEqual(self.b.request("HEAD", "/checksum/" + digest)[0], 404)

    def test_pin_by_one_process_protects_from_the_other(self):
        content = os.urandom(1500)
        digest = hashlib.sha256(content).hexdigest()
        self.assertEqual(self.a.request("PUT", "/upload/kept.bin", content)[0], 201)
        self.assertEqual(self.b.request("PUT", "/files/kept/name", content)[0], 201)
        status, body = self.b.request("DELETE", "/files/kept/name")
        self.assertEqual(json.loads(body)["reclaimed"], 0)  # pinned by A's upload
        self.assertEqual(self.b.request("HEAD", "/checksum/" + digest)[0], 200)


class StagingOfLiveProcessesTests(unittest.TestCase):
    def test_startup_clears_only_dead_processes_staging(self):
        with tempfile.TemporaryDirectory() as tmp:
            live = Server(tmp)
            doomed = Server(tmp)
            try:
                staging = os.path.join(tmp, "staging")
                before = set(os.listdir(staging))
                self.assertEqual(len(before), 2)
                doomed.stop(signal.SIGKILL)
                late = Server(tmp)
                try:
                    after = set(os.listdir(staging))
                    self.assertEqual(len(after), 2)  # the live one and the new one
                    self.assertEqual(len(after & before), 1)
                finally:
                    late.stop()
            finally:
                live.stop()


@unittest.skipUnless(os.environ.get("HTTP_BUCKET_DFS") == "1"
                     and os.path.ismount("/mnt/dfs-a") and os.path.ismount("/mnt/dfs-b"),
                     "GlusterFS not mounted (HTTP_BUCKET_DFS=1 after ../shared/dfs/dfs-up.sh)")
class GlusterSharedDirectoryTests(SharedDirectoryTests):
    """The same tests with each process on its own mount of one volume."""

    @classmethod
    def setUpClass(cls):
        name = "bucket-%d" % os.getpid()
        cls.tmp = os.path.join("/mnt/dfs-a", name)
        os.makedirs(cls.tmp)
        cls.a = Server(cls.tmp)
        cls.b = Server(os.path.join("/mnt/dfs-b", name))


if __name__ == "__main__":
    unittest.main()
