# medrelay: runs the example channels.yaml (SQLite and local folders) like the README.
#   docker build -t medrelay .
#   docker run --rm --name medrelay -p 2575:2575 -p 11112:11112 -p 8080:8080 -p 9464:9464 \
#     -e MEDRELAY_BIND=0.0.0.0 -v medrelay-data:/srv/medrelay/data -v medrelay-keys:/srv/medrelay/keys \
#     -v medrelay-outbox:/srv/medrelay/outbox medrelay
#   Name every volume: with --rm, an unnamed one goes with the container (the key file with it, and
#   without the key file nothing stored can be read).
#   docker exec medrelay cat data/api-token    # the FHIR bearer token, created in the volume on first run
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# The key file lives in a volume of its own, apart from the data (a backup of the data volume must
# not carry the key that decrypts it; mount it from a secret store in production).
ENV MEDRELAY_KEK_FILE=/srv/medrelay/keys/keys.json
RUN useradd --system --create-home --home-dir /srv/medrelay medrelay
WORKDIR /srv/medrelay
# Dependencies first, in a layer of their own: a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY engine ./engine
COPY listeners ./listeners
COPY routes ./routes
COPY transforms ./transforms
RUN pip install --no-cache-dir --no-deps .
COPY channels.yaml ./
RUN mkdir -p data outbox keys && chmod 0700 keys && chown -R medrelay:medrelay /srv/medrelay
USER medrelay
VOLUME ["/srv/medrelay/data", "/srv/medrelay/keys", "/srv/medrelay/outbox"]
EXPOSE 2575 11112 8080 9464
# Liveness on the metrics port (/readyz is for a load balancer: it also fails while draining).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4).status != 200)"]
# JSON logs (no TTY in a container); SIGTERM drains.
STOPSIGNAL SIGTERM
CMD ["medrelay", "run", "channels.yaml"]
