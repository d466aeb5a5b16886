# Builds both binaries: the proxy and the stand-in legacy FHIR server (demo only).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/fhir-group-proxy /usr/local/bin/
COPY --from=build /src/target/release/standin-legacy-fhir /usr/local/bin/
COPY config/fhir-group-proxy.toml /etc/fhir-group-proxy.toml
ENTRYPOINT ["fhir-group-proxy", "--config", "/etc/fhir-group-proxy.toml"]
CMD ["serve"]
