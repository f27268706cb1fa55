"""The lean GET: botocore resolves where it goes and signs it; a real S3 server accepts it."""

from __future__ import annotations

import pytest
from botocore.credentials import Credentials

from datahoard.cache_worker.s3_get import Target, parse_error


def test_error_bodies():
    body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate &amp; retry.</Message></Error>")
    assert parse_error(503, body) == ("SlowDown", "Please reduce your request rate & retry.")
    assert parse_error(404, b"") == ("404", "HTTP 404")
    assert parse_error(502, b"<html>bad gateway</html>") == ("502", "HTTP 502")


@pytest.mark.integration
def test_a_bucket_in_another_region_is_followed_once(s3_server, s3, bucket):
    """Like AWS for a bucket outside the configured region: 400 naming the bucket's region."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    from datahoard.cache_worker.s3_get import ObjectGetter

    s3.put_object(Bucket=bucket, Key="k/obj", Body=b"0123456789" * 100)
    upstream = urlsplit(s3_server.endpoint)
    refused: list[str] = []

    class Regional(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if "/eu-west-1/s3/" not in self.headers.get("Authorization", ""):
                refused.append(self.path)
                body = b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>wrong region</Message></Error>"
                self.send_response(400)
                self.send_header("x-amz-bucket-region", "eu-west-1")
            else:
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=10)
                conn.request("GET", self.path, headers=dict(self.headers.items()))
                answer = conn.getresponse()
                body = answer.read()
                self.send_response(answer.status)
                conn.close()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Regional)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    asked: list[str] = []
    getter = ObjectGetter(
        target=Target(f"{endpoint}/{bucket}/", "us-east-1"),
        credentials=Credentials("testing", "testing"), max_connections=2,
        connect_timeout=5, read_timeout=5,
        target_for_region=lambda region: asked.append(region) or Target(f"{endpoint}/{bucket}/", region),
    )
    try:
        first = getter.get("k/obj", {"range": "bytes=10-19"})
        second = getter.get("k/obj", {})
    finally:
        getter.close()
        server.shutdown()
        server.server_close()
    assert (first.status, first.data) == (206, b"0123456789")
    assert (second.status, second.data) == (200, b"0123456789" * 100)
    assert asked == ["eu-west-1"] and len(refused) == 1 and getter.region == "eu-west-1"


@pytest.mark.parametrize(
    "uri, region, endpoint, env, url_prefix",
    [
        ("s3://my-bucket/train", "eu-west-1", None, {}, "https://my-bucket.s3.eu-west-1.amazonaws.com/"),
        ("s3://my-bucket/train", "us-east-1", None, {}, "https://my-bucket.s3.amazonaws.com/"),
        ("s3://my.dotted.bucket/", "eu-west-1", None, {}, "https://s3.eu-west-1.amazonaws.com/my.dotted.bucket/"),
        ("s3://my-bucket/", "us-east-1", None, {"AWS_USE_FIPS_ENDPOINT": "true"},
         "https://my-bucket.s3-fips.us-east-1.amazonaws.com/"),
        ("s3://my-bucket/", "eu-west-1", None, {"AWS_USE_DUALSTACK_ENDPOINT": "true"},
         "https://my-bucket.s3.dualstack.eu-west-1.amazonaws.com/"),
        ("s3://my-bucket/", "cn-north-1", None, {}, "https://my-bucket.s3.cn-north-1.amazonaws.com.cn/"),
        ("s3://my-bucket/", None, "http://minio:9000", {}, "http://minio:9000/my-bucket/"),
        ("s3://my-bucket/", None, "https://ceph.example:443/base/", {}, "https://ceph.example/base/my-bucket/"),
    ],
    ids=["virtual-host", "us-east-1", "dotted-path-style", "fips", "dual-stack", "china", "minio", "base-path"],
)
def test_addressing_is_what_the_botocore_client_resolves(uri, region, endpoint, env, url_prefix, monkeypatch):
    """The lean GETs go where botocore's endpoint rules send a GetObject: virtual-host style
    on AWS (path-style for names that cannot be TLS host names), FIPS and dual-stack when
    configured, path-style on an explicit endpoint. Nothing is sent: pools connect on first use."""
    from datahoard.cache_worker.s3 import S3Options, S3Source

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    src = S3Source(uri, S3Options(endpoint_url=endpoint, region=region))
    pool, base, host, prefix, target = src._getter._state
    assert f"{pool.scheme}://{host}{prefix}" == url_prefix
    assert target.region == (region or "us-east-1") and target.signing_name == "s3"
    src.close()
