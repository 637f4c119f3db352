# http_bucket in a container: one file, standard library only.
#
#   docker build -t http-bucket .                          # plain
#   docker build -t http-bucket --build-arg WITH_MAGIC=1 .  # + libmagic MIME types
#   docker run -d -p 8000:8000 -v bucket-data:/data -e BUCKET_TOKEN=secret http-bucket
#
# Everything is stored under /data (ARCHIVE_DIR), a volume.  The port is
# BUCKET_PORT (8000), which the server and the HEALTHCHECK both read: set it
# with -e, not as an argument after the image name.  `make docker-test`
# builds this file with podman and checks the result (.ci/docker-test).
FROM python:3.12-slim

# 1: install libmagic1 and python-magic for better MIME types (optional).
ARG WITH_MAGIC=0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    ARCHIVE_DIR=/data \
    BUCKET_PORT=8000

RUN set -eux; \
    if [ "$WITH_MAGIC" = "1" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends libmagic1; \
        rm -rf /var/lib/apt/lists/*; \
        pip install python-magic; \
    fi; \
    groupadd --system --gid 10001 bucket; \
    useradd --system --uid 10001 --gid bucket --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin bucket; \
    mkdir -p /app /data; \
    chown bucket:bucket /data

WORKDIR /app
COPY http_bucket.py /app/http_bucket.py

USER bucket
VOLUME /data
EXPOSE 8000

# Standard library only: /healthz answers 200 while the server runs (also
# with BUCKET_READ_TOKEN).  HTTPS with an unverified context when
# BUCKET_CERTFILE is set (plain HTTP to the TLS port gets a 400), else HTTP;
# on BUCKET_PORT, at BUCKET_BIND when one is set.  http.client, not urllib:
# no proxy variable can send the check elsewhere.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import http.client as h, os, ssl, sys; e = os.environ.get; a = (e('BUCKET_BIND') or '127.0.0.1', int(e('BUCKET_PORT') or 8000)); c = h.HTTPSConnection(*a, timeout=4, context=ssl._create_unverified_context()) if e('BUCKET_CERTFILE') else h.HTTPConnection(*a, timeout=4); c.request('GET', '/healthz'); sys.exit(0 if c.getresponse().status == 200 else 1)"]

CMD ["python3", "/app/http_bucket.py"]
