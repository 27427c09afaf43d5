#!/usr/bin/env bash
# Build deploy/kubernetes/Dockerfile with podman (no Docker daemon) and run the image as deployment.yaml runs it:
# user 1000, read-only root filesystem with a writable /tmp, no capabilities, the repository mounted read-only at
# /models, `compilers serve /models --host 0.0.0.0 --port 8000 --grpc-port 8001`. Then: a model compiled and
# published with the image itself, /v2/health/live and /v2/health/ready answering 200, one inference over HTTP
# (curl and tritonclient.http) and one over gRPC (tritonclient.grpc) equal to eager, and SIGTERM ending the server
# cleanly. A manual check, not run by the tests (it needs root, podman and several minutes).
#
#   sudo deploy/kubernetes/smoke.sh                 # from the repository root
#
# Settings (environment):
#   BASE         base image (default python:3.11-slim). BASE=debootstrap builds a Debian bookworm with python3 and
#                python3-venv with mmdebstrap and imports it, for machines that cannot pull from Docker Hub.
#   TORCH_WHEEL  a local CPU wheel of torch 2.13.0: served, with its dependencies from PyPI, as the TORCH_INDEX of
#                the build, for machines that cannot reach download.pytorch.org.
#   PIP_CERT     a CA bundle pip inside the build must trust (a TLS-intercepting proxy's), mounted into the build.
#   PODMAN_FLAGS extra flags of `podman build` and `podman run`, e.g. "--runtime runc" where crun cannot run with
#                this host's cgroups, "--ulimit nofile=N:N --ulimit nproc=N:N" where podman may not raise limits.
#   PYTHON       a Python with torch, numpy and tritonclient[http,grpc], for the client side (default: python3).
#   WORK         scratch directory (default /tmp/compilers-k8s-smoke); the image is localhost/compilers-serve:smoke.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/compilers-k8s-smoke}
BASE=${BASE:-python:3.11-slim}
PYTHON=${PYTHON:-python3}
IMAGE=localhost/compilers-serve:smoke
NAME=compilers-k8s-smoke
read -r -a FLAGS <<< "${PODMAN_FLAGS:-}"
mkdir -p "$WORK"
BUILD=(--network host)
SERVER_PID=
cleanup() {
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

if [ "$BASE" = debootstrap ]; then
    BASE=localhost/bookworm-python3:smoke
    if ! podman image exists "$BASE"; then
        echo "== a Debian bookworm base with python3 and python3-venv (mmdebstrap)"
        mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            --aptopt='APT::Install-Recommends "false"' bookworm "$WORK/bookworm.tar"
        podman import "$WORK/bookworm.tar" "$BASE"
        rm "$WORK/bookworm.tar"
    fi
fi
BUILD+=(--build-arg "BASE=$BASE")

if [ -n "${TORCH_WHEEL:-}" ]; then
    echo "== a local package index with $TORCH_WHEEL and its dependencies"
    rm -rf "$WORK/index" "$WORK/wheels" && mkdir -p "$WORK/index" "$WORK/wheels"
    cp "$TORCH_WHEEL" "$WORK/wheels/"
    "$PYTHON" -m pip download -q --dest "$WORK/wheels" --only-binary :all: --python-version 3.11 --implementation cp \
        --platform manylinux_2_28_x86_64 "$TORCH_WHEEL"
    for wheel in "$WORK"/wheels/*.whl; do          # the simple layout: index/<normalized name>/<file>
        project=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
        mkdir -p "$WORK/index/$project" && ln -sf "$wheel" "$WORK/index/$project/"
    done
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/index" > "$WORK/index.log" 2>&1 &
    SERVER_PID=$!
    BUILD+=(--build-arg "TORCH_INDEX=http://127.0.0.1:$PORT/")
fi

if [ -n "${PIP_CERT:-}" ]; then
    printf '[global]\ncert = /etc/pip-ca.crt\n' > "$WORK/pip.conf"
    BUILD+=(-v "$WORK/pip.conf:/etc/pip.conf:ro" -v "$PIP_CERT:/etc/pip-ca.crt:ro")
fi

echo "== build"
podman build "${FLAGS[@]}" "${BUILD[@]}" -f deploy/kubernetes/Dockerfile -t "$IMAGE" .
test "$(podman image inspect "$IMAGE" --format '{{.Config.User}}')" = 1000:1000

echo "== compile and publish examples/mlp.py with the image"
rm -rf "$WORK/models" "$WORK/out" && mkdir -p "$WORK/models" "$WORK/out" && chown 1000:1000 "$WORK/models" "$WORK/out"
RUN=(podman run --rm "${FLAGS[@]}" --entrypoint compilers -v "$PWD/examples:/examples:ro" -v "$WORK/out:/out"
     -v "$WORK/models:/models")
"${RUN[@]}" "$IMAGE" compile /examples/mlp.py:factory -t ort-cpu -o /out/mlp
"${RUN[@]}" "$IMAGE" publish /out/mlp /models/mlp

echo "== serve as deployment.yaml runs it"
HTTP=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
GRPC=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
podman run -d --name "$NAME" "${FLAGS[@]}" --user 1000:1000 --read-only --tmpfs /tmp --cap-drop ALL \
    --security-opt no-new-privileges -e HOME=/tmp -v "$WORK/models:/models:ro" \
    -p "127.0.0.1:$HTTP:8000" -p "127.0.0.1:$GRPC:8001" \
    "$IMAGE" /models --host 0.0.0.0 --port 8000 --grpc-port 8001
for _ in $(seq 120); do                            # as the startup probe: live answers once the models are loaded
    curl -sf "127.0.0.1:$HTTP/v2/health/live" >/dev/null && break
    podman container inspect "$NAME" --format '{{.State.Running}}' | grep -q true || { podman logs "$NAME"; exit 1; }
    sleep 1
done
test "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$HTTP/v2/health/live")" = 200
test "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$HTTP/v2/health/ready")" = 200
curl -sf "127.0.0.1:$HTTP/v2/models/mlp/infer" -d '{"inputs": [{"name": "input", "shape": [1, 64],
     "datatype": "FP32", "data": ['"$("$PYTHON" -c 'print(",".join(["0.5"] * 64))')"']}]}' | grep -q '"model_name":"mlp"'
curl -sf "127.0.0.1:$HTTP/metrics" | grep -q '^compilers_'
PYTHONPATH=examples "$PYTHON" - "$HTTP" "$GRPC" <<'EOF'
import sys

import numpy as np
import torch
import tritonclient.grpc
import tritonclient.http

import mlp

x = np.full((1, 64), 0.5, np.float32)
expected = mlp.factory()["model"](torch.from_numpy(x)).detach().numpy()
for client, port in ((tritonclient.http, sys.argv[1]), (tritonclient.grpc, sys.argv[2])):
    server = client.InferenceServerClient(f"127.0.0.1:{port}")
    assert server.is_server_ready()
    tensor = client.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    got = server.infer("mlp", [tensor]).as_numpy("output")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    print(f"{client.__name__} on {port}: the answer of eager")
EOF
echo "== written under /tmp in the container (the emptyDir of deployment.yaml):"
podman exec "$NAME" find /tmp -maxdepth 3

echo "== SIGTERM (podman stop, as the kubelet does)"
podman stop -t 40 "$NAME" >/dev/null
test "$(podman container inspect "$NAME" --format '{{.State.ExitCode}}')" = 0
podman logs "$NAME" 2>&1 | tail -n 3
echo "== smoke test passed: $IMAGE"
