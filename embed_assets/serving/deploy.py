"""Render the NVIDIA NIM deployment templates in ``deploy/nim/`` for an exported ONNX folder.

The templates use ``${VAR}`` placeholders. Rendering fills every known one and refuses unknown ones, except
:data:`RUNTIME_VARIABLES` (secrets such as ``NGC_API_KEY``), which stay placeholders for the shell or
docker compose to resolve at run time so no secret is ever written to disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: The production target of DESIGN §3.
NIM_IMAGE = "nvcr.io/nim/nvidia/llama-3.2-nv-embedqa-1b-v2:latest"
#: Placeholders left for the runtime (never rendered).
RUNTIME_VARIABLES = frozenset({"NGC_API_KEY"})
TEMPLATE_FILES = ("docker-run.sh", "docker-compose.yaml", "kubernetes.yaml")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def default_templates_dir() -> Path:
    """``deploy/nim`` of the source checkout this package was imported from.

    Returns:
        The folder (it may not exist when the package was installed without the repository).
    """
    return Path(__file__).resolve().parents[2] / "deploy" / "nim"


def render_template(text: str, values: dict[str, Any]) -> str:
    """Replace ``${VAR}`` placeholders.

    Args:
        text: Template text.
        values: Placeholder values.

    Returns:
        The rendered text.

    Raises:
        KeyError: A placeholder has no value and is not a runtime variable.
        ValueError: A value contains a newline (it would break the YAML/shell structure).
    """

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in RUNTIME_VARIABLES:
            return match.group(0)
        if key not in values:
            raise KeyError(f"template placeholder ${{{key}}} has no value")
        value = str(values[key])
        if "\n" in value or "\r" in value:
            raise ValueError(f"value of {key} contains a newline")
        return value

    return _PLACEHOLDER.sub(substitute, text)


def render_nim_manifests(
    onnx_dir: str,
    out_dir: str,
    *,
    name: str = "embed-nim",
    image: str = NIM_IMAGE,
    port: int = 8000,
    namespace: str = "default",
    gpus: int = 1,
    replicas: int = 1,
    model_pvc: str = "embed-models",
    model_subpath: str | None = None,
    ngc_api_secret: str = "ngc-api",
    image_pull_secret: str = "ngc-secret",
    nim_cache_dir: str | None = None,
    templates_dir: str | None = None,
) -> dict[str, str]:
    """Render the docker run script, the compose file and the Kubernetes Deployment + Service.

    Args:
        onnx_dir: Exported ONNX folder, mounted read-only at ``/opt/nim/custom_model`` (``NIM_CUSTOM_MODEL``).
        out_dir: Where the rendered files go.
        name: Container / Deployment / Service name (a DNS-1123 label).
        image: NIM image.
        port: Host port (docker) and Service port (Kubernetes); the container listens on 8000.
        namespace: Kubernetes namespace.
        gpus: GPUs per container.
        replicas: Deployment replicas.
        model_pvc: PersistentVolumeClaim holding the ONNX folder (Kubernetes).
        model_subpath: Sub-path of the folder on that claim (default: the folder's name).
        ngc_api_secret: Kubernetes secret with key ``NGC_API_KEY``.
        image_pull_secret: Kubernetes docker-registry secret for nvcr.io.
        nim_cache_dir: Host folder for NIM's cache (docker; default ``~/.cache/nim``).
        templates_dir: Template folder (default :func:`default_templates_dir`).

    Returns:
        ``{template file name: rendered path}``.

    Raises:
        FileNotFoundError: The template folder or ``onnx_dir`` is missing.
        ValueError: ``name``/``namespace`` is not a DNS-1123 label, or a number is out of range.
    """
    templates = Path(templates_dir) if templates_dir else default_templates_dir()
    if not templates.is_dir():
        raise FileNotFoundError(f"NIM templates not found in {templates}; pass templates_dir=")
    model = Path(onnx_dir).resolve()
    if not model.is_dir():
        raise FileNotFoundError(f"ONNX folder {model} does not exist")
    for label, value in (("name", name), ("namespace", namespace)):
        if not _DNS_LABEL.match(value):
            raise ValueError(
                f"{label}={value!r} is not a valid Kubernetes name (lowercase letters, digits, '-')"
            )
    if not (0 < port < 65536 and gpus >= 1 and replicas >= 0):
        raise ValueError(f"invalid port={port}, gpus={gpus} or replicas={replicas}")
    values = {
        "NAME": name,
        "NAMESPACE": namespace,
        "NIM_IMAGE": image,
        "HOST_PORT": port,
        "SERVICE_PORT": port,
        "GPUS": gpus,
        "REPLICAS": replicas,
        "MODEL_DIR": str(model),
        "MODEL_PVC": model_pvc,
        "MODEL_SUBPATH": model_subpath or model.name,
        "NGC_API_SECRET": ngc_api_secret,
        "IMAGE_PULL_SECRET": image_pull_secret,
        "NIM_CACHE_DIR": nim_cache_dir or str(Path("~/.cache/nim").expanduser()),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for filename in TEMPLATE_FILES:
        target = out / filename
        target.write_text(
            render_template((templates / filename).read_text(encoding="utf-8"), values), encoding="utf-8"
        )
        if filename.endswith(".sh"):
            os.chmod(target, 0o755)
        written[filename] = str(target)
    return written
