# medrelay: runs the example channels.yaml (SQLite and local folders) like the README.
#   docker build -t medrelay .
#   docker run --rm -e MEDRELAY_API_TOKEN=$(openssl rand -hex 16) -p 2575:2575 -p 11112:11112 -p 8080:8080 \
#     -e MEDRELAY_BIND=0.0.0.0 -v medrelay-data:/srv/medrelay/data medrelay
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --system --create-home --home-dir /srv/medrelay medrelay
WORKDIR /srv/medrelay
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY listeners ./listeners
COPY routes ./routes
COPY transforms ./transforms
RUN pip install --no-cache-dir .
COPY channels.yaml ./
RUN mkdir -p data outbox && chown -R medrelay:medrelay /srv/medrelay
USER medrelay
VOLUME ["/srv/medrelay/data"]
EXPOSE 2575 11112 8080 9464
# JSON logs (no TTY in a container); SIGTERM drains.
STOPSIGNAL SIGTERM
CMD ["medrelay", "run", "channels.yaml"]
