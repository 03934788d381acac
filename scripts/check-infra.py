#!/usr/bin/env python3
"""Cross-reference checks over infra/ that the schema validators cannot make.

Called by scripts/check-infra.sh, one check per invocation:

    check-infra.py compose | k8s | grafana | promql-rules OUT | otel | workflow | env

Each prints its problems (one per line) and exits 1, or prints nothing and
exits 0; `env` only warns. Needs PyYAML (installed with kubernetes-validate).
"""

import glob
import json
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
SERVICES = ["keygen", "control-plane", "edge-redirect", "analytics-sink"]
problems = []


def problem(msg):
    problems.append(msg)


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --------------------------------------------------------------------- compose
def check_compose():
    path = os.path.join(INFRA, "docker-compose.yml")
    with open(path) as f:
        compose = yaml.safe_load(f)
    top_secrets = compose.get("secrets", {})
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            dockerfile = os.path.join(INFRA, build["context"], build["dockerfile"])
            if not os.path.isfile(dockerfile):
                problem(f"compose {name}: no Dockerfile {build['dockerfile']}")
        secrets = set(svc.get("secrets", []))
        for var, value in (svc.get("environment") or {}).items():
            if var.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                secret = str(value)[len("/run/secrets/"):]
                if secret not in secrets:
                    problem(f"compose {name}: {var} reads {value}, but the service does not mount secret {secret}")
        for secret in secrets:
            if secret not in top_secrets:
                problem(f"compose {name}: secret {secret} is not defined at the top level")
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if not os.path.exists(os.path.join(INFRA, source)):
                    problem(f"compose {name}: bind-mount source {source} does not exist")
    for svc in SERVICES:
        if svc not in compose["services"]:
            problem(f"compose: service {svc} is missing")


# ------------------------------------------------------------------------- k8s
def check_k8s():
    docs = []
    for path in sorted(glob.glob(os.path.join(INFRA, "k8s", "*.yaml")) + glob.glob(os.path.join(INFRA, "k8s", "examples", "*.yaml"))):
        docs += [(os.path.basename(path), d) for d in load_yaml_docs(path)]
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    configmaps = by_kind.get("ConfigMap", {})
    secrets = {n: set((d.get("stringData") or {}) | (d.get("data") or {})) for n, d in by_kind.get("Secret", {}).items()}
    workloads = {}
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, d in by_kind.get(kind, {}).items():
            workloads[f"{kind}/{name}"] = d

    for wname, d in workloads.items():
        spec = d["spec"]
        tmpl = spec["template"]
        labels = tmpl["metadata"].get("labels", {})
        match = spec.get("selector", {}).get("matchLabels")
        if match is not None and any(labels.get(k) != v for k, v in match.items()):
            problem(f"{wname}: selector {match} does not match the pod labels {labels}")
        if d["kind"] == "StatefulSet" and spec["serviceName"] not in by_kind.get("Service", {}):
            problem(f"{wname}: serviceName {spec['serviceName']} is not a Service")
        pod = tmpl["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claim_names = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                problem(f"{wname}: volume {v['name']} uses unknown ConfigMap {v['configMap']['name']}")
            if "secret" in v:
                sname = v["secret"]["secretName"]
                if sname not in secrets:
                    problem(f"{wname}: volume {v['name']} uses unknown Secret {sname}")
                for item in v["secret"].get("items", []):
                    if item["key"] not in secrets.get(sname, set()):
                        problem(f"{wname}: Secret {sname} has no key {item['key']}")
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{wname} container {c['name']}"
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = (c.get(probe) or {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports:
                    problem(f"{where}: {probe} port {port} is not a container port")
            for ef in c.get("envFrom", []):
                ref = ef.get("configMapRef", {}).get("name")
                if ref and ref not in configmaps:
                    problem(f"{where}: envFrom unknown ConfigMap {ref}")
            mounts = {}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_names:
                    problem(f"{where}: volumeMount {m['name']} has no volume")
                mounts[m["mountPath"]] = volumes.get(m["name"])
            for e in c.get("env", []):
                if e["name"].endswith("_FILE") and "value" in e:
                    dirname, base = os.path.split(e["value"])
                    vol = mounts.get(dirname)
                    if not vol or "secret" not in vol:
                        problem(f"{where}: {e['name']}={e['value']} is not inside a mounted Secret")
                        continue
                    items = vol["secret"].get("items")
                    keys = {i["path"] for i in items} if items else secrets.get(vol["secret"]["secretName"], set())
                    if base not in keys:
                        problem(f"{where}: {e['name']}={e['value']}: the mounted Secret has no {base}")

    def pods_matching(selector):
        return [w for w in workloads.values()
                if all(w["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]

    for name, svc in by_kind.get("Service", {}).items():
        matched = pods_matching(svc["spec"].get("selector", {}))
        if not matched:
            problem(f"Service/{name}: selector matches no workload")
            continue
        port_names = {p.get("name") for w in matched for c in w["spec"]["template"]["spec"]["containers"]
                      for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort")
            if isinstance(target, str) and target not in port_names:
                problem(f"Service/{name}: targetPort {target} is not a container port name")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not pods_matching(pdb["spec"]["selector"]["matchLabels"]):
            problem(f"PodDisruptionBudget/{name}: selector matches no workload")
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        if f"{ref['kind']}/{ref['name']}" not in workloads:
            problem(f"HorizontalPodAutoscaler/{name}: target {ref['kind']}/{ref['name']} does not exist")


# --------------------------------------------------------------------- grafana
def dashboards():
    for path in sorted(glob.glob(os.path.join(INFRA, "grafana", "dashboards", "*.json"))):
        with open(path) as f:
            yield os.path.basename(path), json.load(f)


def check_grafana():
    ds_file = os.path.join(INFRA, "grafana", "provisioning", "datasources", "prometheus.yml")
    ds_uids = {d["uid"] for d in yaml.safe_load(open(ds_file))["datasources"]}
    provider = yaml.safe_load(open(os.path.join(INFRA, "grafana", "provisioning", "dashboards", "shortener.yml")))
    if provider["providers"][0]["options"]["path"] != "/etc/grafana/dashboards":
        problem("grafana: the dashboard provider path is not where compose mounts the dashboards")
    uids = set()
    names = set()
    for name, d in dashboards():
        names.add(name)
        if d.get("uid") in uids:
            problem(f"{name}: duplicate uid {d.get('uid')}")
        uids.add(d.get("uid"))
        if not 36 <= d.get("schemaVersion", 0) <= 41:
            problem(f"{name}: schemaVersion {d.get('schemaVersion')} is not one current Grafana loads as is")
        for p in d["panels"]:
            where = f"{name} panel {p.get('id')} ({p.get('title')})"
            if p.get("type") not in ("timeseries", "stat"):
                problem(f"{where}: type {p.get('type')}")
            for ds in [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]:
                if not ds or ds.get("uid") not in ds_uids:
                    problem(f"{where}: datasource {ds} is not the provisioned one {sorted(ds_uids)}")
            if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
                problem(f"{where}: a target without an expression")
            if not {"x", "y", "w", "h"} <= set(p.get("gridPos", {})):
                problem(f"{where}: incomplete gridPos")
    wanted = {"overview.json"} | {f"{s}.json" for s in SERVICES}
    for missing in sorted(wanted - names):
        problem(f"grafana: dashboard {missing} is missing")


def write_promql_rules(out):
    """Every dashboard expression as a recording rule, for `promtool check rules`."""
    rules = []
    for name, d in dashboards():
        for p in d["panels"]:
            for t in p["targets"]:
                expr = re.sub(r"\$__(rate_)?interval", "5m", t["expr"])
                rules.append({"record": f"dashboard:{name[:-5].replace('-', '_')}:{p['id']}{t['refId']}",
                              "expr": expr})
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, f)


# ------------------------------------------------------------------------ otel
def check_otel():
    cfg = yaml.safe_load(open(os.path.join(INFRA, "otel", "collector.yaml")))
    for ext in cfg["service"].get("extensions", []):
        if ext not in cfg.get("extensions", {}):
            problem(f"otel: extension {ext} is not configured")
    for pname, pipe in cfg["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipe.get(kind, []):
                if comp not in cfg.get(kind, {}):
                    problem(f"otel pipeline {pname}: {kind[:-1]} {comp} is not configured")


# -------------------------------------------------------------------- workflow
def check_workflow():
    path = os.path.join(ROOT, ".github", "workflows", "ci.yml")
    wf = yaml.safe_load(open(path))
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    if not triggers or "push" not in triggers or "pull_request" not in triggers:
        problem("ci.yml: must run on push and pull_request")
    for jname, job in wf["jobs"].items():
        needs = job.get("needs", [])
        for need in [needs] if isinstance(needs, str) else needs:
            if need not in wf["jobs"]:
                problem(f"ci.yml job {jname}: needs unknown job {need}")
        for i, step in enumerate(job.get("steps", [])):
            if "run" in step:
                r = subprocess.run(["bash", "-n"], input=step["run"], text=True, capture_output=True)
                if r.returncode != 0:
                    problem(f"ci.yml job {jname} step {i} ({step.get('name')}): {r.stderr.strip()}")
            elif "uses" not in step:
                problem(f"ci.yml job {jname} step {i}: neither run nor uses")
            elif "@" not in step["uses"]:
                problem(f"ci.yml job {jname} step {i}: {step['uses']} is not pinned to a version")


# ------------------------------------------------------------------------- env
def check_env():
    """Warns about variables the infra sets for our services that no service reads."""
    sources = ""
    for path in glob.glob(os.path.join(ROOT, "*", "src", "**", "*.rs"), recursive=True):
        sources += open(path).read()
    names = set()
    compose = yaml.safe_load(open(os.path.join(INFRA, "docker-compose.yml")))
    for svc in SERVICES + ["migrate-postgres", "migrate-clickhouse"]:
        names |= set((compose["services"][svc].get("environment") or {}))
    for path in glob.glob(os.path.join(INFRA, "k8s", "*.yaml")):
        for d in load_yaml_docs(path):
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "shortener-config":
                names |= set(d["data"])
            pod = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                if "ghcr.io/" in c.get("image", ""):
                    names |= {e["name"] for e in c.get("env", [])}
    # RUST_LOG is read by tracing-subscriber; the OTLP endpoint is for later.
    documented_unread = {"RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT"}
    for name in sorted(names - documented_unread):
        base = name[:-5] if name.endswith("_FILE") else name
        if f'"{base}"' not in sources:
            print(f"warning: {name} is set in infra/ but no service reads {base} (yet?)")


CHECKS = {"compose": check_compose, "k8s": check_k8s, "grafana": check_grafana, "otel": check_otel,
          "workflow": check_workflow, "env": check_env}

if __name__ == "__main__":
    if sys.argv[1] == "promql-rules":
        write_promql_rules(sys.argv[2])
    else:
        CHECKS[sys.argv[1]]()
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)
