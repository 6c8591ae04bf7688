//! `deploy/` is runnable as written: the Kubernetes manifests parse, the agent sidecar's identity is wired from the
//! downward API and, resolved as the kubelet would, reaches an aggregator as that pod; the aggregator's manifest
//! starts with its own flags, tokens and rules; the systemd units' command lines and variables are ones `strobe`
//! takes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::Value;

use crate::support::*;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of every manifest in `deploy/kubernetes`.
fn manifests() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = <Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for key in ["apiVersion", "kind"] {
                assert!(
                    value[key].is_string(),
                    "{}: {key} in {value:?}",
                    path.display()
                );
            }
            assert!(value["metadata"]["name"].is_string(), "{}", path.display());
            out.push((path.clone(), value));
        }
    }
    out
}

fn find<'a>(all: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    &all.iter()
        .find(|(_, v)| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} in deploy/kubernetes"))
        .1
}

/// A container of the pod template, among `containers` and `initContainers` (native sidecars).
fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    let spec = &deployment["spec"]["template"]["spec"];
    ["containers", "initContainers"]
        .iter()
        .filter_map(|list| spec[*list].as_sequence())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// A container's environment as the kubelet resolves it for a pod named `pod` with `labels`; secrets from `secrets`
/// (by `name/key`).
fn resolve_env(
    container: &Value,
    pod: &str,
    labels: &BTreeMap<String, String>,
    secrets: &BTreeMap<&str, &str>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = str_of(&var["name"]);
        let value = if !var["value"].is_null() {
            str_of(&var["value"])
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            if path == "metadata.name" {
                pod.to_owned()
            } else if let Some(label) = path
                .strip_prefix("metadata.labels['")
                .and_then(|l| l.strip_suffix("']"))
            {
                labels.get(label).cloned().unwrap_or_default()
            } else {
                panic!("{name}: field {path} is not resolved by this test");
            }
        } else if let Some(secret) = var["valueFrom"]["secretKeyRef"].as_mapping() {
            let key = format!(
                "{}/{}",
                str_of(&secret[&Value::from("name")]),
                str_of(&secret[&Value::from("key")])
            );
            secrets
                .get(key.as_str())
                .unwrap_or_else(|| panic!("secret {key}"))
                .to_string()
        } else {
            panic!("{name}: no value");
        };
        out.push((name, value));
    }
    out
}

/// `strobe <subcommand> --help`.
async fn help(subcommand: &str) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_strobe"))
        .args([subcommand, "--help"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

/// Every `STROBE_*` variable is one the subcommand reads (clap lists them as `[env: NAME=`).
fn assert_env_known(what: &str, names: impl IntoIterator<Item = String>, help: &str) {
    for name in names {
        if name.starts_with("STROBE_") {
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{what}: {name} is not a variable strobe reads:\n{help}"
            );
        }
    }
}

fn with_env(env: &mut [(String, String)], name: &str, value: &str) {
    let slot = env
        .iter_mut()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("{name} set in the manifest"));
    slot.1 = value.to_owned();
}

/// The sidecar's identity comes from the pod, and a pod resolved as the kubelet would resolve it streams under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_sidecar_streams_under_the_pods_identity() {
    let all = manifests();
    let deployment = find(&all, "Deployment", "checkout");
    let template = &deployment["spec"]["template"];
    let agent = container(deployment, "strobe-agent");
    // The identity wiring: each from the downward API, the labels it reads present on the pod template.
    let field = |name: &str| -> String {
        agent["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["valueFrom"]["fieldRef"]["fieldPath"].as_str())
            .unwrap_or_else(|| panic!("{name} from a fieldRef"))
            .to_owned()
    };
    assert_eq!(field("STROBE_INSTANCE"), "metadata.name");
    let mut labels: BTreeMap<String, String> = template["metadata"]["labels"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (str_of(k), str_of(v)))
        .collect();
    for name in ["STROBE_SERVICE", "STROBE_VERSION"] {
        let label = field(name)
            .strip_prefix("metadata.labels['")
            .and_then(|l| l.strip_suffix("']"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{name} from a pod label"));
        assert!(
            labels.contains_key(&label),
            "{name}: label {label} on the pod template"
        );
    }
    assert_eq!(
        field("STROBE_ZONE"),
        "metadata.labels['topology.kubernetes.io/zone']"
    );
    assert_eq!(agent["args"][0], "agent");
    assert_env_known(
        "the sidecar",
        agent["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| str_of(&v["name"])),
        &help("agent").await,
    );

    // The pod as the kubelet resolves it (the zone label copied from its node), pointed at a local aggregator.
    // A native sidecar: an init container that keeps running.
    assert_eq!(
        agent["restartPolicy"], "Always",
        "the agent starts before the service"
    );
    let aggregator = aggregator(&["--agent-token", "agents:agent-secret-0001"]).await;
    labels.insert("topology.kubernetes.io/zone".into(), "eu-west-1a".into());
    let pod = "checkout-5d8f7c9b4-x2k9q";
    // The Secret holds the token's secret part, as the manifest's comment says to create it.
    let secrets = BTreeMap::from([("strobe-agent-token/token", "agent-secret-0001")]);
    let mut env = resolve_env(agent, pod, &labels, &secrets);
    with_env(
        &mut env,
        "STROBE_AGGREGATOR",
        &format!("http://{}", aggregator.addr("grpc")),
    );
    for name in [
        "STROBE_STATSD_ADDR",
        "STROBE_OTLP_ADDR",
        "STROBE_OTLP_HTTP_ADDR",
        "STROBE_METRICS_ADDR",
    ] {
        with_env(&mut env, name, "127.0.0.1:0");
    }
    let agent = spawn_with_env(&["agent"], &env).await;
    for name in ["statsd", "otlp", "otlp_http", "metrics"] {
        agent.addr(name); // every listener the manifest asks for is up
    }
    send_statsd(agent.addr("statsd"), &["deployed:1|c".to_owned()]).await;
    let http = aggregator.addr("http");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = crate::support::http(http, "GET", "/api/v1/services", "").await;
        let services: serde_json::Value = serde_json::from_str(&body).unwrap();
        let instance = services["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "checkout")
            .and_then(|s| s["instances"].as_array()?.first().cloned());
        if let Some(instance) = instance {
            assert_eq!(instance["id"], pod);
            assert_eq!(instance["version"], "v42");
            assert_eq!(instance["zone"], "eu-west-1a");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod's agent seen: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The aggregator's manifest: its Service reaches its named ports, and the container starts with the manifest's
/// flags, tokens and rules (addresses and paths moved to this machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_aggregator_starts_with_its_manifests_flags_tokens_and_rules() {
    let all = manifests();
    let deployment = find(&all, "Deployment", "strobe-aggregator");
    let service = find(&all, "Service", "strobe-aggregator");
    let rules = find(&all, "ConfigMap", "strobe-rules");
    let aggregator = container(deployment, "aggregator");
    let port_names: Vec<String> = aggregator["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| str_of(&p["name"]))
        .collect();
    for port in service["spec"]["ports"].as_sequence().unwrap() {
        let target = str_of(&port["targetPort"]);
        assert!(
            port_names.contains(&target),
            "Service port {target} is a container port"
        );
    }
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );
    let help = help("aggregator").await;
    assert_env_known(
        "the aggregator",
        aggregator["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| str_of(&v["name"])),
        &help,
    );

    let dir = scratch_dir().join("deploy");
    std::fs::create_dir_all(&dir).unwrap();
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, str_of(&rules["data"]["rules.toml"])).unwrap();
    let moved = |arg: &str| -> String {
        match arg.split_once('=') {
            Some(("--grpc-addr" | "--http-addr", _)) => {
                format!("{}=127.0.0.1:0", arg.split_once('=').unwrap().0)
            }
            Some(("--rules", _)) => format!("--rules={}", rules_path.display()),
            Some(("--state-dir", _)) => format!("--state-dir={}", dir.join("state").display()),
            _ => arg.to_owned(),
        }
    };
    let args: Vec<String> = aggregator["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| moved(&str_of(a)))
        .collect();
    let secrets = BTreeMap::from([
        ("strobe-tokens/agent", "agents:agent-secret-0001"),
        ("strobe-tokens/read", "oncall:read-secret-0001"),
        ("strobe-tokens/admin", "admin:admin-secret-0001"),
    ]);
    let env = resolve_env(
        aggregator,
        "strobe-aggregator-0",
        &BTreeMap::new(),
        &secrets,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = spawn_with_env(&args, &env).await;
    let http = process.addr("http");
    let (status, _) = crate::support::http(http, "GET", "/api/v1/rules", "").await;
    assert_eq!(status, 401, "tokens from the Secret are required");
    let (status, _, body) = http_with(
        http,
        "GET",
        "/api/v1/rules",
        "",
        &[("authorization", "Bearer read-secret-0001")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("checkout-p99"),
        "the ConfigMap's rules: {body}"
    );
}

/// A unit file's `Key=value` lines, by key.
fn unit(path: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: {line}", path.display()));
        out.entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    out
}

/// The systemd units run `strobe` with flags and variables it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_run_strobe_with_flags_and_variables_it_takes() {
    for (file, subcommand) in [
        ("strobe-aggregator.service", "aggregator"),
        ("strobe-agent@.service", "agent"),
    ] {
        let path = deploy_dir().join("systemd").join(file);
        let unit = unit(&path);
        let exec = &unit["ExecStart"][0];
        let args: Vec<String> = exec
            .strip_prefix("/usr/local/bin/strobe ")
            .unwrap_or_else(|| panic!("{file}: ExecStart runs /usr/local/bin/strobe"))
            .split_whitespace()
            .map(|a| a.replace("%i", "checkout"))
            .collect();
        assert!(args.contains(&subcommand.to_owned()), "{file}: {exec}");
        // clap stops at the first flag it does not know, before it reads --help.
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_strobe"))
            .args(&args)
            .arg("--help")
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{file}: {exec}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let names = unit
            .get("Environment")
            .into_iter()
            .flatten()
            .map(|kv| kv.split_once('=').unwrap().0.to_owned());
        assert_env_known(file, names, &help(subcommand).await);
        for key in ["Restart", "DynamicUser", "NoNewPrivileges"] {
            assert!(unit.contains_key(key), "{file}: {key}");
        }
    }
}
