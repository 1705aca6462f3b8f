"""infra/ against the project: one image and Ray version everywhere, real `reelforge` commands, wired services, and
nothing exposed: Ray and MLflow ask for a token or a login, NetworkPolicies fence them, ports are published on
loopback only, and every password comes from a Secret or a file.

Reads files only (PyYAML, the CLI's argparse parser, the launcher schema that ships with Ray): no network, Docker or
cluster. The KubeRay field names checked here are those of KubeRay's ray.io/v1 Go types.
"""

from __future__ import annotations

import argparse
import configparser
import fnmatch
import importlib.metadata
import importlib.util
import ipaddress
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
LAUNCHER = INFRA / "cluster-launcher" / "aws.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_K8S = INFRA / "mlflow" / "k8s.yaml"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
MLFLOW_AUTH_INI = INFRA / "mlflow" / "basic_auth.ini"
SECRETS_ENV = INFRA / "mlflow" / "secrets-env.sh"
INFRA_README = INFRA / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Keys of KubeRay's ray.io/v1 types (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, RayJobSpec): a misspelt key is
# dropped by the API server without a word, so it is caught here instead.
RAYCLUSTER_SPEC_KEYS = {
    "suspend",
    "authOptions",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP_KEYS = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTOSCALER_KEYS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "env",
    "envFrom",
    "volumeMounts",
    "version",
}
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionPolicy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------------------- readers


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, parts = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, rest = " ".join(parts).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        parts = []
    return instructions


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Default values of the ARGs declared before the first FROM."""
    args = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = substitute(value.strip(), args)
    return args


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def documented_image() -> str:
    """The tag in the Dockerfile's documented build command: the image every manifest must run."""
    match = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert match, "infra/Dockerfile must document its build command: docker build -f infra/Dockerfile -t IMAGE ."
    return match.group(1)


def ray_pods(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, pod spec) for the head and each worker group of a RayCluster spec."""
    head = cluster_spec["headGroupSpec"]
    pods = [("head", head, head["template"]["spec"])]
    pods += [(g["groupName"], g, g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return pods


def cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("raycluster.yaml", one(load_docs(RAYCLUSTER), "RayCluster")["spec"]),
        ("rayjob.yaml", one(load_docs(RAYJOB), "RayJob")["spec"]["rayClusterSpec"]),
    ]


def ray_containers() -> list[tuple[str, dict, dict]]:
    """(where, Ray container, pod spec); KubeRay takes the first container of each pod as the Ray container."""
    return [
        (f"{name}:{group}", pod["containers"][0], pod)
        for name, spec in cluster_specs()
        for group, _, pod in ray_pods(spec)
    ]


def env_value(container: dict, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var.get("value")
    return None


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def server_options(argv: list[str]) -> dict[str, str]:
    """`--flag=value`, `--flag value` and bare `--flag` of an `mlflow server` command line."""
    options = {}
    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        name, eq, value = token.partition("=")
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        options[name] = value
    return options


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def compose_interpolate(argv: list[str]) -> list[str]:
    """Docker Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, each replaced by a stand-in value."""
    return [re.sub(r"\$\{(\w+)[^}]*\}", lambda m: m.group(1).lower(), token) for token in argv]


SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def reelforge_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after `reelforge` when the tokens run it directly or after `ray job submit ... --`."""
    start = None
    if tokens and tokens[0] == "reelforge":
        start = 1
    elif "--" in tokens:
        i = tokens.index("--")
        if i + 1 < len(tokens) and tokens[i + 1] == "reelforge":
            start = i + 2
    if start is None:
        return None
    argv = []
    for token in tokens[start:]:
        if token in SHELL_OPERATORS:
            break
        argv.append(token)
    return argv


def reelforge_commands() -> list[tuple[str, list[str]]]:
    """Every `reelforge` command infra/ runs or tells people to run: RayJob entrypoints, the shell lines of
    infra/README.md's code blocks, and `... -- reelforge ...` examples in the manifests' comments."""
    commands = []
    for doc in load_docs(RAYJOB):
        if doc.get("kind") == "RayJob":
            argv = reelforge_argv(shlex.split(doc["spec"]["entrypoint"]))
            assert argv is not None, f"the RayJob entrypoint does not run reelforge: {doc['spec']['entrypoint']}"
            commands.append(("rayjob.yaml entrypoint", argv))
    in_block = False
    for number, line in enumerate(INFRA_README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block and (argv := reelforge_argv(shlex.split(line, comments=True))) is not None:
            commands.append((f"infra/README.md:{number}", argv))
    for path in [RAYCLUSTER, RAYJOB, LAUNCHER, COMPOSE, MLFLOW_K8S, DOCKERFILE]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.strip()
            if comment.startswith("#") and " -- reelforge " in comment:
                argv = reelforge_argv(shlex.split(comment.lstrip("# ")))
                if argv is not None:
                    commands.append((f"infra/{path.relative_to(INFRA)}:{number}", argv))
    return commands


def cli_parser() -> argparse.ArgumentParser:
    from pipelines.cli import build_parser

    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices
    }


def config_paths(argv: list[str]) -> list[str]:
    paths = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--config"]
    return paths + [token.split("=", 1)[1] for token in argv if token.startswith("--config=")]


def option_value(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def mlflow_server_container() -> tuple[dict, dict]:
    docs = load_docs(MLFLOW_K8S)
    deployment = one(docs, "Deployment")
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def mlflow_service() -> dict:
    return one(load_docs(MLFLOW_K8S), "Service")


def secret_env(container: dict) -> dict[str, dict]:
    """Environment variables a container takes from a Secret: name -> the secretKeyRef."""
    return {
        var["name"]: var["valueFrom"]["secretKeyRef"]
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }


def compose_default(text: str) -> str:
    """What Docker Compose makes of ${VAR:-default} / ${VAR-default} with VAR unset: the default."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)


def compose_port(entry: str | int | dict) -> tuple[str | None, str, str]:
    """(host address or None for every interface, host port, container port) of a compose `ports` entry."""
    if isinstance(entry, dict):  # the long syntax
        return entry.get("host_ip"), str(entry.get("published", "")), str(entry["target"])
    parts = compose_default(str(entry)).split("/")[0].rsplit(":", 2)
    if len(parts) == 1:  # "5000": a random host port on every interface
        return None, "", parts[0]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return parts[0].strip("[]"), parts[1], parts[2]


def is_loopback(address: str | None) -> bool:
    if address in (None, ""):
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def network_policies() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in (RAYCLUSTER, RAYJOB, MLFLOW_K8S)
        for doc in load_docs(path)
        if doc.get("kind") == "NetworkPolicy"
    ]


def selects(selector: dict, labels: dict) -> bool:
    """A label selector's matchLabels / matchExpressions (In, NotIn, Exists, DoesNotExist) against labels."""
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def policy_ports(rule: dict) -> set[int] | None:
    """The ports an ingress rule opens; None when it opens every port."""
    return {int(port["port"]) for port in rule["ports"]} if rule.get("ports") else None


def admits(policy: dict, labels: dict, port: int, namespace: str = "reelforge") -> bool:
    """Whether `policy` lets a pod with `labels` in `namespace` connect to `port` of the pods it selects."""
    for rule in policy["spec"].get("ingress", []):
        opened = policy_ports(rule)
        if opened is not None and port not in opened:
            continue
        for peer in rule.get("from", []):
            if "ipBlock" in peer:
                continue
            if "namespaceSelector" in peer:
                namespace_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
            else:
                namespace_ok = namespace == policy["metadata"]["namespace"]
            if namespace_ok and selects(peer.get("podSelector", {}), labels):
                return True
    return False


def pod_labels(template: dict) -> dict:
    return template.get("metadata", {}).get("labels", {})


def ray_pod_labels() -> list[tuple[str, str, dict]]:
    """(where, group, pod labels) of the head and each worker group of both cluster specs."""
    return [
        (where, group["groupName"] if "groupName" in group else "head", pod_labels(group["template"]))
        for where, spec in cluster_specs()
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    ]


# ---------------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    "path, kinds",
    [
        (
            RAYCLUSTER,
            {("v1", "PersistentVolumeClaim"), ("networking.k8s.io/v1", "NetworkPolicy"), ("ray.io/v1", "RayCluster")},
        ),
        (RAYJOB, {("ray.io/v1", "RayJob")}),
        (
            MLFLOW_K8S,
            {
                ("v1", "Namespace"),
                ("apps/v1", "Deployment"),
                ("v1", "Service"),
                ("networking.k8s.io/v1", "NetworkPolicy"),
            },
        ),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_kubernetes_manifests_parse_with_their_kinds(path, kinds):
    docs = load_docs(path)
    assert {(doc.get("apiVersion"), doc.get("kind")) for doc in docs} == kinds
    for doc in docs:
        assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} without metadata.name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "reelforge", f"{path.name}: {doc['kind']} outside reelforge"


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else None)
def test_ray_cluster_specs_use_kuberay_fields(where, spec):
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, f"{where}: unknown RayCluster keys {set(spec) - RAYCLUSTER_SPEC_KEYS}"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_KEYS
    head = spec["headGroupSpec"]
    assert HEAD_GROUP_REQUIRED <= set(head) <= HEAD_GROUP_KEYS, f"{where}: head group keys {sorted(head)}"
    for group in spec["workerGroupSpecs"]:
        assert WORKER_GROUP_REQUIRED <= set(group) <= WORKER_GROUP_KEYS, f"{where}: {group.get('groupName')} keys"
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    for group, params, pod in [(name, g["rayStartParams"], p) for name, g, p in ray_pods(spec)]:
        # rayStartParams is map[string]string in KubeRay: an unquoted 0 or 4 is rejected by the API server.
        assert all(isinstance(v, str) for v in params.values()), f"{where}:{group}: quote every rayStartParams value"
        for container in pod["containers"]:
            assert container.get("image"), f"{where}:{group}: a container without an image"
            limits = container.get("resources", {}).get("limits", {})
            assert {"cpu", "memory"} <= set(limits), f"{where}:{group}: resources.limits needs cpu and memory"


def test_rayjob_runs_the_workflow_on_its_own_cluster():
    spec = one(load_docs(RAYJOB), "RayJob")["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, f"unknown RayJob keys {set(spec) - RAYJOB_SPEC_KEYS}"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "a RayJob takes a cluster spec or a selector"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].split()[:2] == ["reelforge", "run"]
    # The job's working_dir is the image's copy of the repository, so relative config paths resolve there.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    workdirs = [rest for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()) if keyword == "WORKDIR"]
    assert runtime_env["working_dir"] == workdirs[-1]


# ------------------------------------------------------------------------------------------------ image and Ray


def test_the_image_is_the_same_everywhere():
    image = documented_image()
    name, _, tag = image.rpartition(":")
    assert tag == PYPROJECT["project"]["version"], f"the image tag {tag} is not the project version"
    readme_tags = re.findall(r"docker build -f infra/Dockerfile -t (\S+) \.", INFRA_README.read_text())
    assert readme_tags and set(readme_tags) == {image}, f"infra/README.md builds {readme_tags}, not {image}"
    for where, container, _ in ray_containers():
        assert container["image"] == image, f"{where} runs {container['image']}"
    submitter = one(load_docs(RAYJOB), "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"] == image, f"the RayJob submitter runs {submitter['image']}"
    launcher = yaml.safe_load(LAUNCHER.read_text())
    docker = launcher["docker"]
    assert docker["image"] == image
    for key in ("head_image", "worker_image"):
        assert docker.get(key, image) == image, f"aws.yaml docker.{key}"
    for type_name, node_type in launcher["available_node_types"].items():
        assert node_type.get("docker", {}).get("worker_image", image) == image, f"aws.yaml {type_name}"


def test_dockerfile_ray_is_the_installed_ray_and_the_clusters_ray():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = dockerfile_args(instructions)
    ray_version = args.get("RAY_VERSION")
    installed = importlib.metadata.version("ray")
    assert ray_version == installed, f"infra/Dockerfile RAY_VERSION={ray_version}, the project's Ray is {installed}"
    ray_requirement = next(
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray"
    )
    assert ray_requirement.specifier.contains(ray_version), f"Ray {ray_version} is outside {ray_requirement}"

    base = substitute(next(rest for keyword, rest in instructions if keyword == "FROM"), args)
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-(gpu|cu\d+)", base)
    assert match, f"unexpected base image {base}"
    assert match["ray"] == ray_version
    python = f"{match['py']}.{match['minor']}"
    assert python == "3.11" and SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python)
    # Installing the project must not move Ray off the base's version.
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"ray\[[\w,]+\]==\$\{RAY_VERSION\}", runs), "pin ray==${RAY_VERSION} in the pip install"

    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, f"{where} rayVersion {spec['rayVersion']}"


def test_dockerfile_installs_the_project_and_no_ffmpeg():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    assert any(re.search(r"pip install\b[^&;|]*\s\.(\s|$)", run) for run in runs), "no `pip install .`"
    apt_installs = [run for run in runs if re.search(r"apt(-get)? install", run)]
    assert apt_installs and all("ffmpeg" not in run for run in apt_installs), "PyAV and decord ship their FFmpeg"
    apt_packages = " ".join(apt_installs).split()
    assert "g++" in apt_packages and "ninja-build" in apt_packages, "DeepSpeed's JIT ops need g++ and ninja"

    copied = {
        Path(src).parts[0]
        for keyword, rest in instructions
        if keyword == "COPY"
        for src in [t for t in rest.split() if not t.startswith("--")][:-1]
    }
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", "README.md", "configs"} | packages <= copied, f"COPY misses {packages - copied}"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must end as a non-root user"
    assert any(keyword == "WORKDIR" for keyword, _ in instructions)

    # The build context is the repository root: .dockerignore must let back in everything the Dockerfile copies.
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore should allow-list the build context"
    assert {f"!{name}" for name in copied} <= set(patterns), f".dockerignore drops {copied}"


# ----------------------------------------------------------------------------------------------- entrypoints


def test_reelforge_commands_are_cli_subcommands():
    commands = reelforge_commands()
    assert any(where == "rayjob.yaml entrypoint" for where, _ in commands)
    used = {argv[0] for _, argv in commands}
    missing = used - subcommands(cli_parser())
    assert not missing, f"infra/ runs `reelforge {' / '.join(sorted(missing))}`, which the CLI does not have yet"


@pytest.mark.parametrize("where, argv", reelforge_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_reelforge_commands_parse(where, argv):
    parser = cli_parser()
    if argv[0] not in subcommands(parser):
        pytest.fail(f"{where}: no subcommand `reelforge {argv[0]}` (see test_reelforge_commands_are_cli_subcommands)")
    try:
        parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `reelforge {' '.join(argv)}` does not parse")


def test_config_files_named_by_commands_exist():
    named: dict[str, list[str]] = {}
    for where, argv in reelforge_commands():
        for path in config_paths(argv):
            named.setdefault(path, []).append(where)
    assert named, "no command names a --config"
    missing = {path: wheres for path, wheres in named.items() if not (ROOT / path).is_file()}
    assert not missing, f"config files named in infra/ but absent from the repository: {missing}"


def test_run_workdir_is_on_the_volume_every_pod_mounts():
    pvc = one(load_docs(RAYCLUSTER), "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "head and workers on different nodes share it"
    spec = one(load_docs(RAYJOB), "RayJob")["spec"]
    workdir = option_value(shlex.split(spec["entrypoint"]), "--workdir")
    assert workdir, "the head runs no tasks, so `reelforge run` needs a --workdir that worker pods see"
    for where, container, pod in ray_containers():
        claims = {
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims]
        assert mounts, f"{where} does not mount {pvc['metadata']['name']}"
        if where.startswith("rayjob.yaml"):
            assert any(Path(workdir).is_relative_to(m) for m in mounts), f"{where}: {workdir} is not shared"


# --------------------------------------------------------------------------------------------------- resources


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else None)
def test_head_takes_no_work_and_gpu_groups_advertise_their_gpus(where, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: work must not land on the head"
    # The Jobs API must be reachable from the submitter, so the dashboard listens on the pod's address (KubeRay's
    # default too); test_ray_token_auth_from_a_secret and test_network_policy_fences_the_ray_pods make that safe.
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0", f"{where}: no Jobs API for submitters"
    assert gpu_limit(head["template"]["spec"]["containers"][0]) == 0
    assert spec.get("enableInTreeAutoscaling") is True
    groups = {name: (group, pod["containers"][0], pod) for name, group, pod in ray_pods(spec)[1:]}
    assert any(gpu_limit(c) == 0 for _, c, _ in groups.values()), f"{where}: no CPU group for curation"
    gpu_groups = {name: v for name, v in groups.items() if gpu_limit(v[1]) > 0}
    assert gpu_groups, f"{where}: no GPU group"
    for name, (group, container, pod) in gpu_groups.items():
        resources = container["resources"]
        assert group["rayStartParams"].get("num-gpus") == str(resources["limits"][GPU]), f"{where}:{name}"
        # Kubernetes does not overcommit extended resources: a GPU request must equal its limit.
        assert str(resources.get("requests", {}).get(GPU, resources["limits"][GPU])) == str(resources["limits"][GPU])
        assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), f"{where}:{name}: tolerate GPU taints"
    for name, (group, _, _) in groups.items():
        if name not in gpu_groups:
            assert "num-gpus" not in group["rayStartParams"] or group["rayStartParams"]["num-gpus"] == "0"


def test_every_ray_pod_has_a_memory_backed_dev_shm():
    for where, container, pod in ray_containers():
        shm = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{where}: no /dev/shm mount (a container's default is 64 MiB)"
        volume = next(v for v in pod["volumes"] if v["name"] == shm[0])
        assert volume.get("emptyDir", {}).get("medium") == "Memory", f"{where}: /dev/shm must be memory-backed"


# ------------------------------------------------------------------------------------------------------- MLflow


def test_ray_pods_report_to_the_mlflow_service():
    service = mlflow_service()
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    hosts = {name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"}
    port = service["spec"]["ports"][0]["port"]
    deployment, server = mlflow_server_container()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no MLflow pod"
    target = service["spec"]["ports"][0]["targetPort"]
    assert any(target in (p.get("name"), p["containerPort"]) for p in server["ports"])
    allowed = server_options(as_argv(server["args"])).get("--allowed-hosts", "").split(",")

    for where, container, _ in ray_containers():
        uri = env_value(container, "MLFLOW_TRACKING_URI")
        assert uri, f"{where}: MLFLOW_TRACKING_URI is not set"
        parsed = urlparse(uri)
        assert parsed.scheme == "http" and parsed.hostname in hosts and parsed.port == port, f"{where}: {uri}"
        # MLflow answers only Host headers it allows (mlflow.server.security_utils matches with fnmatch).
        host_header = parsed.netloc
        assert any(fnmatch.fnmatch(host_header, a) if "*" in a else host_header == a for a in allowed), (
            f"--allowed-hosts in {MLFLOW_K8S.name} rejects Host: {host_header}"
        )


def test_mlflow_on_kubernetes_uses_postgres_s3_and_a_secret():
    _, server = mlflow_server_container()
    argv = as_argv(server["args"])
    options = server_options(argv)
    backend = options["--backend-store-uri"]
    assert urlparse(options["--artifacts-destination"]).scheme == "s3"
    assert "--serve-artifacts" in argv
    # No password in the URI (args are visible to anyone who can read the pod); libpq reads PGPASSWORD, and every
    # piece of the URI that names the database comes from the Secret too.
    match = re.fullmatch(r"postgresql(\+\w+)?://(?P<user>[^:@/]+)@(?P<host>[^:/]+)(:\d+)?/(?P<database>\S+)", backend)
    assert match, f"the backend URI is postgresql://USER@HOST:PORT/DATABASE with no password, not {backend}"
    from_secrets = secret_env(server)
    assert "PGPASSWORD" in from_secrets, "the database password must come from a Secret (PGPASSWORD)"
    for part in (match["user"], match["host"], match["database"]):
        assert re.fullmatch(r"\$\((\w+)\)", part or "") and part[2:-1] in from_secrets, (
            f"{part}: the database user, host and name come from the Secret, not the manifest"
        )


def test_compose_mlflow_uses_postgres_and_s3():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    argv = compose_interpolate(as_argv(mlflow["command"]))
    options = server_options(argv)
    backend = urlparse(options["--backend-store-uri"])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    destination = urlparse(options["--artifacts-destination"])
    assert destination.scheme == "s3"
    # 0.0.0.0 is the container's interface; test_compose_publishes_on_loopback_only checks what the host exposes.
    assert "--serve-artifacts" in argv and options["--host"] == "0.0.0.0"
    assert urlparse(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert f'Bucket="{destination.netloc}"' in "".join(as_argv(services["create-bucket"]["command"]))
    for name in ("postgres", "minio", "mlflow"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    published = [compose_port(entry) for entry in mlflow["ports"]]
    assert any(container == options["--port"] for _, _, container in published), "the server's port is not published"
    _, server = mlflow_server_container()
    assert mlflow["image"] == server["image"], "compose and Kubernetes should run the same MLflow server image"


# ------------------------------------------------------------------------------------------------ the launcher


def test_launcher_config_passes_rays_schema():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert {"cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"} <= set(config)
    spec = importlib.util.find_spec("ray")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json" if spec and spec.origin else None
    if schema_path is None or not schema_path.is_file():
        pytest.skip("Ray's launcher schema (ray/autoscaler/ray-schema.json) is not installed")
    import jsonschema

    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_launcher_nodes_image_and_gpus():
    config = yaml.safe_load(LAUNCHER.read_text())
    provider = config["provider"]
    assert provider["type"] == "aws" and provider["region"]
    assert all(zone.startswith(provider["region"]) for zone in provider["availability_zone"].split(","))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node_type in types.items():
        instance = node_type["node_config"]["InstanceType"]
        gpus = node_type["resources"].get("GPU", 0)
        is_gpu_family = re.match(r"[gp]\d", instance) is not None
        assert (gpus > 0) == is_gpu_family, f"aws.yaml {name}: {instance} with resources GPU={gpus}"
        # Ray's built-in default AMI is too old for the image's CUDA; every node type names its own.
        assert node_type["node_config"].get("ImageId"), f"aws.yaml {name}: set an ImageId"
        if name != config["head_node_type"]:
            assert node_type.get("min_workers", 0) <= node_type["max_workers"] <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])

    run_options = " ".join(config["docker"]["run_options"])
    uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", run_options)
    assert uri, "aws.yaml: pass MLFLOW_TRACKING_URI into the containers"
    compose_mlflow = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    compose_port = server_options(compose_interpolate(as_argv(compose_mlflow["command"])))
    assert urlparse(uri.group(1)).port == int(compose_port["--port"]), "the launcher points at the compose server"


# ------------------------------------------------------------------------------------------------ nothing exposed

RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard / Jobs API, Ray Client
# Names of variables whose value is a credential (AWS_ACCESS_KEY_ID is an identifier, but is kept secret all the same).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|_KEY$", re.IGNORECASE)
# A URI with a password in it: scheme://user:password@host, the password maybe a ${VARIABLE:?message} of compose.
URI_PASSWORD = re.compile(r"[a-z][\w+.-]*://[^/\s:@]+:(\$\{[^}]*\}|[^/\s@])+@", re.IGNORECASE)


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else None)
def test_ray_token_auth_from_a_secret(where, spec):
    auth = spec.get("authOptions", {})
    assert auth.get("mode") == "token", f"{where}: set authOptions.mode: token (KubeRay >= 1.5.1)"
    secret = auth.get("secretName")
    assert secret, f"{where}: name the token's Secret in authOptions.secretName (one token for clients and clusters)"
    containers = [(f"{where}:{group}", pod["containers"][0]) for group, _, pod in ray_pods(spec)]
    containers.append((f"{where}:autoscaler", spec.get("autoscalerOptions", {})))
    if where == "rayjob.yaml":
        job = one(load_docs(RAYJOB), "RayJob")["spec"]
        containers.append(("rayjob.yaml:submitter", job["submitterPodTemplate"]["spec"]["containers"][0]))
    for name, container in containers:
        assert env_value(container, "RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE must be token"
        ref = secret_env(container).get("RAY_AUTH_TOKEN")
        assert ref == {"name": secret, "key": "auth_token"}, f"{name}: RAY_AUTH_TOKEN must come from Secret {secret}"


def test_network_policy_fences_the_ray_pods():
    policies = [policy for where, policy in network_policies() if where == RAYCLUSTER.name]
    assert policies, "raycluster.yaml has no NetworkPolicy"
    pods = [(f"{where}:{group}", labels) for where, group, labels in ray_pod_labels()]
    heads = [(name, labels) for name, labels in pods if name.endswith(":head")]
    for name, labels in pods:
        fencing = [
            p
            for p in policies
            if selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        ]
        assert fencing, f"{name}: no NetworkPolicy selects this pod (labels {labels})"
        for policy in fencing:
            for rule in policy["spec"].get("ingress", []):
                # A rule without `from` admits every source; an empty podSelector every pod of the namespaces.
                assert rule.get("from"), f"{policy['metadata']['name']}: an ingress rule open to every source"
                for peer in rule["from"]:
                    assert "ipBlock" not in peer, f"{policy['metadata']['name']}: admit pods by label, not addresses"
                    assert peer.get("podSelector", {}).get("matchLabels") or peer.get("podSelector", {}).get(
                        "matchExpressions"
                    ), f"{policy['metadata']['name']}: a peer that admits every pod of a namespace"
        # Ray's own pods reach each other on every port; a pod of some other app does not.
        for _, other in pods:
            assert any(admits(p, other, 6379) and admits(p, other, 45678) for p in fencing), (
                f"{name}: Ray pods cut off"
            )
        for port in RAY_PORTS:
            assert not any(admits(p, {"app": "something-else"}, port) for p in fencing), f"{name}: {port} is open"
            assert not any(admits(p, {}, port, namespace="default") for p in fencing), f"{name}: {port} is open"

    # The RayJob's submitter and KubeRay reach the Jobs API, and nothing but the Ray pods reaches the GCS.
    submitter = pod_labels(one(load_docs(RAYJOB), "RayJob")["spec"]["submitterPodTemplate"])
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    for name, labels in heads:
        fencing = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert any(admits(p, submitter, 8265) for p in fencing), f"{name}: the RayJob submitter cannot reach 8265"
        assert any(admits(p, operator, 8265, namespace="kuberay-system") for p in fencing), f"{name}: KubeRay cut off"
        assert not any(admits(p, submitter, 6379) for p in fencing), f"{name}: the submitter needs no GCS access"

    # rayjob.yaml's instructions apply the policy along with the shared volume (`kubectl apply -l ...`).
    selector = re.search(r"raycluster\.yaml -l '([^']+)'", RAYJOB.read_text())
    assert selector, "rayjob.yaml should say how to apply raycluster.yaml's volume and NetworkPolicy"
    key, values = re.fullmatch(r"([\w./-]+) in \(([^)]*)\)", selector.group(1)).groups()
    for policy in policies:
        assert policy["metadata"]["labels"].get(key) in values.split(","), "the rayjob.yaml path skips the policy"


def test_mlflow_asks_for_a_login_everywhere():
    _, server = mlflow_server_container()
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    for where, argv in [("k8s.yaml", as_argv(server["args"])), ("docker-compose.yaml", as_argv(compose["command"]))]:
        assert server_options(argv).get("--app-name") == "basic-auth", f"{where}: run MLflow's basic-auth app"
    cmd = next(rest for keyword, rest in dockerfile_instructions(MLFLOW_DOCKERFILE.read_text()) if keyword == "CMD")
    assert "basic-auth" in json.loads(cmd), "the MLflow image's default command must ask for a login too"
    runs = " ".join(
        rest for keyword, rest in dockerfile_instructions(MLFLOW_DOCKERFILE.read_text()) if keyword == "RUN"
    )
    assert re.search(r"mlflow\[[\w,]*\bauth\b[\w,]*\]==", runs), "the basic-auth app needs mlflow[auth] (Flask-WTF)"

    # The admin password and the CSRF key come from a Secret (Kubernetes) or a Docker secret file (compose).
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert name in secret_env(server), f"k8s.yaml: {name} must come from a Secret"
        path = compose["environment"].get(f"{name}_FILE", "")
        assert path.startswith("/run/secrets/") and Path(path).name in compose["secrets"], f"compose: {name}_FILE"
    # Users must survive a restart: the auth database is the tracking PostgreSQL (via libpq's PG* variables), and
    # the file carries no admin password.
    ini = configparser.ConfigParser()
    ini.read_string(MLFLOW_AUTH_INI.read_text())
    assert ini["mlflow"]["database_uri"].startswith("postgresql"), "keep MLflow's users in PostgreSQL"
    assert not ini["mlflow"].get("admin_password"), "basic_auth.ini must not hold the admin password"
    env = {
        k: v
        for k, v in (
            i.split(" ", 1)[1].split("=", 1)
            for i in [
                f"ENV {rest}"
                for keyword, rest in dockerfile_instructions(MLFLOW_DOCKERFILE.read_text())
                if keyword == "ENV"
            ]
        )
    }
    assert env.get("MLFLOW_AUTH_CONFIG_PATH", "").endswith("basic_auth.ini")

    # Ray pods sign in with the login of a Secret.
    for where, container, _ in ray_containers():
        refs = secret_env(container)
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(refs), f"{where}: no MLflow login"


def test_network_policy_fences_mlflow():
    deployment, _ = mlflow_server_container()
    labels = pod_labels(deployment["spec"]["template"])
    port = mlflow_service()["spec"]["ports"][0]["port"]
    fencing = [p for where, p in network_policies() if selects(p["spec"]["podSelector"], labels)]
    assert fencing, "k8s.yaml: no NetworkPolicy selects the MLflow pod"
    for where, group, ray_labels in ray_pod_labels():
        assert any(admits(p, ray_labels, port) for p in fencing), f"{where}:{group} cannot reach MLflow"
    assert not any(admits(p, {"app": "something-else"}, port) for p in fencing), "MLflow is open to every pod"
    assert not any(admits(p, {}, port, namespace="default") for p in fencing), "MLflow is open to other namespaces"


def test_compose_publishes_on_loopback_only():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {name: [compose_port(p) for p in service.get("ports", [])] for name, service in services.items()}
    assert published["mlflow"], "the MLflow server is not published at all"
    for name, ports in published.items():
        for host_ip, _, container in ports:
            assert is_loopback(host_ip), f"compose {name}: port {container} is published on every interface"
    # With the defaults, and reachable beyond loopback only by choice (MLFLOW_PUBLISH_ADDRESS), with the login on.
    assert services["postgres"].get("ports") is None and "5432" not in str(services["postgres"].get("expose", ""))


def test_compose_passwords_are_docker_secrets():
    compose = yaml.safe_load(COMPOSE.read_text())
    declared = compose.get("secrets", {})
    for name, source in declared.items():
        assert set(source) == {"file"} and source["file"].startswith("./secrets/"), f"secret {name}: a file please"
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"compose {name}: use the mapping form of environment"
        for key, value in environment.items():
            if key.endswith("_FILE"):
                assert str(value).startswith("/run/secrets/") and Path(value).name in service.get("secrets", []), (
                    f"compose {name}: {key} names a secret the service does not mount"
                )
            elif SECRET_NAME.search(key):
                pytest.fail(f"compose {name}: {key} is set directly; use {key}_FILE and a Docker secret")
            # Interpolating a credential from the shell would leave it in `docker inspect` and the process table.
            for variable in re.findall(r"\$\{(\w+)", str(value)):
                assert not SECRET_NAME.search(variable), f"compose {name}: {key} interpolates ${{{variable}}}"
    # The secret files stay out of git and out of the image's build context.
    assert "secrets/" in (INFRA / "mlflow" / ".gitignore").read_text().split()
    assert "secrets" in (INFRA / "mlflow" / ".dockerignore").read_text().split()


def containers_in(node) -> Iterator[dict]:
    """Every container-like mapping in a manifest (one with an image or an env list): pods' containers and init
    containers, the RayJob submitter, KubeRay's autoscalerOptions."""
    if isinstance(node, dict):
        if "image" in node or isinstance(node.get("env"), list):
            yield node
        for value in node.values():
            yield from containers_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers_in(item)


NOT_CREDENTIALS = {"RAY_AUTH_TOKEN_PATH"}  # where the token file is, not the token


def test_no_password_literal_in_any_command_args_or_env():
    found = []
    for path in (RAYCLUSTER, RAYJOB, MLFLOW_K8S):
        for doc in load_docs(path):
            for container in containers_in(doc):
                where = f"{path.name}:{container.get('name', 'autoscaler')}"
                argv = as_argv(container.get("command", [])) + as_argv(container.get("args", []))
                found += [f"{where} args: {token}" for token in argv if URI_PASSWORD.search(token)]
                for var in container.get("env", []):
                    if "value" not in var:
                        continue
                    if SECRET_NAME.search(var["name"]) and var["name"] not in NOT_CREDENTIALS:
                        found.append(f"{where} env {var['name']} is a literal (use valueFrom.secretKeyRef)")
                    if URI_PASSWORD.search(str(var["value"])):
                        found.append(f"{where} env {var['name']}: {var['value']}")
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        for key in ("command", "entrypoint"):
            if service.get(key):
                found += [f"compose {name}.{key}: {t}" for t in as_argv(service[key]) if URI_PASSWORD.search(t)]
        found += [
            f"compose {name}.environment.{k}"
            for k, v in service.get("environment", {}).items()
            if URI_PASSWORD.search(str(v))
        ]
    launcher = yaml.safe_load(LAUNCHER.read_text())
    lines = launcher["docker"]["run_options"] + [
        line for key, value in launcher.items() if key.endswith("_commands") for line in value
    ]
    for line in lines:
        if URI_PASSWORD.search(line):
            found.append(f"aws.yaml: {line}")
        for name in re.findall(r"--env\s+(\w+)=", line):
            if SECRET_NAME.search(name) and name not in NOT_CREDENTIALS:
                found.append(f"aws.yaml: {name} on a docker command line")
    assert not found, "credentials written into infra/:\n" + "\n".join(found)


def test_launcher_is_token_authenticated_and_local():
    config = yaml.safe_load(LAUNCHER.read_text())
    run_options = " ".join(config["docker"]["run_options"])
    assert re.search(r"--env RAY_AUTH_MODE=token\b", run_options), "aws.yaml: run every node with RAY_AUTH_MODE=token"
    assert "RAY_AUTH_TOKEN=" not in run_options, "aws.yaml: the token travels as a file, not a value"
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", run_options)
    assert token_path and token_path.group(1) in config["file_mounts"], "aws.yaml: copy the token file to every node"
    assert "/home/ray/.mlflow/credentials" in config["file_mounts"], "aws.yaml: the nodes' MLflow login, as a file"
    head_start = " ".join(config["head_start_ray_commands"])
    host = re.search(r"--dashboard-host[= ](\S+)", head_start)
    assert host and is_loopback(host.group(1)), (
        "aws.yaml: the dashboard listens on localhost (`ray dashboard` tunnels)"
    )


def test_secrets_env_reads_files_and_fails_on_a_missing_one(tmp_path):
    # The script only converts variables naming files under /run/secrets/; a copy pointed at tmp_path runs the same
    # code here without root.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pg").write_text("pa ss$word'\n")
    script = tmp_path / "secrets-env.sh"
    script.write_text(
        SECRETS_ENV.read_text()
        .replace("/run/secrets", str(secrets))
        .replace(r"\/run\/secrets\/", str(secrets).replace("/", r"\/") + r"\/")
    )
    base = {"PATH": "/usr/bin:/bin", "AWS_CONFIG_FILE": "/etc/aws-config"}
    printed = subprocess.run(
        ["sh", str(script), "python3", "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        env={**base, "PGPASSWORD_FILE": str(secrets / "pg")},
        capture_output=True,
        text=True,
        check=True,
    )
    env = json.loads(printed.stdout)
    assert env["PGPASSWORD"] == "pa ss$word'" and "PGPASSWORD_FILE" not in env
    assert env["AWS_CONFIG_FILE"] == "/etc/aws-config", "a *_FILE outside the secrets folder is left alone"
    missing = subprocess.run(
        ["sh", str(SECRETS_ENV), "true"],
        env={**base, "PGPASSWORD_FILE": "/run/secrets/reelforge-test-absent"},
        capture_output=True,
        text=True,
    )
    assert (
        missing.returncode == 1 and "PGPASSWORD_FILE" in missing.stderr and "reelforge-test-absent" in missing.stderr
    )


# ------------------------------------------------------------------------------------------------------ README


def test_infra_readme_explains_every_file_and_command():
    readme = INFRA_README.read_text()
    local = {INFRA / "mlflow" / "secrets", INFRA / "mlflow" / ".env"}  # a user's own secrets, never committed
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and path != INFRA_README and not any(path == p or path.is_relative_to(p) for p in local):
            assert str(path.relative_to(INFRA)) in readme, f"infra/README.md does not explain {path.name}"
    for command in [
        "docker build -f infra/Dockerfile",
        "kubectl apply -f infra/kuberay/raycluster.yaml",
        "kubectl apply -f infra/kuberay/rayjob.yaml",
        "kubectl apply -f infra/mlflow/k8s.yaml",
        "docker compose -f infra/mlflow/docker-compose.yaml",
        "ray up -y infra/cluster-launcher/aws.yaml",
        "ray job submit --address",
        "kubectl -n reelforge create secret generic reelforge-ray-auth",
        "kubectl -n reelforge create secret generic mlflow-auth",
        "kubectl -n reelforge create secret generic mlflow-client",
        "ray get-auth-token --generate",
        "infra/mlflow/secrets",
    ]:
        assert command in readme, f"infra/README.md lacks `{command}`"
