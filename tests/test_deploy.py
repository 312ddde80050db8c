"""deploy/: every command line in every manifest is the project's own CLI, and the manifests validate.

Each `fedtune ...` command line (Dockerfile ENTRYPOINT/CMD/HEALTHCHECK, compose commands and
healthchecks, Kubernetes command/args, systemd ExecStart) is extracted and parsed by the real CLI
(click's make_context on fedtune.cli.main's app, with the manifest's own environment), so a
renamed or missing flag, a missing required option or a bad value fails here. The systemd
coordinator's command line is also started for real and probed with the Dockerfile's HEALTHCHECK
command line; its metrics endpoint is scraped and compared with the Grafana dashboard.
YAML parses; Kubernetes manifests are rendered with `kubectl kustomize` (offline) and validated
against the Kubernetes schemas kubernetes-validate bundles; systemd units pass `systemd-analyze
verify`. The container test (marker `container`) builds the image from a locally made base and
runs its health check inside; it skips, saying why, where no docker daemon or base is at hand.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from tests.conftest import REPO

# Ray's CLI module imports Ray Serve, whose pydantic models warn on import; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
FEDTUNE = Path(sys.executable).parent / "fedtune"
DASHBOARD_METRICS = {  # what the observability work exports, each with a `job` label but the queue's length
    "fedtune_rounds_opened", "fedtune_rounds_published", "fedtune_updates_accepted", "fedtune_updates_rejected",
    "fedtune_bytes_up", "fedtune_bytes_down", "fedtune_round_duration_seconds", "fedtune_phase_duration_seconds",
    "fedtune_clients_connected", "fedtune_clients_enrolled", "fedtune_queue_length", "fedtune_secagg_dropouts",
    "fedtune_dp_epsilon",
}


# ------------------------------------------------------------------------------ command lines

@dataclass
class CommandLine:
    """One command line found in a manifest: where, its words, and the environment it runs with."""

    where: str
    words: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def is_fedtune(self) -> bool:
        return bool(self.words) and re.fullmatch(r"(\S*/)?fedtune", self.words[0]) is not None


_SHELL_KEYWORDS = {"exec", "then", "do", "else", "!", "{", "time"}
_SHELL_SKIP = {"if", "fi", "done", "for", "while", "[", "test", "set", "mv", "cat", "echo", "cp", "mkdir", "}"}


def _substitutions(script: str) -> tuple[str, list[str]]:
    """``script`` with each ``$(...)`` replaced by a placeholder word, and the inner commands."""
    inner: list[str] = []
    out, i = [], 0
    while i < len(script):
        if script.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(script) and depth:
                depth += {"(": 1, ")": -1}.get(script[j], 0)
                j += 1
            inner.append(script[i + 2:j - 1])
            out.append("SUBSTITUTED")
            i = j
        else:
            out.append(script[i])
            i += 1
    return "".join(out), inner


def _expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), word)


def shell_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """The simple commands of a POSIX shell script, as words, with ``env``'s variables expanded:
    lists split at newlines, ``;``, ``&&``, ``||`` and ``|``; ``exec`` and keywords dropped;
    redirections dropped; command substitutions parsed as commands of their own."""
    script = script.replace("\\\n", " ")
    script, inner = _substitutions(script)
    lexer = shlex.shlex(script.replace("\n", " ; "), posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    commands: list[list[str]] = []
    current: list[str] = []
    tokens = iter(lexer)
    for token in tokens:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current = []
        elif token in (">", ">>", "<", "2>"):
            next(tokens, None)
        else:
            current.append(_expand(token, env))
    commands.append(current)
    found: list[list[str]] = []
    for words in commands:
        while words and (words[0] in _SHELL_KEYWORDS or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0])):
            words = words[1:]
        if words and words[0] not in _SHELL_SKIP:
            found.append(words)
    for sub in inner:
        found += shell_commands(sub, env)
    return found


def argv_commands(where: str, argv: list[str], env: dict[str, str]) -> list[CommandLine]:
    """An exec-form command (a list); a shell's ``-c SCRIPT`` is read as the script's commands."""
    if len(argv) >= 3 and re.fullmatch(r"(\S*/)?(ba)?sh", argv[0]) and argv[1] in ("-c", "-lc", "-ec"):
        return [CommandLine(where, words, env) for words in shell_commands(argv[2], env)]
    return [CommandLine(where, [_expand(w, env) for w in argv], env)]


# --- Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending.strip():
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            name, _, rest = full.partition(" ")
            joined.append((name.upper(), rest.strip()))
    return joined


@dataclass
class Stage:
    """A Dockerfile stage's process settings (inherited from the stage it is built FROM)."""

    name: str
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def dockerfile_stages(text: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for name, rest in dockerfile_instructions(text):
        if name == "FROM":
            words = rest.split()
            base = stages.get(words[0])
            alias = words[2] if len(words) > 2 and words[1].upper() == "AS" else words[0]
            stage = Stage(alias, list(base.entrypoint), list(base.cmd), list(base.healthcheck), dict(base.env)) \
                if base else Stage(alias)
            stages[alias] = stage
        elif stage is None:
            continue
        elif name in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest)  # exec form only: a shell form would hide the command in a string
            assert isinstance(value, list), f"deploy/Dockerfile: {name} {rest} is not in exec (JSON) form"
            if name == "ENTRYPOINT":
                stage.entrypoint, stage.cmd = value, []
            else:
                stage.cmd = value
        elif name == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
            assert m, f"deploy/Dockerfile: HEALTHCHECK {rest} is not CMD in exec (JSON) form"
            stage.healthcheck = json.loads(m.group(1))
        elif name == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                stage.env[key] = value
    return stages


def dockerfile_commands(text: str) -> list[CommandLine]:
    found = []
    for stage in dockerfile_stages(text).values():
        if stage.entrypoint or stage.cmd:
            found += argv_commands(f"deploy/Dockerfile: stage {stage.name} ENTRYPOINT+CMD",
                                   stage.entrypoint + stage.cmd, stage.env)
        if stage.healthcheck:
            found += argv_commands(f"deploy/Dockerfile: stage {stage.name} HEALTHCHECK", stage.healthcheck, stage.env)
    return found


# --- compose

def compose_commands(text: str) -> list[CommandLine]:
    doc = yaml.safe_load(text)
    found = []
    for name, service in doc["services"].items():
        if "build" not in service:  # third-party images (Prometheus, Grafana) run their own commands
            continue
        # Compose interpolates ${VAR} and turns $$ into the literal $ the container's shell sees.
        env = {k: str(v).replace("$$", "$") for k, v in (service.get("environment") or {}).items()}
        unescape = lambda words: [str(w).replace("$$", "$") for w in words]
        entrypoint = service.get("entrypoint", ["fedtune"])
        command = service.get("command", [])
        entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint
        command = shlex.split(command) if isinstance(command, str) else command
        found += argv_commands(f"deploy/compose.yaml: services.{name}.command", unescape(entrypoint + command), env)
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            assert test[0] == "CMD", f"deploy/compose.yaml: services.{name}.healthcheck.test must be CMD (exec form)"
            found += argv_commands(f"deploy/compose.yaml: services.{name}.healthcheck", unescape(test[1:]), env)
    return found


# --- Kubernetes

def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path, pod spec) of each pod a manifest makes."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind in ("StatefulSet", "Deployment", "DaemonSet", "ReplicaSet"):
        return [("spec.template.spec", spec["template"]["spec"])]
    if kind == "Job":
        return [("spec.template.spec", spec["template"]["spec"])]
    if kind == "CronJob":
        return [("spec.jobTemplate.spec.template.spec", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "RayCluster":
        pods = [("spec.headGroupSpec.template.spec", spec["headGroupSpec"]["template"]["spec"])]
        pods += [(f"spec.workerGroupSpecs[{i}].template.spec", g["template"]["spec"])
                 for i, g in enumerate(spec.get("workerGroupSpecs", []))]
        return pods
    return []


def k8s_commands(where: str, docs: list[dict[str, Any]]) -> list[CommandLine]:
    found = []
    for doc in docs:
        for path, pod in pod_templates(doc):
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                if "command" not in c and "args" not in c:
                    continue  # the image's own (KubeRay writes `ray start` into its pods itself)
                env = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
                # A variable from a Secret or ConfigMap is set, to a value the manifest does not hold.
                env |= {e["name"]: f"<{e['name']}>" for e in c.get("env", []) if "valueFrom" in e}
                argv = list(c.get("command", ["fedtune"])) + list(c.get("args", []))
                found += argv_commands(f"{where}: {doc['kind']} {doc['metadata']['name']} {path} container "
                                       f"{c['name']}", argv, env)
    return found


def k8s_source_docs() -> dict[str, list[dict[str, Any]]]:
    """Every manifest under deploy/k8s, as written (kustomization files aside)."""
    return {str(p.relative_to(REPO)): [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"}


# --- systemd

def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """[section] -> (key, value) in order, continuation lines joined, comments dropped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current, pending = "", ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith(("#", ";"))):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        m = re.fullmatch(r"\[(.+)\]", line)
        if m:
            current = m.group(1)
            sections.setdefault(current, [])
        else:
            key, _, value = line.partition("=")
            sections[current].append((key.strip(), value.strip()))
    return sections


def systemd_exec(value: str, env: dict[str, str], instance: str = "acme") -> list[str]:
    """ExecStart= as systemd runs it: specifiers, ${VAR} as one word, $VAR split on whitespace."""
    value = value.lstrip("-@:+!").replace("%i", instance).replace("%I", instance).replace("%%", "%")
    words: list[str] = []
    for word in shlex.split(value):
        whole = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if whole:
            words += env.get(whole.group(1), "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_]\w*)\}", lambda m: env.get(m.group(1), m.group(0)), word))
    return words


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def unit_commands(path: Path, env_files: list[Path]) -> list[CommandLine]:
    """The Exec*= lines of a unit, with its Environment= and the example EnvironmentFile's settings."""
    service = unit_sections(path.read_text())["Service"]
    env: dict[str, str] = {}
    for key, value in service:
        if key == "Environment":
            for assignment in shlex.split(value):
                k, _, v = assignment.partition("=")
                env[k] = v
    for f in env_files:
        env |= env_file(f)
    return [CommandLine(f"deploy/systemd/{path.name}: {key}", systemd_exec(value, env), env)
            for key, value in service if key.startswith("Exec")]


# --- every manifest

def all_commands() -> list[CommandLine]:
    systemd = DEPLOY / "systemd"
    found = dockerfile_commands((DEPLOY / "Dockerfile").read_text())
    found += compose_commands((DEPLOY / "compose.yaml").read_text())
    for where, docs in k8s_source_docs().items():
        found += k8s_commands(where, docs)
    found += unit_commands(systemd / "fedtune-coordinator.service", [systemd / "coordinator.env"])
    found += unit_commands(systemd / "fedtune-client@.service", [systemd / "client.env"])
    return found


# ------------------------------------------------------------------------------ the real CLI's parsing

@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ as the manifest's process sees it: the test's own FEDTUNE_* variables removed."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("FEDTUNE_")]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _resolve(group: Any, words: list[str], name: str) -> tuple[Any, list[str], list[str]]:
    command, path, rest = group, [name], list(words)
    while getattr(command, "commands", None) is not None and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return command, path, rest


def click_problems(group: Any, name: str, words: list[str], env: dict[str, str]) -> list[str]:
    """What click says about ``name words...``: an unknown option, a missing one, a bad value."""
    command, path, rest = _resolve(group, words, name)
    if getattr(command, "commands", None) is not None and rest in (["--help"], ["-h"]):
        return []
    if getattr(command, "commands", None) is not None:
        return [f"{' '.join(path)} has no command {rest[0]!r}" if rest else f"{' '.join(path)} needs a command"]
    with environment(env):
        try:
            command.make_context(" ".join(path), rest)
        except Exception as e:  # click's (or typer's vendored click's) UsageError and friends
            if not hasattr(e, "format_message"):
                raise
            return [f"{' '.join(path)}: {e.format_message()}"]
    return []


def fedtune_problems(line: CommandLine) -> list[str]:
    from fedtune.cli.main import app

    return [f"{line.where}: {p}" for p in click_problems(typer.main.get_command(app), "fedtune", line.words[1:],
                                                          line.env)]


def ray_problems(line: CommandLine) -> list[str]:
    """`ray start ...` lines (the coordinator joining the Ray cluster), parsed by Ray's own CLI
    (unchecked where Ray is not installed: the test extra has it)."""
    try:
        from ray.scripts import scripts
    except ImportError:
        return []
    return [f"{line.where}: {p}" for p in click_problems(scripts.cli, "ray", line.words[1:], line.env)]


def manifest_problems(lines: list[CommandLine]) -> list[str]:
    problems: list[str] = []
    for line in lines:
        if line.is_fedtune:
            problems += fedtune_problems(line)
        elif line.words and line.words[0] == "ray":
            problems += ray_problems(line)
    return problems


# ------------------------------------------------------------------------------ tests: command lines

def test_every_manifest_command_line_parses_with_the_real_cli() -> None:
    lines = all_commands()
    fedtune_lines = [line for line in lines if line.is_fedtune]
    where = {line.where.split(":")[0] for line in fedtune_lines}
    # Each kind of manifest holds fedtune command lines, so that none is silently left unchecked.
    assert {"deploy/Dockerfile", "deploy/compose.yaml", "deploy/systemd/fedtune-coordinator.service",
            "deploy/systemd/fedtune-client@.service", "deploy/k8s/base/coordinator-statefulset.yaml",
            "deploy/k8s/client/job.yaml"} <= where, sorted(where)
    commands = {" ".join(line.words[1:3]) for line in fedtune_lines}
    assert {"coordinator start", "coordinator health", "client run", "certs init", "job create",
            "token create"} <= commands, commands
    unknown = [f"{line.where}: {line.words}" for line in lines if not line.is_fedtune and line.words[0] != "ray"]
    assert not unknown, "command lines that are neither fedtune nor `ray start`:\n" + "\n".join(unknown)
    problems = manifest_problems(lines)
    assert not problems, "\n".join(problems)


def test_shell_scripts_in_manifests_are_read_command_by_command() -> None:
    script = ('set -e\nif [ ! -s /t/job ]; then\n  fedtune job create /j.yaml > /t/job\n'
              '  for c in a b; do fedtune token create --job "$(cat /t/job)" --uses 1 > /t/$c.token; done\nfi\n'
              'test -f ca.pem || exec fedtune certs init --out "$DIR"')
    words = shell_commands(script, {"DIR": "/pki"})
    assert ["fedtune", "job", "create", "/j.yaml"] in words
    assert ["fedtune", "token", "create", "--job", "SUBSTITUTED", "--uses", "1"] in words
    assert ["fedtune", "certs", "init", "--out", "/pki"] in words


@pytest.mark.parametrize("kind", ["dockerfile", "compose", "k8s", "k8s-ray", "systemd"])
def test_a_manifest_with_an_unknown_flag_fails_the_check(kind: str, tmp_path: Path) -> None:
    """The checker itself: the same manifests, each with one flag renamed."""
    systemd = DEPLOY / "systemd"
    if kind == "dockerfile":
        text = (DEPLOY / "Dockerfile").read_text().replace('"--health-port", "8081"', '"--healthport", "8081"')
        lines = dockerfile_commands(text)
        expected = "No such option: --healthport"
    elif kind == "compose":
        text = (DEPLOY / "compose.yaml").read_text().replace("--uses 1", "--use 1")
        lines = compose_commands(text)
        expected = "No such option: --use"
    elif kind == "k8s":
        path = K8S / "base" / "coordinator-statefulset.yaml"
        docs = list(yaml.safe_load_all(path.read_text().replace("--ray-address", "--ray-adress")))
        lines = k8s_commands(str(path), docs)
        expected = "No such option: --ray-adress"
    elif kind == "k8s-ray":
        pytest.importorskip("ray.scripts.scripts")
        path = K8S / "base" / "coordinator-statefulset.yaml"
        lines = k8s_commands(str(path), list(yaml.safe_load_all(path.read_text().replace("--num-gpus=0", "--num-gpu=0"))))
        expected = "--num-gpu"
    else:
        edited = tmp_path / "fedtune-client@.service"
        edited.write_text((systemd / "fedtune-client@.service").read_text()
                          .replace("--data ${FEDTUNE_DATA}", "--data-path ${FEDTUNE_DATA}"))
        lines = unit_commands(edited, [systemd / "client.env"])
        expected = "No such option: --data-path"
    problems = manifest_problems(lines)
    assert any(expected in p for p in problems), problems


def test_a_required_option_set_only_by_the_environment_is_checked() -> None:
    """`client run` needs --coordinator; the Job gives it as FEDTUNE_COORDINATOR. Without that
    variable the same command line fails the check."""
    docs = list(yaml.safe_load_all((K8S / "client" / "job.yaml").read_text()))
    assert not manifest_problems(k8s_commands("job", docs))
    env = docs[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    docs[0]["spec"]["template"]["spec"]["containers"][0]["env"] = [e for e in env if e["name"] != "FEDTUNE_COORDINATOR"]
    problems = manifest_problems(k8s_commands("job", docs))
    assert any("--coordinator" in p for p in problems), problems


# ------------------------------------------------------------------------------ tests: what the files hold

def test_dockerfile_targets_user_volumes_and_base_image_argument() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = dockerfile_stages(text)
    assert {"build", "fedtune", "client", "coordinator"} <= set(stages)
    instructions = dockerfile_instructions(text)
    first_from = next(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in instructions[:first_from]
    assert all(rest.split()[0] in ("${BASE_IMAGE}", *stages) for name, rest in instructions if name == "FROM")
    assert ("USER", "fedtune") in instructions
    volumes = [json.loads(rest) for name, rest in instructions if name == "VOLUME"]
    assert ["/var/lib/fedtune", "/var/lib/fedtune-client"] in volumes
    coordinator = stages["coordinator"]
    # The HEALTHCHECK probes the port the default command serves health on.
    health_port = coordinator.cmd[coordinator.cmd.index("--health-port") + 1]
    assert f"127.0.0.1:{health_port}" in coordinator.healthcheck
    assert stages["client"].cmd[:2] == ["client", "run"]
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and "!fedtune" in ignore, "the build context must not carry .venv and the rest"


def test_yaml_files_parse_and_compose_is_consistent() -> None:
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        assert list(yaml.safe_load_all(path.read_text())), path
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services, volumes = compose["services"], set(compose["volumes"])
    assert {"coordinator", "client-a", "client-b", "init", "certs", "prometheus"} <= set(services)
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
            else:
                assert source in volumes, f"{name} mounts volume {source}, not declared under volumes:"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == \
                (DEPLOY / "Dockerfile").resolve(), name
    # Each client has its own data and state volume.
    mounts = {name: {m.split(":")[1]: m.split(":")[0] for m in services[name]["volumes"]} for name in ("client-a", "client-b")}
    assert mounts["client-a"]["/data"] != mounts["client-b"]["/data"]
    assert mounts["client-a"]["/var/lib/fedtune-client"] != mounts["client-b"]["/var/lib/fedtune-client"]
    # Prometheus scrapes the port the coordinator serves metrics on.
    coordinator = services["coordinator"]["command"]
    metrics_port = coordinator[coordinator.index("--metrics-port") + 1]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for c in prometheus["scrape_configs"] for s in c["static_configs"] for t in s["targets"]]
    assert f"coordinator:{metrics_port}" in targets
    assert prometheus["scrape_configs"][0]["honor_labels"] is True  # fedtune's `job` label is the job id


def test_compose_job_spec_and_sample_data_are_what_the_cli_accepts() -> None:
    from fedtune.data import read_data
    from fedtune.spec import parse_spec

    spec = parse_spec((DEPLOY / "compose" / "job" / "job.yaml").read_text(), base_dir=DEPLOY / "compose" / "job")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert spec.min_clients <= sum(name.startswith("client-") for name in compose["services"])
    # eval_data is named by the path where compose mounts deploy/compose/job.
    assert str(spec.eval_data).startswith("/etc/fedtune/job/")
    assert any(m == "./compose/job:/etc/fedtune/job:ro" for m in compose["services"]["coordinator"]["volumes"])
    for name in ("client-a", "client-b"):
        assert len(read_data(DEPLOY / "compose" / "data" / name / "train.jsonl")) >= 16
    assert len(read_data(DEPLOY / "compose" / "job" / "eval.jsonl")) >= 8


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian's) is not installed")
def test_compose_file_passes_docker_compose_config() -> None:
    proc = subprocess.run(["docker-compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_grafana_dashboard_queries_the_exported_metric_names() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "fedtune.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bfedtune_\w+", e)}
    assert DASHBOARD_METRICS <= used, f"metrics without a panel: {sorted(DASHBOARD_METRICS - used)}"
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job"}
    # Every panel reads the job chosen at the top (the queue's length is the whole coordinator's).
    assert all('job=~"$job"' in e for e in exprs if "fedtune_queue_length" not in e)


# ------------------------------------------------------------------------------ Kubernetes

def _kustomize_tree(tmp_path: Path) -> Path:
    """deploy/k8s copied with the files the secretGenerators read, made as the README says."""
    from fedtune.crypto.certs import init_certs

    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    init_certs(tree / "overlays" / "cpu" / "pki", ["fedtune-coordinator.fedtune.svc", "localhost", "127.0.0.1"],
               ["operator", "client"])
    (tree / "overlays" / "cpu" / "secrets").mkdir()
    (tree / "overlays" / "cpu" / "secrets" / "admin.token").write_text("fta_test\n")
    (tree / "overlays" / "cpu" / "secrets" / "ray.token").write_text("0123456789abcdef\n")
    (tree / "client" / "pki").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        shutil.copy(tree / "overlays" / "cpu" / "pki" / name, tree / "client" / "pki" / name)
    (tree / "client" / "secrets").mkdir()
    (tree / "client" / "secrets" / "token").write_text("ftt_test\n")
    return tree


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations were not rendered")
    tree = _kustomize_tree(tmp_path_factory.mktemp("kustomize"))
    out = {}
    for name in ("overlays/cpu", "overlays/gpu", "client"):
        proc = subprocess.run([kubectl, "kustomize", str(tree / name)], capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.returncode == 0, f"kubectl kustomize deploy/k8s/{name}: {proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _secret_references(node: Any) -> Iterator[str]:
    """Names of the Secrets a manifest refers to (volumes and env), at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("secretName"), str):
            yield node["secretName"]
        if isinstance(node.get("secretKeyRef"), dict):
            yield node["secretKeyRef"]["name"]
        for value in node.values():
            yield from _secret_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_references(value)


def test_kustomizations_render_what_the_design_names(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cpu = {(d["kind"], d["metadata"]["name"]): d for d in rendered["overlays/cpu"]}
    sts = cpu[("StatefulSet", "fedtune-coordinator")]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/var/lib/fedtune", "/etc/fedtune/tls"}
    # Native gRPC probes on the plaintext health port the command line opens.
    script = " ".join(container["args"])
    health_port = int(re.search(r"--health-port (\d+)", script).group(1))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    assert ("Service", "fedtune-coordinator") in cpu
    assert {p["port"] for p in cpu[("Service", "fedtune-coordinator")]["spec"]["ports"]} >= {50051}
    assert cpu[("Secret", "fedtune-coordinator-tls")]["type"] == "kubernetes.io/tls"
    assert ("Secret", "fedtune-admin-token") in cpu
    ray = cpu[("RayCluster", "fedtune-ray")]
    # The coordinator joins the KubeRay head's service by the name KubeRay gives it.
    head = {e["name"]: e.get("value") for e in container["env"]}["RAY_HEAD_ADDRESS"]
    assert head == f"{ray['metadata']['name']}-head-svc:6379"
    # Every secret a pod names is one the overlay makes (no hashed name left behind in a custom resource).
    secrets = {d["metadata"]["name"] for d in rendered["overlays/cpu"] if d["kind"] == "Secret"}
    named = set(_secret_references(rendered["overlays/cpu"]))
    assert named and named <= secrets, named - secrets
    gpu_ray = next(d for d in rendered["overlays/gpu"] if d["kind"] == "RayCluster")
    assert gpu_ray["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    job = next(d for d in rendered["client"] if d["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["client", "run"]


def test_rendered_manifests_validate_against_the_kubernetes_schemas(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.utils.latest_version()
    problems = []
    for name, docs in rendered.items():
        for doc in docs:
            targets = [doc]
            if doc["kind"] == "RayCluster":
                # No KubeRay schema offline: its pod templates are validated as the PodTemplateSpecs they are.
                assert doc["apiVersion"] == "ray.io/v1"
                targets = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{i}"},
                            "template": group["template"]}
                           for i, group in enumerate([doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]])]
            for target in targets:
                try:
                    kv.validate(target, version, strict=True)
                except kv.ValidationError as e:
                    problems.append(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not problems, "\n".join(problems)
    # The validator does catch a wrong field.
    bad = json.loads(json.dumps(next(d for d in rendered["client"] if d["kind"] == "Job")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def test_rendered_manifests_command_lines_parse(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pytest.importorskip("ray.scripts.scripts")
    lines = [line for name, docs in rendered.items() for line in k8s_commands(name, docs)]
    assert any(line.is_fedtune for line in lines)
    problems = manifest_problems(lines)
    assert not problems, "\n".join(problems)
    # KubeRay's own `ray start` flags come from rayStartParams: each is an option of `ray start`.
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] != "RayCluster":
                continue
            for group in [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]:
                words = ["ray", "start", "--address=head:6379"] if "groupName" in group else ["ray", "start", "--head"]
                for key, value in group.get("rayStartParams", {}).items():
                    words += [f"--{key}"] if value == "true" and key.startswith("disable") else [f"--{key}={value}"]
                problems += ray_problems(CommandLine(f"RayCluster rayStartParams {group.get('groupName', 'head')}", words))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ systemd

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["fedtune-coordinator.service", "fedtune-client@.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` with ExecStart pointed at this venv's fedtune (the units name
    /opt/fedtune/bin/fedtune, which verify checks exists): no warning at all is accepted."""
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "/opt/fedtune/bin/fedtune " in text
    name = unit.replace("@.", "@acme.")
    (tmp_path / name).write_text(text.replace("/opt/fedtune/bin/fedtune", str(FEDTUNE)))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    # As shipped, the only complaint is the binary a machine without fedtune installed lacks.
    (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                          timeout=120, check=False)
    if not Path("/opt/fedtune/bin/fedtune").exists():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines and all("/opt/fedtune/bin/fedtune" in line for line in lines), proc.stderr
    # And verify does report a misspelt sandboxing option.
    (tmp_path / name).write_text(text.replace("/opt/fedtune/bin/fedtune", str(FEDTUNE))
                                 .replace("ProtectSystem=strict", "ProtectSystem=stric"))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert "protect system" in proc.stderr.lower()


def test_systemd_units_are_sandboxed() -> None:
    for unit, state in (("fedtune-coordinator.service", "/var/lib/fedtune"),
                        ("fedtune-client@.service", "/var/lib/fedtune-client/%i")):
        service = dict(unit_sections((DEPLOY / "systemd" / unit).read_text())["Service"])
        assert service["User"] == "fedtune" and service["NoNewPrivileges"] == "yes", unit
        assert service["ProtectSystem"] == "strict" and service["PrivateTmp"] == "yes", unit
        assert service["ReadWritePaths"] == state and service["Restart"] == "on-failure", unit
        assert service["EnvironmentFile"].lstrip("-").startswith("/etc/fedtune/"), unit


# ------------------------------------------------------------------------------ one real start

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
def test_systemd_coordinator_command_line_starts_and_answers_the_dockerfile_healthcheck(tmp_path: Path) -> None:
    """The unit's ExecStart, as systemd would run it with coordinator.env's FEDTUNE_ARGS=--in-process,
    on a temp state dir and picked ports; probed with the Dockerfile's HEALTHCHECK command line and
    scraped at its metrics port (the names the Grafana dashboard queries are there)."""
    from fedtune.crypto.certs import init_certs

    systemd = DEPLOY / "systemd"
    env_path = tmp_path / "coordinator.env"
    env_path.write_text((systemd / "coordinator.env").read_text().replace("FEDTUNE_ARGS=\n", "FEDTUNE_ARGS=--in-process\n"))
    line = next(c for c in unit_commands(systemd / "fedtune-coordinator.service", [env_path])
                if c.where.endswith("ExecStart"))
    ports = {"50051": _free_port(), "8081": _free_port(), "9400": _free_port()}
    init_certs(tmp_path / "tls", ["localhost", "127.0.0.1"], ["operator"])
    subs = {"/opt/fedtune/bin/fedtune": str(FEDTUNE), "/var/lib/fedtune": str(tmp_path / "state"),
            "/etc/fedtune/tls": str(tmp_path / "tls"), "0.0.0.0": "127.0.0.1"}

    def substitute(word: str) -> str:
        for old, new in subs.items():
            word = word.replace(old, new)
        # A port is a word of its own, or the end of HOST:PORT.
        return re.sub(r"(^|:)(\d+)$", lambda m: m.group(1) + str(ports.get(m.group(2), m.group(2))), word)

    argv = [substitute(w) for w in line.words]
    assert argv[-1] == "--in-process"
    stage = dockerfile_stages((DEPLOY / "Dockerfile").read_text())["coordinator"]
    probe = [substitute(w) for w in [str(FEDTUNE), *stage.healthcheck[1:]]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDTUNE_", "GRPC_"))} | line.env
    log = tmp_path / "coordinator.log"
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "gRPC health (plaintext, health only)" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"{argv} exited {proc.returncode}:\n{log.read_text()}"
            assert time.time() < deadline, f"no coordinator after 120 s:\n{log.read_text()}"
            time.sleep(0.2)
        health = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=env, check=False)
        assert health.returncode == 0, f"{probe}: {health.stderr}\n{log.read_text()}"
        assert "SERVING" in health.stdout
        body = urllib.request.urlopen(f"http://127.0.0.1:{ports['9400']}/metrics", timeout=10).read().decode()
        exported = {re.sub(r"_total$", "", m) for m in re.findall(r"^# TYPE (fedtune_\w+) ", body, re.MULTILINE)}
        assert DASHBOARD_METRICS <= exported, sorted(DASHBOARD_METRICS - exported)
        # The TLS service port answers the same probe through `--state-dir` (its address, TLS mode).
        via_state = subprocess.run([str(FEDTUNE), "coordinator", "health", "--state-dir", str(tmp_path / "state"),
                                    "--ca-cert", str(tmp_path / "tls" / "ca.pem"), "--client-cert",
                                    str(tmp_path / "tls" / "operator.pem"), "--client-key",
                                    str(tmp_path / "tls" / "operator.key")],
                                   capture_output=True, text=True, timeout=60, env=env, check=False)
        assert via_state.returncode == 0, via_state.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    # A stopped coordinator fails the probe: exit 1, one line saying nothing listens.
    down = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert down.returncode == 1 and "connection refused" in down.stderr, down.stderr


def test_a_taken_health_port_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """Found before the service loads anything: exit 6 (conflict), the port and the flag named."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDTUNE_", "GRPC_"))}
        proc = subprocess.run([str(FEDTUNE), "coordinator", "start", "--state-dir", str(tmp_path / "state"), "--port",
                               "0", "--insecure", "--in-process", "--health-port", str(port)],
                              capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fedtune: error: cannot listen on 127.0.0.1:{port} for --health-port: address in use or not available")


# ------------------------------------------------------------------------------ the image, where an engine runs

BASE_IMAGE = os.environ.get("FEDTUNE_TEST_BASE_IMAGE", "fedtune-base:bookworm")
WHEELHOUSE = Path(os.environ.get("FEDTUNE_TEST_WHEELHOUSE", Path.home() / ".cache" / "fedtune-wheelhouse"))


def _docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr[-3000:]}"
    return proc


def _engine_skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client installed"
    try:
        if _docker("info", timeout=20, check=False).returncode != 0:
            return "no docker daemon running (apt-get install docker.io, then start dockerd)"
        if _docker("image", "inspect", BASE_IMAGE, timeout=20, check=False).returncode != 0:
            return f"no base image {BASE_IMAGE} (deploy/base/make-local-base.sh makes one)"
    except subprocess.TimeoutExpired:
        return "the docker daemon does not answer"
    if not any(WHEELHOUSE.glob("torch-*.whl")):
        return f"no wheelhouse in {WHEELHOUSE} (deploy/base/make-wheelhouse.sh fills one)"
    return None


@pytest.mark.container
@pytest.mark.slow
def test_image_builds_from_a_local_base_and_reports_healthy(tmp_path: Path) -> None:
    """deploy/Dockerfile's coordinator target, built with no registry (a debootstrapped base and a
    wheelhouse), run with trial certificates and no network: Docker's HEALTHCHECK turns healthy,
    as the unprivileged user, with the state volumes declared."""
    reason = _engine_skip_reason()
    if reason:
        pytest.skip(reason)
    from fedtune.crypto.certs import init_certs

    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "fedtune", context / "fedtune", ignore=shutil.ignore_patterns("__pycache__"))
    (context / "deploy" / "wheels").mkdir(parents=True)
    shutil.copy(DEPLOY / "Dockerfile", context / "deploy" / "Dockerfile")
    for wheel in WHEELHOUSE.glob("*.whl"):
        os.link(wheel, context / "deploy" / "wheels" / wheel.name)
    tag = f"fedtune-coordinator:test-{os.getpid()}"
    _docker("build", "--network", "host", "-f", "deploy/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg", "WHEELS_ONLY=1", "--target", "coordinator", "-t", tag, str(context), timeout=1200)
    pki = tmp_path / "pki"
    init_certs(pki, ["localhost", "127.0.0.1"], ["client"])
    for f in pki.iterdir():
        f.chmod(0o644)  # the container's user (uid 10001) reads the mounted files
    name = f"fedtune-test-{os.getpid()}"
    try:
        config = json.loads(_docker("image", "inspect", tag).stdout)[0]["Config"]
        assert config["User"] == "fedtune"
        assert {"/var/lib/fedtune", "/var/lib/fedtune-client"} <= set(config["Volumes"])
        _docker("run", "-d", "--name", name, "--network", "none", "-v", f"{pki}:/etc/fedtune/tls:ro", tag)
        deadline = time.time() + 240
        while True:
            state = json.loads(_docker("inspect", name).stdout)[0]["State"]
            assert state["Running"], _docker("logs", name, check=False).stdout
            if state["Health"]["Status"] == "healthy":
                break
            assert time.time() < deadline, f"not healthy: {state['Health']}\n{_docker('logs', name, check=False).stderr}"
            time.sleep(2)
        assert _docker("exec", name, "id", "-u").stdout.strip() == "10001"
        inside = _docker("exec", name, "fedtune", "coordinator", "health", "--address", "localhost:50051",
                         "--ca-cert", "/etc/fedtune/tls/ca.pem")
        assert "SERVING" in inside.stdout
    finally:
        _docker("rm", "-f", "-v", name, check=False)
        _docker("rmi", "-f", tag, check=False)
