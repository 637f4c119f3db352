"""Several http_bucket processes sharing one ARCHIVE_DIR (README: "Scale-out").

Two real server processes on one directory: on the local disk always, and
on a GlusterFS volume mounted twice (../shared/dfs) when HTTP_BUCKET_DFS=1
and /mnt/dfs-a and /mnt/dfs-b are mounted (bash ../shared/dfs/dfs-up.sh).
"""

import concurrent.futures
import hashlib
import os
import shutil
import socket
import tempfile
import unittest

from http_bucket_testing import (
    POLL_TIMEOUT, files_under, read_raw_response, start_server, wait_until)

FSYNC_OFF = ("--fsync", "false")  # speed: no test here outlives a power loss


class SharedDirectoryTests(unittest.TestCase):
    """What one process stores, the other answers for; nothing is lost."""

    root = None  # a directory both processes use

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(dir=cls.root)
        cls.a = start_server(cls.tmp, *FSYNC_OFF)
        cls.b = start_server(cls.tmp, *FSYNC_OFF)

    @classmethod
    def tearDownClass(cls):
        cls.a.stop()
        cls.b.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def blob_files(self):
        return [os.path.basename(path) for path in files_under(os.path.join(self.tmp, "blob"))]

    def test_stored_by_one_answered_by_the_other(self):
        content = os.urandom(5000)
        self.assertEqual(self.a.request("PUT", "/upload/one.bin", content).status, 201)
        for algorithm in ("md5", "sha256", "sha512"):
            digest = hashlib.new(algorithm, content).hexdigest()
            self.assertEqual(self.b.request("HEAD", "/checksum/" + digest).status, 200, algorithm)
        reply = self.b.request("GET", "/checksum/" + hashlib.md5(content).hexdigest())
        self.assertEqual((reply.status, reply.body), (200, content))

    def test_health_counts_what_every_process_stored(self):
        before = self.b.request("GET", "/healthz").json()["blobs"]
        self.assertEqual(self.a.request("PUT", "/upload/counted.bin", os.urandom(700)).status, 201)
        self.assertEqual(self.b.request("GET", "/healthz").json()["blobs"], before + 1)

    def test_concurrent_identical_uploads_make_one_blob(self):
        content = os.urandom(3 * 1024 * 1024)
        sha256 = hashlib.sha256(content).hexdigest()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(
                lambda server: server.request("PUT", "/upload/same.bin", content),
                [self.a, self.b, self.a, self.b]))
        self.assertTrue(all(reply.status in (200, 201) for reply in results), results)
        stored = [reply.json()["files"][0]["stored"] for reply in results]
        self.assertGreaterEqual(stored.count("existing"), 3, stored)
        self.assertEqual(self.blob_files().count(sha256), 1)

    def test_no_process_deletes_what_another_still_uses(self):
        content = os.urandom(2000)
        digest = hashlib.md5(content).hexdigest()
        self.assertEqual(self.a.request("PUT", "/files/shared/n1", content).status, 201)
        self.assertEqual(self.b.request("PUT", "/files/shared/n2", content).status, 201)
        reply = self.b.request("DELETE", "/files/shared/n1")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["reclaimed"], 0)
        self.assertEqual(self.a.request("HEAD", "/checksum/" + digest).status, 200)
        reply = self.a.request("DELETE", "/files/shared/n2")
        self.assertEqual(reply.json()["reclaimed"], 1)
        self.assertEqual(self.b.request("HEAD", "/checksum/" + digest).status, 404)

    def test_pin_by_one_process_protects_from_the_other(self):
        content = os.urandom(1500)
        digest = hashlib.sha256(content).hexdigest()
        self.assertEqual(self.a.request("PUT", "/upload/kept.bin", content).status, 201)
        self.assertEqual(self.b.request("PUT", "/files/kept/name", content).status, 201)
        reply = self.b.request("DELETE", "/files/kept/name")
        self.assertEqual(reply.json()["reclaimed"], 0)  # pinned by A's upload
        self.assertEqual(self.b.request("HEAD", "/checksum/" + digest).status, 200)


class StagingOfLiveProcessesTests(unittest.TestCase):
    def test_startup_clears_only_dead_processes_staging(self):
        with tempfile.TemporaryDirectory() as tmp:
            live = start_server(tmp, *FSYNC_OFF)
            doomed = start_server(tmp, *FSYNC_OFF)
            try:
                staging = os.path.join(tmp, "staging")
                before = set(os.listdir(staging))
                self.assertEqual(len(before), 2)
                doomed.kill()
                late = start_server(tmp, *FSYNC_OFF)
                try:
                    after = set(os.listdir(staging))
                    self.assertEqual(len(after), 2)  # the live one and the new one
                    self.assertEqual(len(after & before), 1)
                finally:
                    late.stop()
            finally:
                live.stop()


class SharedDirectoryWorkersTests(SharedDirectoryTests):
    """The same tests with two servers of two workers each (four processes)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        cls.a = start_server(cls.tmp, *FSYNC_OFF, "--workers", "2")
        cls.b = start_server(cls.tmp, *FSYNC_OFF, "--workers", "2")

    @unittest.skipUnless(len(os.sched_getaffinity(0)) >= 2, "needs two cores")
    def test_each_worker_on_a_core_of_its_own_hashing_on_all(self):
        cores = sorted(os.sched_getaffinity(0))
        workers = self.a.worker_pids()
        self.assertEqual(sorted(os.sched_getaffinity(pid) for pid in workers),
                         [{cores[0]}, {cores[1]}])
        # A body past SMALL_BODY is hashed by threads free to use every core:
        # while one is half sent, some thread of a worker may run anywhere.
        content = os.urandom(12 * 1024 * 1024)
        half = len(content) // 2
        with socket.create_connection(("127.0.0.1", self.a.port), timeout=30) as client:
            client.sendall(b"PUT /upload/big.bin HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
                           b"Connection: close\r\n\r\n" % len(content) + content[:half])

            def affinity(task):
                try:
                    return os.sched_getaffinity(task)
                except OSError:  # the thread ended meanwhile
                    return set()

            def threads_on_every_core():
                return any(affinity(int(task)) == set(cores)
                           for pid in workers for task in os.listdir("/proc/%d/task" % pid))
            wait_until(threads_on_every_core, POLL_TIMEOUT, what="a digest thread on every core")
            client.sendall(content[half:])
            reply = read_raw_response(client.makefile("rb"))
        self.assertEqual(reply.status, 201, reply.body[:200])
        digest = hashlib.sha512(content).hexdigest()
        self.assertEqual(self.b.request("HEAD", "/checksum/" + digest).status, 200)


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
        cls.a = start_server(cls.tmp, *FSYNC_OFF)
        cls.b = start_server(os.path.join("/mnt/dfs-b", name), *FSYNC_OFF)


if __name__ == "__main__":
    unittest.main()
