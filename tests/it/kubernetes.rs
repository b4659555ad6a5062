//! The Kubernetes manifests (`packaging/kubernetes/`) agree with the proxy.toml they ship:
//! that file passes `idem check`, and the ports, probe paths and durations of the
//! Deployment, Service and PodDisruptionBudget are the ones it configures. No cluster here:
//! the manifests are read as YAML, not applied.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_yaml::Value;

use crate::support::*;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every document of every manifest, by kind.
fn manifests() -> BTreeMap<String, Value> {
    let dir = repo_file("packaging/kubernetes");
    let mut by_kind = BTreeMap::new();
    let kustomization: Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization.yaml"),
    )
    .expect("kustomization.yaml is YAML");
    for file in kustomization["resources"].as_sequence().expect("resources") {
        let path = dir.join(file.as_str().expect("a file name"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
            let kind = v["kind"].as_str().expect("kind").to_owned();
            assert!(
                by_kind.insert(kind.clone(), v).is_none(),
                "two {kind}s: the test reads one of each"
            );
        }
    }
    by_kind
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn secs(v: &toml::Value) -> u64 {
    humantime::parse_duration(v.as_str().unwrap())
        .unwrap_or_else(|e| panic!("{v}: {e}"))
        .as_secs()
}

/// A container port by name, or the number itself.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("a port name or number");
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

#[tokio::test]
async fn kubernetes_manifests_agree_with_their_proxy_toml() {
    let m = manifests();
    let toml_text = m["ConfigMap"]["data"]["proxy.toml"]
        .as_str()
        .expect("the ConfigMap holds proxy.toml");

    // idem's own parser accepts it.
    let (code, stdout, stderr) = Idem::check(toml_text).await;
    assert_eq!(
        code, 0,
        "idem check refused the ConfigMap's proxy.toml:\n{stderr}"
    );
    assert!(stdout.ends_with(": ok\n"), "{stdout}");
    assert!(!stderr.contains("WARN"), "{stderr}");

    let conf: toml::Table = toml_text.parse().unwrap();
    let listen = conf["server"]["listen"].as_str().unwrap();
    let metrics = conf["metrics"]["listen"].as_str().unwrap();
    // Probes and the Service reach idem from outside the pod.
    assert!(listen.starts_with("0.0.0.0:"), "{listen}");
    assert!(metrics.starts_with("0.0.0.0:"), "{metrics}");
    let shutdown_delay = secs(&conf["server"]["shutdown_delay"]);
    let grace = secs(&conf["server"]["grace_period"]);
    assert!(
        shutdown_delay >= 5,
        "endpoints need a few seconds to update"
    );

    let deployment = &m["Deployment"];
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    let container = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} container"))
    };
    let idem = container("idem");
    let app = container("app");

    // Ports: the proxy and metrics listeners.
    assert_eq!(resolve_port(idem, &"http".into()), port_of(listen));
    assert_eq!(resolve_port(idem, &"metrics".into()), port_of(metrics));
    // The backend is the app container on the pod's loopback.
    let backends = conf["upstream"]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1);
    assert_eq!(
        backends[0].as_str().unwrap(),
        format!("127.0.0.1:{}", resolve_port(app, &"app".into()))
    );

    // Probes: readiness on /readyz, liveness on /healthz, both on the metrics listener.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &idem[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            resolve_port(idem, &get["port"]),
            port_of(metrics),
            "{probe} port"
        );
    }
    // A readiness probe that notices the drain well within shutdown_delay.
    let ready = &idem["readinessProbe"];
    let notice =
        ready["periodSeconds"].as_u64().unwrap() * ready["failureThreshold"].as_u64().unwrap();
    assert!(
        notice < shutdown_delay,
        "readiness notices the drain after {notice}s, the listeners close after {shutdown_delay}s"
    );

    // The configuration file is where the container reads it.
    let args: Vec<&str> = idem["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount = idem["volumeMounts"].as_sequence().unwrap()[0].clone();
    assert_eq!(
        format!("{}/proxy.toml", mount["mountPath"].as_str().unwrap()),
        config_path
    );
    let volume = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(
        volume["configMap"]["name"],
        m["ConfigMap"]["metadata"]["name"]
    );

    // Durations: Kubernetes waits for the whole drain; the app outlasts idem's accepting.
    let termination = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        termination > shutdown_delay + grace,
        "terminationGracePeriodSeconds={termination} must exceed shutdown_delay + grace_period = {}",
        shutdown_delay + grace
    );
    let app_sleep = app["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    assert!(
        app_sleep >= shutdown_delay && app_sleep < termination,
        "the app's preStop sleep ({app_sleep}s) must cover shutdown_delay ({shutdown_delay}s)"
    );

    // Prometheus scrapes the metrics listener.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str().unwrap(),
        port_of(metrics).to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The Service sends to idem, never to the app.
    let service = &m["Service"];
    assert_eq!(&service["spec"]["selector"], labels);
    let ports = service["spec"]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(resolve_port(idem, &ports[0]["targetPort"]), port_of(listen));

    // One replica at a time may go.
    let pdb = &m["PodDisruptionBudget"];
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    let unavailable = pdb["spec"]["maxUnavailable"].as_u64().unwrap();
    assert!(
        replicas >= 2 && unavailable < replicas,
        "{replicas} {unavailable}"
    );
}
