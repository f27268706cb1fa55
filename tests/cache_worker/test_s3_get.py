"""The lean GET's SigV4 signer gives the very signature botocore computes for the same request."""

from __future__ import annotations

import calendar
import time
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from datahoard.cache_worker.s3_get import SigV4Signer, parse_error


@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzEBYaD+token/with=chars"])
@pytest.mark.parametrize(
    "host, key, extra",
    [
        ("bucket.s3.eu-west-1.amazonaws.com", "train/n01440764/img 1+2.JPEG",
         {"range": "bytes=100-199", "if-match": '"0123456789abcdef0123456789abcdef"'}),
        ("minio.local:9000", "bucket/ünï/ç~é%.bin", {}),
    ],
)
def test_signature_matches_botocore(host, key, extra, token):
    path = "/" + quote(key, safe="/~")
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    request = AWSRequest(method="GET", url=f"https://{host}{path}", headers=dict(extra))
    # An unsigned payload, as botocore's S3 client sends over HTTPS and the lean path always.
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    S3SigV4Auth(creds, "s3", "eu-west-1").add_auth(request)
    stamp = request.headers["X-Amz-Date"]
    now = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))

    headers = {"host": host, **extra}
    SigV4Signer("eu-west-1").sign("GET", path, headers, creds.access_key, creds.secret_key,
                                  token, now=now)
    assert headers["authorization"] == request.headers["Authorization"]
    assert headers["x-amz-date"] == stamp
    assert headers["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"]
    assert headers.get("x-amz-security-token") == request.headers.get("X-Amz-Security-Token")


def test_signing_key_follows_the_date_and_the_secret():
    signer = SigV4Signer("us-east-1")
    one = signer._signing_key("secret", "20260101")
    assert signer._signing_key("secret", "20260101") is one
    assert signer._signing_key("secret", "20260102") != one
    assert signer._signing_key("rotated", "20260102") != signer._signing_key("secret", "20260102")


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
        bucket=bucket, endpoint_url=endpoint, region="us-east-1", path_style=True,
        credentials=Credentials("testing", "testing"), max_connections=2,
        connect_timeout=5, read_timeout=5,
        endpoint_for_region=lambda region: asked.append(region) or endpoint,
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
    "uri, region, endpoint, url_prefix",
    [
        ("s3://my-bucket/train", "eu-west-1", None, "https://my-bucket.s3.eu-west-1.amazonaws.com/"),
        ("s3://my-bucket/train", "us-east-1", None, "https://my-bucket.s3.amazonaws.com/"),
        ("s3://my.dotted.bucket/", "eu-west-1", None, "https://s3.eu-west-1.amazonaws.com/my.dotted.bucket/"),
        ("s3://my-bucket/", None, "http://minio:9000", "http://minio:9000/my-bucket/"),
        ("s3://my-bucket/", None, "https://ceph.example:443/base/", "https://ceph.example/base/my-bucket/"),
    ],
)
def test_addressing_is_what_the_botocore_client_resolves(uri, region, endpoint, url_prefix):
    """Virtual-host style on AWS (path-style for names that cannot be TLS host names),
    path-style on an explicit endpoint. Nothing is sent: pools connect on first use."""
    from datahoard.cache_worker.s3 import S3Options, S3Source

    src = S3Source(uri, S3Options(endpoint_url=endpoint, region=region))
    pool, host, prefix, signer = src._getter._state
    assert f"{pool.scheme}://{host}{prefix}" == url_prefix
    assert signer.region == (region or "us-east-1")
    src.close()
