"""The Kubernetes and deployment configuration, validated by the libraries that consume it.

- the CUDA steps' ``dagster-k8s/config`` op tag and the step executor's config against dagster-k8s's schemas,
- the step Jobs dagster-k8s's own step handler builds for the real pipeline (a GPU step and a CPU step),
  with only the Kubernetes API call replaced by a recorder,
- the instance YAML files against Dagster's instance schema, and the Helm / compose files' structure.
"""

# No "from __future__ import annotations": the job factory below is loaded by Dagster's reconstruction.

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type, validate_config
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
from dagster._core.instance.config import dagster_instance_config
from dagster._core.test_utils import create_run_for_test, instance_for_test
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s import k8s_job_executor
from dagster_k8s.executor import K8sStepHandler
from dagster_k8s.job import (
    USER_DEFINED_K8S_CONFIG_KEY,
    USER_DEFINED_K8S_JOB_CONFIG_SCHEMA,
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)

from embed_assets.definitions import ALL_ASSETS, defs
from embed_assets.defs.common import GPU_OP_TAGS, GPU_TAGS, GROUP, SHARD_OP_TAGS
from embed_assets.defs.jobs import GPU_TAG_LIMITS, K8S_EXECUTOR_CONFIG, build_executor

REPO = Path(__file__).resolve().parents[1]
GPU_K8S = GPU_OP_TAGS[USER_DEFINED_K8S_CONFIG_KEY]
GPU_STEPS = {"mined_negatives", "checkpoint", "beir_metrics", "tensorrt_engine"}
IMAGE = "registry.example.com/embed-assets:test"

# A kubeconfig that only has to parse: nothing in these tests talks to a cluster.
_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: fake, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: fake, user: {}}]
contexts: [{name: fake, context: {cluster: fake, user: fake, namespace: dagster}}]
current-context: fake
"""


# ------------------------------------------------------------------------------ schemas of dagster-k8s
def test_gpu_op_tag_matches_dagster_k8s_schema() -> None:
    result = validate_config(USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, GPU_K8S)
    assert result.success, result.errors
    parsed = UserDefinedDagsterK8sConfig.from_dict(GPU_K8S)
    assert parsed.container_config["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert parsed.pod_spec_config["node_selector"] == {"nvidia.com/gpu.present": "true"}
    # What the step handler reads: the op tag as Dagster stores it on the step (a JSON string).
    from_tags = get_user_defined_k8s_config({USER_DEFINED_K8S_CONFIG_KEY: json.dumps(GPU_K8S)})
    assert from_tags.container_config == parsed.container_config
    assert from_tags.pod_spec_config == parsed.pod_spec_config


def test_gpu_op_tag_builds_a_gpu_pod() -> None:
    job_config = DagsterK8sJobConfig(
        job_image=IMAGE, dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance"
    )
    job = construct_dagster_k8s_job(
        job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-mined-negatives",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(GPU_K8S),
    )
    _assert_gpu_pod(job.to_dict()["spec"]["template"]["spec"])


def _assert_gpu_pod(pod: dict) -> None:
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in [
        {k: t[k] for k in ("key", "operator", "effect")} for t in pod["tolerations"]
    ]


def test_k8s_executor_config_matches_dagster_k8s_schema() -> None:
    config_type = resolve_to_config_type(k8s_job_executor.config_schema.config_type)
    result = process_config(config_type, K8S_EXECUTOR_CONFIG)
    assert result.success, result.errors
    assert (
        result.value["tag_concurrency_limits"]
        == GPU_TAG_LIMITS
        == [{"key": next(iter(GPU_TAGS)), "value": "cuda", "limit": 1}]
    )
    assert GPU_OP_TAGS[next(iter(GPU_TAGS))] == "cuda"  # the limit matches the tag the GPU steps carry

    executor = build_executor("k8s")
    assert executor.name == "gpu_aware_k8s"
    # .configured() validated the config already; the resolved executor config has no required field left.
    assert process_config(resolve_to_config_type(executor.config_schema.config_type), {}).success
    with pytest.raises(ValueError, match="multiprocess' or 'k8s"):
        build_executor("kubernetes")


def test_code_location_switches_to_the_k8s_executor() -> None:
    """What the Helm values do: EMBED_ASSETS_EXECUTOR=k8s in the code location's environment."""
    code = (
        "from embed_assets.definitions import defs\n"
        "job = defs.resolve_job_def('embed_pipeline')\n"
        "print(job.executor_def.name)"
    )
    env = {**os.environ, "EMBED_ASSETS_EXECUTOR": "k8s"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "gpu_aware_k8s"


# --------------------------------------------------- the step Jobs dagster-k8s builds for the real pipeline
def embed_pipeline_on_k8s() -> dg.JobDefinition:
    """The project's pipeline job with the k8s step executor (module level, so Dagster can reconstruct it)."""
    job = dg.define_asset_job(
        "embed_pipeline", selection=dg.AssetSelection.groups(GROUP), executor_def=build_executor("k8s")
    )
    return dg.Definitions(
        assets=ALL_ASSETS, jobs=[job], resources=defs.resources, executor=build_executor("k8s")
    ).resolve_job_def("embed_pipeline")


@pytest.fixture
def k8s_instance(tmp_path: Path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(_KUBECONFIG)
    launcher = {
        "module": "dagster_k8s",
        "class": "K8sRunLauncher",
        "config": {
            "service_account_name": "dagster",
            "instance_config_map": "dagster-instance",
            "dagster_home": "/opt/dagster/dagster_home",
            "job_image": IMAGE,
            "job_namespace": "dagster",
            "load_incluster_config": False,
            "kubeconfig_file": str(kubeconfig),
        },
    }
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        yield instance, str(kubeconfig)


def _launch_step_job(instance, kubeconfig: str, step_key: str, known_state=None) -> dict:
    """Let dagster-k8s's step handler launch ``step_key``; return the Kubernetes Job it submitted.

    ``known_state`` resolves dynamic steps (a chunking shard's key exists once its plan step has run)."""
    recon = dg.reconstructable(embed_pipeline_on_k8s)
    job_def = recon.get_definition()
    config = process_config(
        resolve_to_config_type(k8s_job_executor.config_schema.config_type), K8S_EXECUTOR_CONFIG
    )
    assert config.success, config.errors
    run = create_run_for_test(instance, job_name=job_def.name, job_code_origin=recon.get_python_origin())
    executor = k8s_job_executor.executor_creation_fn(
        InitExecutorContext(
            job=recon, executor_def=k8s_job_executor, executor_config=config.value, instance=instance
        )
    )
    plan = create_execution_plan(recon, known_state=known_state)
    plan_context = PlanOrchestrationContext(
        plan_data=PlanData(
            job=recon, dagster_run=run, instance=instance, execution_plan=plan, retry_mode=RetryMode.DISABLED
        ),
        log_manager=create_context_free_log_manager(instance, run),
        executor=executor,
        output_capture=None,
    )
    context = StepHandlerContext(
        instance=instance,
        plan_context=plan_context,
        steps=plan.steps,
        execute_step_args=ExecuteStepArgs(
            recon.get_python_origin(), run.run_id, [step_key], known_state=known_state
        ),
    )
    batch_api = mock.MagicMock()
    handler = K8sStepHandler(
        image=None,
        container_context=executor._step_handler._executor_container_context,  # the executor's step_k8s_config
        load_incluster_config=False,
        kubeconfig_file=kubeconfig,
        k8s_client_batch_api=batch_api,
    )
    list(handler.launch_step(context))
    calls = [c for c in batch_api.method_calls if c[0] == "create_namespaced_job"]
    assert len(calls) == 1, batch_api.method_calls
    _, _, kwargs = calls[0]
    assert kwargs["namespace"] == "dagster"
    return kwargs["body"].to_dict()


def test_step_pods_of_the_real_pipeline(k8s_instance) -> None:
    instance, kubeconfig = k8s_instance
    plan_steps = {s.key for s in create_execution_plan(dg.reconstructable(embed_pipeline_on_k8s)).steps}
    assert plan_steps >= GPU_STEPS | {"corpus"}

    gpu_job = _launch_step_job(instance, kubeconfig, "mined_negatives")
    pod = gpu_job["spec"]["template"]["spec"]
    _assert_gpu_pod(pod)
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    # The executor-wide requests are merged with the GPU request, not replaced by it.
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert "execute_step" in " ".join(container["args"])
    labels = gpu_job["metadata"]["labels"]
    assert labels["dagster/op"] == "mined_negatives"

    cpu_job = _launch_step_job(instance, kubeconfig, "corpus")
    pod = cpu_job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "1", "memory": "4Gi"}
    assert "nvidia.com/gpu" not in (resources.get("limits") or {})
    assert not pod.get("node_selector") and not pod.get("tolerations")


def test_chunking_shards_are_pods_of_their_own(k8s_instance) -> None:
    result = validate_config(USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, SHARD_OP_TAGS[USER_DEFINED_K8S_CONFIG_KEY])
    assert result.success, result.errors
    instance, kubeconfig = k8s_instance
    shards = ["shard_000", "shard_001"]  # what the plan step would have yielded
    known = KnownExecutionState(dynamic_mappings={"corpus_chunks.plan_chunk_shards": {"pending": shards}})
    for shard in shards:
        job = _launch_step_job(instance, kubeconfig, f"corpus_chunks.chunk_corpus_shard[{shard}]", known)
        pod = job["spec"]["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert resources["requests"] == {"cpu": "1", "memory": "2Gi"}  # the shard's own, not the executor's
        assert resources["limits"] == {"memory": "4Gi"} and not pod.get("node_selector")
        env = {e["name"]: e.get("value") or "" for e in pod["containers"][0]["env"]}
        assert env["DAGSTER_RUN_STEP_KEY"] == f"corpus_chunks.chunk_corpus_shard[{shard}]"  # its own step
        assert job["metadata"]["labels"]["dagster/op"] == f"corpus_chunks.chunk_corpus_shard-{shard}"


# ------------------------------------------------------------------------------- instance and deploy files
def test_instance_yaml_files_match_dagster_schema(tmp_path: Path) -> None:
    config, _ = dagster_instance_config(str(REPO), "dagster.yaml")
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]

    compose_dir = REPO / "deploy" / "compose"
    config, _ = dagster_instance_config(str(compose_dir), "dagster-instance.yaml")
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert set(config["storage"]) == {"postgres"}
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_helm_values_structure() -> None:
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] is True and coordinator["type"] == "QueuedRunCoordinator"
    assert values["concurrency"]["pools"]["defaultLimit"] == 1

    deployments = values["dagster-user-deployments"]["deployments"]
    assert len(deployments) == 1
    code = deployments[0]
    args = code["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == "embed_assets.definitions"
    env = {e["name"]: e.get("value") for e in code["env"]}
    assert env["EMBED_ASSETS_EXECUTOR"] == "k8s"
    # Steps run in separate pods: the artifact folder must be the same shared volume in runs and steps.
    home = env["EMBED_ASSETS_HOME"]
    assert home in [m["mountPath"] for m in code["volumeMounts"]]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert home in [m["mountPath"] for m in launcher["volumeMounts"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in code["volumes"] + launcher["volumes"]}
    assert len(claims) == 1
    assert "NVIDIA_API_KEY" not in yaml.safe_dump(values)  # the key comes from a secret, never from values


def test_compose_files_structure() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "code", "webserver", "daemon"} <= set(services)
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    workspace = yaml.safe_load((REPO / "deploy" / "compose" / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert server["host"] == "code" and server["location_name"] == "embed_assets"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f'"-p", "{server["port"]}"' in dockerfile  # the image serves the port the workspace dials
    assert "dagster-postgres" in dockerfile  # the instance's storage needs it
    code_env = services["code"].get("environment", {})
    assert code_env.get("EMBED_ASSETS_EXECUTOR", "multiprocess") != "k8s"  # one host: no k8s steps
    devices = services["code"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
