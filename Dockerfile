# Build a wheel set from the lock, then run cartd as a non-root user on a slim image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md requirements/constraints.txt ./
COPY src ./src
COPY alembic ./alembic
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim
RUN useradd --system --uid 1000 --home-dir /srv/cartd cartd \
 && mkdir -p /srv/cartd/volume /srv/archive && chown -R cartd /srv/cartd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels cartd && rm -rf /wheels
USER cartd
WORKDIR /srv/cartd
ENV CARTD_HOST=0.0.0.0 \
    CARTD_PORT=8081 \
    VOLUME_PATH=/srv/cartd/volume \
    ARCHIVE_INTERFACE_URL=file:///srv/archive
VOLUME ["/srv/cartd/volume"]
EXPOSE 8081
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/', timeout=3)"
CMD ["cartd", "serve"]
