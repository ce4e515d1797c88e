# cartd's image. The build stage installs cartd and its dependencies, pinned by the committed
# lock (requirements/constraints.txt), into a virtualenv; the final stage copies only that
# virtualenv onto a clean slim base and runs it as a non-root user.
#
#   docker build -t cartd .
#   docker run -p 8081:8081 -v cartd-cache:/srv/cartd/volume -v /data:/srv/archive:ro cartd
#
# compose.yaml runs it with MariaDB and the reference archive interface. The entrypoint
# (docker/entrypoint.sh) runs `cartd db upgrade`, then `cartd serve`; any other arguments
# run that cartd command instead (`docker run cartd config show`).

FROM python:3.11-slim AS build
RUN python -m venv /opt/cartd
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml README.md ./
COPY alembic alembic
COPY src src
RUN /opt/cartd/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c requirements/constraints.txt .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 cartd \
 && useradd --system --uid 10001 --gid cartd --home-dir /srv/cartd --no-create-home cartd \
 && mkdir -p /srv/cartd/volume /srv/cartd/db \
 && chown cartd:cartd /srv/cartd/volume /srv/cartd/db
COPY --from=build /opt/cartd /opt/cartd
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/cartd-entrypoint
# Defaults for a lone `docker run`: SQLite in its own volume, files from a mounted directory.
# compose.yaml overrides the database and the archive.
ENV PATH=/opt/cartd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CARTD_HOST=0.0.0.0 \
    CARTD_PORT=8081 \
    CARTD_DATABASE_URL=sqlite+aiosqlite:////srv/cartd/db/cartd.db \
    CARTD_VOLUME_PATH=/srv/cartd/volume \
    CARTD_ARCHIVE_INTERFACE_URL=file:///srv/archive
USER 10001:10001
WORKDIR /srv/cartd
# The cache (staged files) and the SQLite database outlive the container.
VOLUME ["/srv/cartd/volume", "/srv/cartd/db"]
EXPOSE 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["cartd", "healthcheck"]
ENTRYPOINT ["cartd-entrypoint"]
CMD ["serve"]
