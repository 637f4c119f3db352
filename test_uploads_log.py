"""The uploads log and metadata (issue 10): what was uploaded, by whom, when.

Real server processes over real HTTP: every kind of upload leaves one
record; metadata is validated; ``GET /uploads`` filters (name, checksum,
metadata, time) and pages with a cursor while uploads go on; records say
when their content is gone and why; two processes on one directory see
each other's records; a restart keeps them.  The reader itself (binary
search and backwards reading of the per-process files) is also tested
in-process with tiny blocks, so every line crosses a block boundary.

    python3 -m unittest -v test_uploads_log
"""

import hashlib
import os
import shutil
import tempfile
import time
import unittest
import urllib.parse

import http_bucket
from http_bucket_testing import (POLL_TIMEOUT, ServerProcess, assert_store_consistent,
                                 field_part, file_part, multipart_body, sha256, wait_until,
                                 zip_of)


class LogServerCase(unittest.TestCase):
    """One server per class on a fresh directory."""

    ARGS = ("--fsync", "false", "--sweep-interval", "0.2")
    ENV = {"REPLICATE_0": "team/${Team}"}

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-uploads-")
        cls.server = ServerProcess(cls.directory, cls.ARGS, env=cls.ENV).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def uploads(self, **params):
        """GET /uploads as JSON with ``params`` (lists repeat a key)."""
        pairs = []
        for key, value in params.items():
            for item in value if isinstance(value, list) else [value]:
                pairs.append((key.replace("__", "."), item))
        reply = self.server.request("GET", "/uploads?" + urllib.parse.urlencode(pairs),
                                    headers={"Accept": "application/json"})
        self.assertEqual(reply.status, 200, reply)
        return reply.json()

    def put(self, path, data, headers=None):
        reply = self.server.request("PUT", path, data, headers)
        self.assertIn(reply.status, (200, 201), reply)
        return reply.json()

    def post(self, path, parts, headers=None):
        body, content_type = multipart_body(parts)
        reply = self.server.request("POST", path, body,
                                    dict({"Content-Type": content_type}, **(headers or {})))
        return reply

    def assertRefused(self, reply, status, fragment):
        self.assertEqual(reply.status, status, reply)
        self.assertIn(fragment, reply.json()["error"])


class RecordsTest(LogServerCase):

    def test_every_kind_of_upload_leaves_one_record_saying_what_it_made(self):
        tag = os.urandom(4).hex()
        results = b"<testsuite name='%s'/>" % tag.encode()
        archive = zip_of({"logs/a.txt": tag.encode(), "logs/b.txt": b"b" + tag.encode()})
        receipt = self.put("/upload/results-%s.xml" % tag, results,
                           {"X-Bucket-Meta-Job": tag, "Team": "red"})
        form = self.post("/upload", [file_part("logs-%s.zip" % tag, archive),
                                     file_part("notes-%s.txt" % tag, b"notes " + tag.encode()),
                                     field_part("meta.job", tag.encode())])
        self.assertEqual(form.status, 201, form)
        named = self.put("/files/rec/%s/out.bin" % tag, b"named " + tag.encode(),
                         {"X-Bucket-Meta-Job": tag, "X-Retain-Days": "2"})
        deployed = self.put("/files/rec/%s/again.xml" % tag, b"", {
            "X-Checksum-Deploy": "true", "X-Checksum-Sha256": sha256(results),
            "X-Bucket-Meta-Job": tag})
        ids = [receipt["files"][0]["id"]] + [f["id"] for f in form.json()["files"]] + \
            [named["files"][0]["id"], deployed["files"][0]["id"]]
        self.assertEqual(len(set(ids)), 5, ids)
        found = self.uploads(meta__job=tag)["uploads"]
        self.assertEqual([record["id"] for record in found], ids[::-1])  # newest first
        by_name = {record["name"]: record for record in found}

        first = by_name["results-%s.xml" % tag]
        self.assertEqual((first["size"], first["sha256"]), (len(results), sha256(results)))
        self.assertEqual(first["blob"], "blob/%s/%s/%s" % (sha256(results)[:2],
                                                           sha256(results)[2:4], sha256(results)))
        self.assertEqual(first["replicas"][0].split("/")[:3], ["replica", "team", "red"])
        self.assertEqual((first["names"], first["expires"], first["keep"], first["client"]),
                         ([], None, False, "127.0.0.1"))
        self.assertEqual(first["meta"], {"job": tag})
        self.assertIsNone(first["gone"])
        self.assertTrue(first["time"].endswith("Z"))

        logs = by_name["logs-%s.zip" % tag]
        tree = form.json()["files"][0]["extracted"]["path"]
        self.assertEqual(logs["tree"], tree)
        self.assertEqual(logs["urls"]["tree"], "/" + tree + "/")
        self.assertEqual(form.json()["files"][0]["tree"], "/" + tree + "/")  # the receipt too
        listing = self.server.request("GET", logs["urls"]["tree"] + "logs/?format=json")
        self.assertEqual(sorted(e["name"] for e in listing.json()["entries"]),
                         ["a.txt", "b.txt"])

        out = by_name["out.bin"]
        self.assertEqual(out["names"], ["files/rec/%s/out.bin" % tag])
        self.assertEqual(out["urls"]["names"], ["/files/rec/%s/out.bin" % tag])
        self.assertAlmostEqual(http_bucket.parse_time(out["expires"], "expires"),
                               time.time() + 2 * 86400, delta=120)
        again = by_name["again.xml"]
        self.assertTrue(again["deployed"])
        self.assertEqual(again["sha256"], sha256(results))

    def test_a_download_by_checksum_is_named_as_uploaded(self):
        data = b"results " + os.urandom(8)
        receipt = self.put("/upload/results.xml", data)
        reply = self.server.request("GET", receipt["files"][0]["url"])
        self.assertEqual(reply.status, 200)
        self.assertIn('filename="results.xml"', reply.header("content-disposition"))
        self.put("/upload/renamed.xml", data)  # the newest upload's name wins
        reply = self.server.request("GET", "/checksum/" + hashlib.md5(data).hexdigest())
        self.assertIn('filename="renamed.xml"', reply.header("content-disposition"))
        reply = self.server.request("GET", "/checksum/%s?name=asked.txt" % sha256(data))
        self.assertIn('filename="asked.txt"', reply.header("content-disposition"))

    def test_metadata_is_validated_before_anything_is_stored(self):
        before = assert_store_consistent(self.directory)
        data = os.urandom(50)
        cases = [
            ({"X-Bucket-Meta-Bad key": "x"}, None, "header X-Bucket-Meta-bad key"),
            ({"X-Bucket-Meta-" + "k" * 257: "x"}, None, "a key is 1 to 256"),
            ({"X-Bucket-Meta-Job": "v" * 257}, None, "value over 256 bytes"),
            (dict(("X-Bucket-Meta-K%d" % n, "v") for n in range(33)), None,
             "33 keys, at most 32"),
            ({"X-Bucket-Meta-Job": "1"}, [field_part("meta.job", b"2")],
             "given twice with different values"),
            ({}, [field_part("meta.new\u00e9", b"x")], "form field meta.new"),
            ({}, [field_part("meta.job", b"a\x01b")], "value holds a control character"),
            ({"X-Bucket-Keep": "maybe"}, None, "X-Bucket-Keep must be true or false"),
        ]
        for headers, fields, fragment in cases:
            with self.subTest(fragment):
                if fields is None:
                    reply = self.server.request("PUT", "/upload/m.bin", data, headers)
                else:
                    reply = self.post("/upload", [file_part("m.bin", data)] + fields, headers)
                self.assertRefused(reply, 400, fragment)
        after = assert_store_consistent(self.directory)
        self.assertEqual((before.blobs, before.names), (after.blobs, after.names))
        self.assertEqual(self.uploads(sha256=sha256(data))["uploads"], [])

    def test_metadata_values_are_utf8_and_keys_case_insensitive(self):
        tag = os.urandom(4).hex()
        value = "caf\u00e9 \u2713"
        self.put("/upload/u.txt", tag.encode(), {
            "X-Bucket-Meta-Owner": value.encode("utf-8").decode("latin-1"),
            "X-Bucket-Meta-RUN-ID": tag, "X-Bucket-Keep": "true"})
        found = self.uploads(meta__run_ID=tag)["uploads"]  # not found: key is run-id
        self.assertEqual(found, [])
        found = self.uploads(**{"meta__RUN-ID": tag})["uploads"]
        self.assertEqual(len(found), 1)
        self.assertEqual(found[0]["meta"], {"owner": value, "run-id": tag})
        self.assertTrue(found[0]["keep"])


class QueryTest(LogServerCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tag = os.urandom(4).hex()
        cls.made = []
        for number in range(12):
            data = ("%s-%d" % (cls.tag, number)).encode()
            name = "%s-%02d.%s" % ("report" if number % 3 else "log", number,
                                   "xml" if number % 2 else "txt")
            headers = {"X-Bucket-Meta-Batch": cls.tag,
                       "X-Bucket-Meta-Parity": "odd" if number % 2 else "even"}
            reply = cls.server.request("PUT", "/upload/" + name, data, headers)
            assert reply.status == 201, reply
            cls.made.append((reply.json()["files"][0]["id"], name, data))
            time.sleep(0.002)

    def batch(self, **params):
        return self.uploads(meta__batch=self.tag, **params)

    def test_name_glob(self):
        found = self.batch(name="report-*.XML")["uploads"]  # case-insensitive
        expected = [rid for rid, name, _ in self.made if name.startswith("report")
                    and name.endswith(".xml")]
        self.assertEqual([r["id"] for r in found], expected[::-1])
        self.assertEqual(self.batch(name="*-0?.txt")["count"],
                         sum(1 for _, n, _ in self.made if n.endswith(".txt") and "-0" in n))

    def test_checksum_of_any_algorithm(self):
        rid, _, data = self.made[5]
        for digest in (sha256(data), hashlib.md5(data).hexdigest().upper(),
                       hashlib.sha512(data).hexdigest()):
            with self.subTest(digest[:8]):
                self.assertEqual([r["id"] for r in self.uploads(sha256=digest)["uploads"]], [rid])
        self.assertEqual(self.uploads(sha256="0" * 64)["uploads"], [])
        reply = self.server.request("GET", "/uploads?sha256=xyz&format=json")
        self.assertRefused(reply, 400, "sha256 must be a checksum")

    def test_metadata_all_must_match(self):
        found = self.batch(meta__parity="odd")["uploads"]
        self.assertEqual(len(found), 6)
        self.assertEqual(self.uploads(meta__parity="odd", meta__batch="nope")["uploads"], [])
        html = self.server.request("GET", "/uploads?meta=batch%%3D%s+parity%%3Deven" % self.tag)
        self.assertEqual(html.body.decode().count("<tr><td class='when' data-label='when'>"), 6)

    def test_since_and_until(self):
        ids = [rid for rid, _, _ in self.made]
        micros = [int(rid.split("-")[0]) for rid in ids]
        since = micros[3] / 1e6
        until = micros[8] / 1e6
        found = self.batch(since=repr(since), until=repr(until))["uploads"]
        self.assertEqual([r["id"] for r in found], ids[3:9][::-1])
        iso = http_bucket.iso_time(micros[10] / 1e6 - 0.0005)  # ms resolution
        found = self.batch(since=iso, until=repr(micros[11] / 1e6))["uploads"]
        self.assertEqual([r["id"] for r in found], ids[10:][::-1])
        reply = self.server.request("GET", "/uploads?since=yesterday&format=json")
        self.assertRefused(reply, 400, "since must be ISO 8601")

    def test_paging_misses_nothing_and_repeats_nothing_while_uploads_go_on(self):
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": "5"}
            if cursor:
                params["before"] = cursor
            page = self.batch(**params)
            seen += [r["id"] for r in page["uploads"]]
            pages += 1
            # Uploads keep arriving between pages: they are newer than every
            # cursor, so they never show up in later pages.
            self.put("/upload/late-%d.txt" % pages, os.urandom(20),
                     {"X-Bucket-Meta-Batch": self.tag + "-late"})
            self.server.request("PUT", "/upload/late-%d.bin" % pages, os.urandom(20),
                                {"X-Bucket-Meta-Batch": self.tag})
            cursor = page["next"]
            if not cursor:
                break
        original = [rid for rid, _, _ in self.made][::-1]
        self.assertEqual(seen, original)
        self.assertEqual(pages, 3)
        self.assertEqual(len(seen), len(set(seen)))

    def test_bad_parameters(self):
        for query, fragment in (("limit=0", "limit must be 1 to 1000"),
                                ("limit=1001", "limit must be 1 to 1000"),
                                ("before=xyz", "before must be the 'next' cursor"),
                                ("meta=novalue", "meta must be key=value")):
            reply = self.server.request("GET", "/uploads?format=json&" + query)
            self.assertRefused(reply, 400, fragment)

    def test_html_is_escaped_and_links_download_under_the_real_name(self):
        name = "<img src=x onerror=alert(1)>.txt"
        data = os.urandom(16)
        self.put("/upload/" + urllib.parse.quote(name), data)
        page = self.server.request("GET", "/uploads?sha256=" + sha256(data)).body.decode()
        self.assertNotIn("<img", page)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;.txt", page)
        self.assertIn("/checksum/%s?name=%s" % (sha256(data),
                                                 urllib.parse.quote(name).replace("&", "&amp;")),
                      page)


class GoneTest(LogServerCase):

    def test_deleted_and_expired_content_says_why(self):
        tag = os.urandom(4).hex()
        deleted = ("deleted-%s" % tag).encode()
        expiring = ("expiring-%s" % tag).encode()
        named = ("named-%s" % tag).encode()
        self.put("/upload/d.txt", deleted, {"X-Bucket-Meta-Gone": tag})
        self.put("/upload/e.txt", expiring, {"X-Bucket-Meta-Gone": tag,
                                             "X-Retain-Days": "0.00001"})  # 0.86 s
        self.put("/files/gone/%s/n.txt" % tag, named, {"X-Bucket-Meta-Gone": tag})
        self.assertEqual([r["gone"] for r in self.uploads(meta__gone=tag)["uploads"]],
                         [None, None, None])
        self.assertEqual(self.server.request("DELETE", "/checksum/" + sha256(deleted)).status, 200)
        self.assertEqual(self.server.request("DELETE", "/files/gone/%s/n.txt" % tag).status, 200)
        wait_until(lambda: self.server.request("HEAD", "/checksum/" + sha256(expiring)).status
                   == 404, POLL_TIMEOUT, what="the retention to expire")
        records = {r["name"]: r for r in self.uploads(meta__gone=tag)["uploads"]}
        self.assertEqual(records["d.txt"]["gone"], "deleted")
        self.assertEqual(records["e.txt"]["gone"], "expired")
        self.assertEqual(records["n.txt"]["gone"], "deleted")
        self.assertEqual(records["n.txt"]["names_gone"], ["files/gone/%s/n.txt" % tag])
        # The same content uploaded again: no longer gone.
        self.put("/upload/d2.txt", deleted)
        records = {r["name"]: r for r in self.uploads(meta__gone=tag)["uploads"]}
        self.assertIsNone(records["d.txt"]["gone"])

    def test_a_name_deleted_while_its_content_stays(self):
        data = os.urandom(30)
        first = self.put("/files/kept/a.txt", data)["files"][0]["id"]
        self.put("/files/kept/b.txt", data)
        self.server.request("DELETE", "/files/kept/a.txt")
        record = [r for r in self.uploads(sha256=sha256(data))["uploads"] if r["id"] == first][0]
        self.assertIsNone(record["gone"])
        self.assertEqual(record["names_gone"], ["files/kept/a.txt"])


class ListingTimesTest(LogServerCase):

    def test_names_of_one_content_show_when_each_was_made_and_when_it_expires(self):
        data = os.urandom(40)
        self.put("/files/times/first.txt", data)
        time.sleep(1.1)
        self.put("/files/times/second.txt", data, {"X-Retain-Days": "3"})
        listing = self.server.request("GET", "/files/times/?format=json").json()
        entries = {entry["name"]: entry for entry in listing["entries"]}
        self.assertGreaterEqual(entries["second.txt"]["made"] - entries["first.txt"]["made"], 1.0)
        self.assertEqual(entries["first.txt"]["mtime"], entries["second.txt"]["mtime"])
        self.assertNotIn("expires", entries["first.txt"])
        self.assertAlmostEqual(entries["second.txt"]["expires"], time.time() + 3 * 86400,
                               delta=120)
        html = self.server.request("GET", "/files/times/").body.decode()
        self.assertIn("<th scope='col'>expires</th>", html)
        expiry_day = time.strftime("%Y-%m-%d", time.gmtime(entries["second.txt"]["expires"]))
        self.assertIn(expiry_day, html)
        for method in ("GET", "HEAD"):
            reply = self.server.request(method, "/files/times/second.txt")
            self.assertEqual(http_bucket.parse_http_date(reply.header("x-bucket-expires")),
                             int(entries["second.txt"]["expires"]))
            self.assertIsNone(self.server.request(method, "/files/times/first.txt")
                              .header("x-bucket-expires"))
        reply = self.server.request("PUT", "/upload/pinned.bin", b"p", {"X-Retain-Days": "1"})
        head = self.server.request("HEAD", "/checksum/" + sha256(b"p"))
        self.assertIsNotNone(head.header("x-bucket-expires"), reply)

    def test_reserved_names_are_not_served(self):
        self.put("/files/res/x.txt", b"x")
        reply = self.server.request("GET", "/files/res/.~made")
        self.assertEqual(reply.status, 404)


class ProcessesTest(unittest.TestCase):
    """Two processes on one directory; a restart; a crash's torn line."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="http_bucket-uploads2-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.servers = [ServerProcess(self.directory, ("--fsync", "false")) for _ in range(2)]
        for server in self.servers:
            server.start()
            self.addCleanup(server.stop)

    def query(self, server, tag):
        reply = server.request("GET", "/uploads?format=json&meta.run=" + tag)
        self.assertEqual(reply.status, 200, reply)
        return reply.json()["uploads"]

    def test_every_process_lists_everyones_records_merged_by_time(self):
        tag = os.urandom(4).hex()
        ids = []
        for number in range(6):
            server = self.servers[number % 2]
            reply = server.request("PUT", "/upload/p%d.txt" % number, os.urandom(10),
                                   {"X-Bucket-Meta-Run": tag})
            ids.append(reply.json()["files"][0]["id"])
            time.sleep(0.002)
        for server in self.servers:
            self.assertEqual([r["id"] for r in self.query(server, tag)], ids[::-1])
        page = self.servers[0].request("GET", "/uploads?format=json&limit=4&meta.run=" + tag)
        rest = self.servers[1].request("GET", "/uploads?format=json&meta.run=%s&before=%s"
                                       % (tag, page.json()["next"]))
        self.assertEqual([r["id"] for r in page.json()["uploads"] + rest.json()["uploads"]],
                         ids[::-1])

    def test_records_survive_a_restart_and_a_torn_line_is_skipped(self):
        tag = os.urandom(4).hex()
        server = self.servers[0]
        first = server.request("PUT", "/upload/r.txt", b"r" + tag.encode(),
                               {"X-Bucket-Meta-Run": tag}).json()["files"][0]["id"]
        server.kill()  # kill -9: its file is a dead process's now
        path = [os.path.join(self.directory, "uploads", name)
                for name in os.listdir(os.path.join(self.directory, "uploads"))
                if "-%d-" % server.proc.pid in name][0]
        with open(path, "ab") as handle:
            handle.write(b'{"id": "9999999999999999-ffffff", "name": "torn", "meta": {"run": "'
                         + tag.encode())  # a crash mid-write
        server.start()
        self.assertEqual([r["id"] for r in self.query(server, tag)], [first])
        second = server.request("PUT", "/upload/r2.txt", b"r2" + tag.encode(),
                                {"X-Bucket-Meta-Run": tag}).json()["files"][0]["id"]
        for other in self.servers:
            self.assertEqual([r["id"] for r in self.query(other, tag)], [second, first])


class ReaderTest(unittest.TestCase):
    """UploadsLog.query in-process, with blocks of 300 bytes: lines cross
    block boundaries, and bisection runs many rounds."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="http_bucket-reader-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        saved = http_bucket.UPLOADS_BLOCK
        http_bucket.UPLOADS_BLOCK = 300
        self.addCleanup(setattr, http_bucket, "UPLOADS_BLOCK", saved)
        self.logs = [http_bucket.UploadsLog(self.directory, "p%d" % n, "%06x" % n)
                     for n in range(3)]
        for log in self.logs:
            self.addCleanup(log.close)
        self.ids = []
        for number in range(90):
            log = self.logs[number % 3]
            self.ids.append(log.append({
                "name": "file-%03d.%s" % (number, "xml" if number % 2 else "log"),
                "sha256": "%064x" % number, "meta": {"n": str(number % 5)},
                "pad": "x" * (number * 7 % 200)}))

    def query(self, **fields):
        values = dict(name=None, sha256=None, meta={}, since=None, until=None, before=None,
                      limit=1000)
        values.update(fields)
        return self.logs[0].query(http_bucket.UploadQuery(**values))

    def test_everything_newest_first(self):
        records, cursor = self.query()
        self.assertEqual([r["id"] for r in records], self.ids[::-1])
        self.assertIsNone(cursor)

    def test_pages_by_cursor(self):
        seen, cursor = [], None
        while True:
            records, cursor = self.query(limit=7, before=cursor)
            seen += [r["id"] for r in records]
            if not cursor:
                break
        self.assertEqual(seen, self.ids[::-1])

    def test_filters_and_time_bounds(self):
        records, _ = self.query(meta={"n": "3"}, name="*.XML")
        expected = [rid for number, rid in enumerate(self.ids) if number % 5 == 3 and number % 2]
        self.assertEqual([r["id"] for r in records], expected[::-1])
        records, _ = self.query(sha256="%064x" % 42)
        self.assertEqual([r["id"] for r in records], [self.ids[42]])
        micros = [int(rid.split("-")[0]) / 1e6 for rid in self.ids]
        records, _ = self.query(since=micros[20], until=micros[60])
        self.assertEqual([r["id"] for r in records], self.ids[20:61][::-1])
        records, _ = self.query(before=self.ids[50], since=micros[45])
        self.assertEqual([r["id"] for r in records], self.ids[45:50][::-1])

    def test_withdrawn_records_are_not_listed(self):
        records, _ = self.query(sha256="%064x" % 7)
        self.logs[1].withdraw(self.ids[7], {k: v for k, v in records[0].items()
                                            if k not in ("id", "time")})
        self.assertEqual(self.query(sha256="%064x" % 7)[0], [])
        self.assertEqual(len(self.query()[0]), 89)


if __name__ == "__main__":
    unittest.main()
