"""Run a command (the test suite) against PostgreSQL and an S3-compatible server (moto).

    python tests/scale_env.py python -m pytest -q

Starts moto's S3 server on a free port, creates a bucket, and sets LOWTIDE_TEST_DATABASE_URL and
LOWTIDE_TEST_STORAGE_URL so that every test server uses PostgreSQL and S3.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    server = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "LOWTIDE_TEST_DATABASE_URL": os.environ.get(
            "LOWTIDE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1"
        ),
        "LOWTIDE_TEST_STORAGE_URL": "s3://lowtide-test",
    }
    try:
        import boto3

        for _ in range(100):
            try:
                boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    region_name="us-east-1",
                    aws_access_key_id="test",
                    aws_secret_access_key="test",
                ).create_bucket(Bucket="lowtide-test")
                break
            except Exception:
                time.sleep(0.1)
        else:
            print("moto's S3 server did not start", file=sys.stderr)
            return 1
        print(
            f"PostgreSQL at {env['LOWTIDE_TEST_DATABASE_URL']}, S3 (moto) at {endpoint}", flush=True
        )
        return subprocess.call(sys.argv[1:], env=env)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
