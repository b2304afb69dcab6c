# walcast container image.
#
#   docker build -t walcast .
#   docker run --rm -e WALCAST_DATABASE_URL=... -e WALCAST_REDIS_URL=... walcast
#   docker run --rm -e WALCAST_DATABASE_URL=... -e WALCAST_REDIS_URL=... walcast check
#   docker run --rm -e WALCAST_ADMIN_DATABASE_URL=... walcast setup
#
# The build step is exactly CI's release build (`cargo build --release
# --locked --bin walcast`), so the image holds the binary CI built and
# tested. No dependency-caching tricks: they would make it a different step.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin walcast

FROM debian:bookworm-slim
# ca-certificates: the roots for sslmode=verify-ca/verify-full and rediss://
# when no sslrootcert is given.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 walcast \
    && useradd --system --uid 10001 --gid walcast --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin walcast
COPY --from=builder /src/target/release/walcast /usr/local/bin/walcast
# For reference and for psql -f; `walcast setup` has them built in.
COPY sql/publication.sql sql/role.sql sql/rls.sql sql/auth_helpers.sql /usr/share/walcast/sql/
COPY config/walcast.toml config/sidecar.toml /usr/share/walcast/config/
# In a container the admin endpoints must be reachable from outside it.
ENV WALCAST_ADMIN_ADDR=0.0.0.0:9187
# 9187: /metrics, /health, /ready of `walcast run`; 4000: `walcast gateway`.
EXPOSE 9187 4000
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# walcast keeps no state on disk: the slot in Postgres holds its position.
ENTRYPOINT ["walcast"]
CMD ["run"]
