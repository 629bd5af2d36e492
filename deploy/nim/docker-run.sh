#!/usr/bin/env bash
# Run the NVIDIA NIM embedding container on the exported ONNX folder (template; rendered by
# embed_assets.serving.deploy.render_nim_manifests). NGC_API_KEY is read from the environment at run time
# and never written into this file. Needs a GPU and `docker login nvcr.io` (user $oauthtoken, NGC key).
set -euo pipefail
: "${NGC_API_KEY:?export NGC_API_KEY first}"
mkdir -p "${NIM_CACHE_DIR}"
docker run -d --rm \
  --name "${NAME}" \
  --gpus "${GPUS}" \
  --shm-size=16g \
  -e NGC_API_KEY \
  -e NIM_CUSTOM_MODEL=/opt/nim/custom_model \
  -v "${MODEL_DIR}:/opt/nim/custom_model:ro" \
  -v "${NIM_CACHE_DIR}:/opt/nim/.cache" \
  -p "${HOST_PORT}:8000" \
  "${NIM_IMAGE}"
echo "waiting for http://127.0.0.1:${HOST_PORT}/v1/health/ready"
until curl -fsS "http://127.0.0.1:${HOST_PORT}/v1/health/ready" >/dev/null; do sleep 5; done
echo ready
