# Multi-stage build of stage. Both stages install through scripts/setup, the same script
# the tests use, so nothing here is a step CI does not exercise.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY scripts/ scripts/
COPY conf/ conf/
RUN scripts/setup
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
WORKDIR /opt/stage
COPY scripts/ /usr/local/share/stage/scripts/
COPY conf/ /usr/local/share/stage/conf/
# The runtime needs no compiler; scripts/setup installs the client libraries and drivers.
RUN STAGE_SETUP_RUNTIME_ONLY=1 /usr/local/share/stage/scripts/setup
COPY --from=build /src/target/release/stage /usr/local/bin/stage
# The example home; mount your own over it: docker run -v $HOME/stage:/opt/stage ...
COPY stage/ /opt/stage/
# 8801: the example's BSON service; 9801: the cluster's UDP port.
EXPOSE 8801 9801/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["stage"]
CMD ["run", "/opt/stage"]
