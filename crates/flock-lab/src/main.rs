//! `flock lab`: a small routed cluster in network namespaces on this
//! machine, for trying flock without Kubernetes. A ToR runs BIRD; two
//! nodes each run the real `flock-agent` (with a `dir:` datastore shared
//! by the cluster) and BIRD; pods are added through the real `flock`
//! plugin — dual-stack, an anycast service on both nodes, a NetworkPolicy —
//! and a report shows pods, the ToR's BGP routes, a connectivity matrix
//! and the anycast ECMP nexthops. Everything stays up until
//! `flock lab down`, which removes everything the lab made (its network
//! namespaces are named `flock-lab-*`; its processes are the PIDs it
//! recorded).
//!
//! `flock lab --kube` runs the same lab on the production path: etcd and a
//! real kube-apiserver on loopback (built by `scripts/kube-bin.sh`, with
//! the shipped CRDs and RBAC), the agents on the `kubernetes` datastore as
//! the flock ServiceAccount, every object created through the API and each
//! pod's status patched as its kubelet would.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flock_netlink::Netns;
use flock_proto::admin::{AdminRequest, AdminResponse};
use flock_testkit::apiserver::KubeCluster;
use flock_testkit::fabric;

/// Where the lab keeps its files (manifests, state, logs, PIDs).
const ROOT: &str = "/run/flock-lab";
/// Every namespace of the lab starts with this.
const PREFIX: &str = "flock-lab-";
const TOR: &str = "flock-lab-tor";
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
const ANYCAST4: &str = "203.0.113.53";
const ANYCAST6: &str = "2001:db8:aa::53";

struct NodeSpec {
    name: &'static str,
    n: u8,
    asn: u32,
}

const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "node-a",
        n: 1,
        asn: 65001,
    },
    NodeSpec {
        name: "node-b",
        n: 2,
        asn: 65002,
    },
];

struct PodSpec {
    namespace: &'static str,
    name: &'static str,
    node: usize,
    labels: &'static [(&'static str, &'static str)],
    anycast: bool,
    port: u16,
}

const PODS: [PodSpec; 6] = [
    PodSpec {
        namespace: "web",
        name: "frontend-a",
        node: 0,
        labels: &[("app", "frontend"), ("role", "frontend")],
        anycast: false,
        port: 80,
    },
    PodSpec {
        namespace: "web",
        name: "dns-a",
        node: 0,
        labels: &[("app", "dns")],
        anycast: true,
        port: 53,
    },
    PodSpec {
        namespace: "db",
        name: "postgres",
        node: 0,
        labels: &[("app", "postgres")],
        anycast: false,
        port: 5432,
    },
    PodSpec {
        namespace: "web",
        name: "frontend-b",
        node: 1,
        labels: &[("app", "frontend"), ("role", "frontend")],
        anycast: false,
        port: 80,
    },
    PodSpec {
        namespace: "web",
        name: "dns-b",
        node: 1,
        labels: &[("app", "dns")],
        anycast: true,
        port: 53,
    },
    PodSpec {
        namespace: "web",
        name: "batch",
        node: 1,
        labels: &[("app", "batch")],
        anycast: false,
        port: 80,
    },
];

const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: postgres-from-frontends, namespace: db}
spec:
  podSelector: {matchLabels: {app: postgres}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: frontend}}}]
    ports: [{port: 5432}]
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kube = args.iter().any(|a| a == "--kube");
    let rest: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--kube")
        .collect();
    let outcome = match rest.as_slice() {
        [] | ["up"] => up(kube),
        ["down"] => down(true),
        // Internal: the API server forward a `--kube` lab runs per node.
        ["forward", ns, port] => forward(ns, port),
        ["-h" | "--help" | "help"] => {
            println!(
                "usage: flock lab [up] [--kube] | flock lab down\n\n  up      build the lab (taking down an earlier one) and print its report\n  --kube  on a real kube-apiserver and etcd: the agents use the kubernetes\n          datastore, every object goes through the API\n  down    remove everything the lab made"
            );
            Ok(())
        }
        _ => Err(anyhow::anyhow!(
            "unknown lab command {:?} (use up, up --kube or down)",
            rest.join(" ")
        )),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flock lab: {e:#}");
            if Path::new(ROOT).exists() {
                eprintln!("flock lab: what was made so far stays; `flock lab down` removes it");
            }
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn node_ns(n: &NodeSpec) -> String {
    format!("{PREFIX}{}", n.name)
}

fn pod_ns(p: &PodSpec) -> String {
    format!("{PREFIX}pod-{}-{}", p.namespace, p.name)
}

fn netns(name: &str) -> Netns {
    Netns::Path(PathBuf::from("/var/run/netns").join(name))
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
}

/// Installs the Debian packages the lab runs, when missing.
fn ensure_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for (cmd, pkg) in [
        ("bird", "bird2"),
        ("birdc", "bird2"),
        ("nft", "nftables"),
        ("ip", "iproute2"),
    ] {
        if !on_path(cmd) && !missing.contains(&pkg) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {} (apt-get)…", missing.join(" "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .context("running apt-get")?;
        ensure!(status.success(), "apt-get {} failed", args.join(" "));
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    apt(&args)
}

fn require_root() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    ensure!(
        euid == Some("0"),
        "the lab creates network namespaces: run it as root"
    );
    Ok(())
}

/// The lab's programs, beside this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    ensure!(
        path.exists(),
        "{} is missing: build everything first (cargo build --release)",
        path.display()
    );
    Ok(path)
}

/// Starts `argv` inside `ns` (or here, with `None`) in a process group of
/// its own (it outlives the lab command), logging to `log`; records its
/// PID for `down`.
fn daemon(ns: Option<&str>, argv: &[&str], log: &Path, what: &str) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let pid = child.id();
    record_pid(pid, what)?;
    Ok(pid)
}

/// Appends `pid` (running `what`, its first word the program) to the PIDs
/// `down` stops.
fn record_pid(pid: u32, what: &str) -> anyhow::Result<()> {
    let mut pids = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root().join("pids"))?;
    writeln!(pids, "{pid} {what}")?;
    Ok(())
}

/// The `forward NS PORT` daemon: 127.0.0.1:PORT inside namespace NS
/// forwarded to the API server at 127.0.0.1:PORT here, until killed.
fn forward(ns: &str, port: &str) -> anyhow::Result<()> {
    let port: u16 = port.parse().context("forward: the port")?;
    let _forward = flock_testkit::apiserver::forward(&netns(ns), port);
    println!("forwarding 127.0.0.1:{port} in {ns} to the API server");
    loop {
        std::thread::park();
    }
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn manifest(name: &str, text: &str) -> anyhow::Result<()> {
    let dir = root().join("manifests");
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.yaml")))?;
    Ok(())
}

fn pod_manifest(p: &PodSpec, ips: &[IpAddr]) -> String {
    let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let annotations = if p.anycast {
        format!("flock.fritzlab.net/anycast: '{ANYCAST4},{ANYCAST6}'")
    } else {
        String::new()
    };
    let pod_ips: Vec<String> = ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: lab-{}-{}\n  labels: {{{}}}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: {}\n  containers:\n  - {{name: main, image: 'busybox:1.36', ports: [{{name: service, containerPort: {}}}]}}\nstatus:\n  phase: Running\n  conditions: [{{type: Ready, status: 'True'}}]\n  podIPs: [{}]\n",
        p.name,
        p.namespace,
        p.namespace,
        p.name,
        labels.join(", "),
        NODES[p.node].name,
        p.port,
        pod_ips.join(", ")
    )
}

/// Runs the plugin for `p` (whose UID is `uid`) like a kubelet runtime does.
fn cni(plugin: &Path, p: &PodSpec, uid: &str, command: &str) -> anyhow::Result<serde_json::Value> {
    let node = &NODES[p.node];
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("lab-{}-{}", p.namespace, p.name))
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod_ns(p)))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=lab-{}-{};K8S_POD_UID={uid}",
                p.namespace, p.name, p.namespace, p.name
            ),
        )
        .env("FLOCK_AGENT_SOCKET", root().join(node.name).join("flock.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the flock plugin")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(CONF.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{command} {}/{}: {text}",
        p.namespace,
        p.name
    );
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

fn result_ips(result: &serde_json::Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// Where the lab's objects live: the agents' shared `dir:` datastore, or a
/// real API server (`--kube`).
enum Objects {
    Dir,
    Kube(Box<KubeCluster>),
}

const NAMESPACES: [(&str, &str); 2] = [("web", "web"), ("db", "data")];

impl Objects {
    /// Starts etcd and kube-apiserver under the lab's directory (their
    /// PIDs recorded for `down`), applying the shipped CRDs and RBAC.
    fn kube() -> anyhow::Result<Objects> {
        println!(
            "starting etcd and kube-apiserver (scripts/kube-bin.sh builds them on a machine's first run: minutes)…"
        );
        let started = std::panic::catch_unwind(|| KubeCluster::start_in(&root().join("kube")));
        let mut cluster = started.map_err(|_| {
            anyhow::anyhow!("the control plane did not start (its logs: {ROOT}/kube)")
        })?;
        for (pid, what) in cluster.detach() {
            record_pid(pid, what)?;
        }
        for n in &NODES {
            cluster.create_node(n.name);
        }
        Ok(Objects::Kube(Box::new(cluster)))
    }

    /// Writes `yaml` as manifest `name`, or applies it through the API.
    fn put(&self, name: &str, yaml: &str) -> anyhow::Result<()> {
        match self {
            Objects::Dir => manifest(name, yaml),
            Objects::Kube(cluster) => {
                cluster.apply(yaml);
                Ok(())
            }
        }
    }

    /// The lab's namespaces and their `team` labels.
    fn namespaces(&self) -> anyhow::Result<()> {
        match self {
            Objects::Dir => {
                let docs: Vec<String> = NAMESPACES
                    .iter()
                    .map(|(ns, team)| {
                        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{team: {team}}}}}\n")
                    })
                    .collect();
                manifest("namespaces", &docs.join("---\n"))
            }
            Objects::Kube(cluster) => {
                for (ns, team) in NAMESPACES {
                    cluster.create_namespace(ns, &[("team", team)]);
                }
                Ok(())
            }
        }
    }

    /// Creates pod `p`, bound to its node and not started; returns its UID.
    fn create_pod(&self, p: &PodSpec) -> anyhow::Result<String> {
        match self {
            Objects::Dir => {
                manifest(&pod_file(p), &pod_manifest(p, &[]))?;
                Ok(format!("lab-{}-{}", p.namespace, p.name))
            }
            Objects::Kube(cluster) => {
                let anycast = format!("{ANYCAST4},{ANYCAST6}");
                let annotations: &[(&str, &str)] = if p.anycast {
                    &[("flock.fritzlab.net/anycast", anycast.as_str())]
                } else {
                    &[]
                };
                Ok(cluster.create_pod(
                    p.namespace,
                    p.name,
                    NODES[p.node].name,
                    p.labels,
                    annotations,
                ))
            }
        }
    }

    /// Pod `p` runs with `ips` and is Ready, as its kubelet reports.
    fn pod_started(&self, p: &PodSpec, ips: &[IpAddr]) -> anyhow::Result<()> {
        match self {
            Objects::Dir => manifest(&pod_file(p), &pod_manifest(p, ips)),
            Objects::Kube(cluster) => {
                cluster.set_pod_status(p.namespace, p.name, ips, true);
                Ok(())
            }
        }
    }

    /// The agent's `--datastore` and its environment for `node`; for the
    /// API server, this also writes the node's kubeconfig and starts its
    /// forward.
    fn datastore(&self, node: &NodeSpec) -> anyhow::Result<(String, Vec<String>)> {
        match self {
            Objects::Dir => Ok((
                format!("dir:{}", root().join("manifests").display()),
                Vec::new(),
            )),
            Objects::Kube(cluster) => {
                let kubeconfig = root().join(node.name).join("flock.kubeconfig");
                cluster.kubeconfig_for("kube-system", "flock", &kubeconfig);
                // The agent reaches the API server at the same loopback
                // address inside its node namespace.
                let lab = std::env::current_exe()?.display().to_string();
                let port = cluster.api_port().to_string();
                daemon(
                    None,
                    &[&lab, "forward", &node_ns(node), &port],
                    &root().join(node.name).join("forward.log"),
                    &format!("flock-lab forward {}", node.name),
                )?;
                Ok((
                    "kubernetes".to_owned(),
                    vec![format!("KUBECONFIG={}", kubeconfig.display())],
                ))
            }
        }
    }
}

fn pod_file(p: &PodSpec) -> String {
    format!("pod-{}-{}", p.namespace, p.name)
}

fn up(kube: bool) -> anyhow::Result<()> {
    require_root()?;
    ensure_packages()?;
    if root().exists() || !lab_namespaces()?.is_empty() {
        println!("a lab is already up: taking it down first");
        down(false)?;
    }
    let agent = sibling("flock-agent")?;
    let plugin = sibling("flock")?;
    std::fs::create_dir_all(root().join("manifests"))?;
    let started = Instant::now();
    let objects = if kube { Objects::kube()? } else { Objects::Dir };

    // Objects every agent reads: namespaces and both NodeConfigs.
    objects.namespaces()?;
    let mut configs = String::new();
    for n in &NODES {
        configs += &format!(
            "apiVersion: flock.fritzlab.net/v1alpha1\nkind: NodeConfig\nmetadata: {{name: {}}}\nspec:\n{}\n---\n",
            n.name,
            fabric::node_spec(n.n, n.asn)
        );
    }
    objects.put("nodeconfigs", &configs)?;
    // The operator's consent for the DNS service's anycast IPs, for team web only.
    objects.put(
        "addresspools",
        &format!(
            "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {{name: dns-anycast}}\nspec:\n  cidrs: ['{ANYCAST4}/32', '{ANYCAST6}/128']\n  use: anycast\n  namespaceSelector: {{matchLabels: {{team: web}}}}\n"
        ),
    )?;

    // The ToR, and each node wired to it.
    run("ip", &["netns", "add", TOR])?;
    ip(TOR, &["link", "set", "lo", "up"])?;
    fabric::tor_forwarding(TOR).map_err(anyhow::Error::msg)?;
    for node in &NODES {
        let ns = node_ns(node);
        run("ip", &["netns", "add", &ns])?;
        ip(&ns, &["link", "set", "lo", "up"])?;
        fabric::uplink(TOR, &ns, node.n).map_err(anyhow::Error::msg)?;
        // The agent, then BIRD once the agent has rendered its config.
        let dir = root().join(node.name);
        std::fs::create_dir_all(dir.join("bird"))?;
        let s = |p: &str| dir.join(p).display().to_string();
        // The runtime's CNI directory as the installer leaves it, for
        // `flockctl doctor`.
        std::fs::create_dir_all(dir.join("cni"))?;
        std::fs::write(
            dir.join("cni/01-flock.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"flock"}]}"#,
        )?;
        let (datastore, env) = objects.datastore(node)?;
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(env);
        argv.push(agent.display().to_string());
        for arg in [
            "--node",
            node.name,
            "--datastore",
            &datastore,
            "--socket",
            &s("flock.sock"),
            "--state-dir",
            &s("state"),
            "--bird-config",
            &s("bird/bird.conf"),
            "--bird-socket",
            &s("bird.ctl"),
            "--cni-conf-dir",
            &s("cni"),
            "--metrics-addr",
            "127.0.0.1:9602",
            "--log-format",
            "json",
        ] {
            argv.push(arg.to_owned());
        }
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        daemon(
            Some(&ns),
            &argv,
            &dir.join("agent.log"),
            &format!("flock-agent {}", node.name),
        )?;
    }
    let tor_dir = root().join("tor");
    std::fs::create_dir_all(&tor_dir)?;
    let peers: Vec<(&str, u8, u32)> = NODES.iter().map(|n| (n.name, n.n, n.asn)).collect();
    std::fs::write(tor_dir.join("bird.conf"), fabric::tor_bird_config(&peers))?;
    let tor_conf_path = tor_dir.join("bird.conf").display().to_string();
    let tor_ctl = tor_dir.join("bird.ctl").display().to_string();
    daemon(
        Some(TOR),
        &["bird", "-f", "-c", &tor_conf_path, "-s", &tor_ctl],
        &tor_dir.join("bird.log"),
        "bird tor",
    )?;
    for node in &NODES {
        let dir = root().join(node.name);
        let conf = dir.join("bird/bird.conf");
        wait_for(
            &format!("{}'s agent to render bird.conf", node.name),
            Duration::from_secs(30),
            || std::fs::read_to_string(&conf).is_ok_and(|c| c.contains("protocol bgp")),
        )
        .with_context(|| format!("see {}", dir.join("agent.log").display()))?;
        daemon(
            Some(&node_ns(node)),
            &[
                "bird",
                "-f",
                "-R",
                "-c",
                &conf.display().to_string(),
                "-s",
                &dir.join("bird.ctl").display().to_string(),
            ],
            &dir.join("bird.log"),
            &format!("bird {}", node.name),
        )?;
    }

    // Pods, through the real plugin; then their manifests carry their IPs
    // (as the kubelet's status update would), for policies on other nodes.
    let mut ips: Vec<Vec<IpAddr>> = Vec::new();
    let mut uids = Vec::new();
    for p in &PODS {
        uids.push(objects.create_pod(p)?);
    }
    for (p, uid) in PODS.iter().zip(&uids) {
        run("ip", &["netns", "add", &pod_ns(p)])?;
        let result = cni(&plugin, p, uid, "ADD")?;
        let got = result_ips(&result);
        objects.pod_started(p, &got)?;
        ips.push(got);
    }
    objects.put("policy", POLICY)?;

    wait_for(
        "the ToR to learn both nodes' prefixes and the anycast IP from both",
        Duration::from_secs(30),
        || {
            let routes = ip(TOR, &["route"]).unwrap_or_default();
            let any = ip(TOR, &["route", "show", ANYCAST4]).unwrap_or_default();
            routes.contains("198.18.1.0/24")
                && routes.contains("198.18.2.0/24")
                && any.matches("nexthop").count() == 2
        },
    )?;
    println!(
        "flock lab is up ({:.1} s)\n",
        started.elapsed().as_secs_f64()
    );
    report(&ips, &objects)
}

fn lab_namespaces() -> anyhow::Result<Vec<String>> {
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

fn report(ips: &[Vec<IpAddr>], objects: &Objects) -> anyhow::Result<()> {
    println!(
        "A ToR ({TOR}) running BIRD, peered over eBGP with two nodes ({PREFIX}node-a, {PREFIX}node-b),\neach running flock-agent and BIRD. Pods are network namespaces {PREFIX}pod-<namespace>-<name>.\n"
    );
    match objects {
        Objects::Dir => {
            println!("DATASTORE dir:{ROOT}/manifests (the agents watch the directory)\n")
        }
        Objects::Kube(cluster) => println!(
            "DATASTORE kubernetes: kube-apiserver at https://127.0.0.1:{} with etcd; the agents run as\n  ServiceAccount kube-system/flock (deploy/rbac.yaml), pods and NetworkPolicies went through the API\n",
            cluster.api_port()
        ),
    }
    // Each node as `flockctl status` and `flockctl pods` show it (the same
    // requests and the same renderer).
    for node in &NODES {
        let socket = admin_socket(node);
        println!("NODE {} (flockctl status, flockctl pods)", node.name);
        let status = ask(&socket, &AdminRequest::Status)?;
        let pods = ask(&socket, &AdminRequest::Pods)?;
        match (status, pods) {
            (AdminResponse::Status(s), AdminResponse::Pods(p)) => {
                print_indented(&flockctl::render_status(&s));
                print_indented(&flockctl::render_pods(&p));
            }
            (s, p) => bail!("{}: unexpected admin answers {s:?} {p:?}", node.name),
        }
        println!();
    }
    let via_node = |line: &str| {
        NODES
            .iter()
            .find(|n| {
                line.contains(&format!("198.19.{}.1 ", n.n))
                    || line.contains(&format!("2001:db8:ff:{}::1 ", n.n))
            })
            .map_or("", |n| n.name)
    };
    println!("\nTHE TOR'S BGP ROUTES (ip -n {TOR} route; proto bird)");
    for family in [&["route"][..], &["-6", "route"][..]] {
        let mut args = family.to_vec();
        args.extend(["show", "proto", "bird"]);
        let text = ip(TOR, &args)?;
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let mut hops = Vec::new();
            while let Some(next) = lines.peek().filter(|l| l.starts_with(char::is_whitespace)) {
                hops.push(via_node(next).to_owned());
                lines.next();
            }
            let dst = line.split_whitespace().next().unwrap_or_default();
            if hops.is_empty() {
                println!("  {dst:<24} → {}", via_node(line));
            } else {
                println!("  {dst:<24} → ECMP {}", hops.join(" + "));
            }
        }
    }

    println!("\nANYCAST {ANYCAST4} / {ANYCAST6}");
    for (family, addr) in [("", ANYCAST4), ("-6", ANYCAST6)] {
        let mut args: Vec<&str> = if family.is_empty() {
            vec![]
        } else {
            vec![family]
        };
        args.extend(["route", "show", addr]);
        let hops: Vec<String> = ip(TOR, &args)?
            .lines()
            .filter(|l| l.contains("nexthop"))
            .map(|l| l.split_whitespace().nth(2).unwrap_or_default().to_owned())
            .collect();
        println!("  ToR nexthops for {addr}: {}", hops.join(", "));
    }
    // Which replicas answer: UDP flows from the ToR, one source port each.
    let echoes: Vec<(&PodSpec, flock_testkit::Echo)> = PODS
        .iter()
        .filter(|p| p.anycast)
        .map(|p| {
            let addr = SocketAddr::new(ANYCAST4.parse().expect("anycast"), 5353);
            (p, flock_testkit::udp_echo_on(&netns(&pod_ns(p)), addr))
        })
        .collect();
    let tor = netns(TOR);
    let flows = 32;
    let mut answered = 0;
    for _ in 0..flows {
        let to = SocketAddr::new(ANYCAST4.parse().expect("anycast"), 5353);
        if flock_testkit::udp_probe(&tor, to, Duration::from_millis(500)).is_some() {
            answered += 1;
        }
    }
    let split: Vec<String> = echoes
        .iter()
        .map(|(p, e)| format!("{}/{} {}", p.namespace, p.name, e.hits()))
        .collect();
    println!(
        "  {flows} UDP flows from the ToR to {ANYCAST4}: {answered} answered — {}",
        split.join(", ")
    );
    drop(echoes);

    connectivity(ips)?;
    let flockctl = sibling("flockctl")?;
    let a = admin_socket(&NODES[0]);
    println!(
        "\nTry flockctl (each node's agent answers on {ROOT}/<node>/admin.sock; `flockctl --help`):"
    );
    for command in [
        "status",
        "pods",
        "ipam check",
        "anycast",
        "bgp",
        "doctor",
        "policy explain web/batch db/postgres 5432/tcp",
    ] {
        println!(
            "             {} --socket {} {command}",
            flockctl.display(),
            a.display()
        );
    }
    println!("\nLook around: ip netns exec {TOR} birdc -s {ROOT}/tor/bird.ctl show route");
    println!("             ip netns exec {PREFIX}node-a nft list table inet flock");
    match objects {
        Objects::Dir => println!(
            "             logs: {ROOT}/<node>/agent.log, {ROOT}/<node>/bird.log; manifests: {ROOT}/manifests"
        ),
        Objects::Kube(cluster) => {
            println!(
                "             kubectl --kubeconfig {} get pods,nodeconfigs,networkpolicies -A",
                cluster.admin_kubeconfig().display()
            );
            println!(
                "             logs: {ROOT}/<node>/agent.log, {ROOT}/<node>/bird.log, {ROOT}/kube/kube-apiserver.log"
            );
        }
    }
    println!("Remove everything: flock lab down");
    Ok(())
}

/// TCP from every pod to every other pod's port, over IPv4 and IPv6, with
/// the policy that decided where one applies.
fn connectivity(ips: &[Vec<IpAddr>]) -> anyhow::Result<()> {
    let servers: Vec<flock_testkit::TcpServer> = PODS
        .iter()
        .map(|p| flock_testkit::tcp_listen(&netns(&pod_ns(p)), p.port))
        .collect();
    let rules = policy_view()?;
    println!(
        "\nCONNECTIVITY (TCP from each pod to each pod's port over IPv4 and IPv6; ✓ connects, ✗ does not;"
    );
    println!("              [n]: the NetworkPolicy that decided, listed below)");
    let mut legend: Vec<String> = Vec::new();
    let marks: Vec<Option<usize>> = (0..PODS.len())
        .map(|j| {
            rules.get(&j).map(|policy| {
                let text = format!(
                    "{policy} (isolates {}/{} for ingress)",
                    PODS[j].namespace, PODS[j].name
                );
                legend.iter().position(|l| *l == text).unwrap_or_else(|| {
                    legend.push(text);
                    legend.len() - 1
                })
            })
        })
        .collect();
    print!("  {:<16}", "from \\ to");
    for p in &PODS {
        print!(" {:<15}", format!("{}:{}", p.name, p.port));
    }
    println!();
    for (i, from) in PODS.iter().enumerate() {
        print!("  {:<16}", format!("{}/{}", from.namespace, from.name));
        let results: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = PODS
                .iter()
                .enumerate()
                .map(|(j, to)| {
                    let marks = &marks;
                    s.spawn(move || {
                        if i == j {
                            return "·".to_owned();
                        }
                        let ns = netns(&pod_ns(from));
                        let ok: Vec<bool> = ips[j]
                            .iter()
                            .map(|ip| {
                                flock_testkit::tcp_connects(
                                    &ns,
                                    SocketAddr::new(*ip, to.port),
                                    Duration::from_millis(300),
                                )
                            })
                            .collect();
                        let mark = if ok.iter().all(|b| *b) {
                            "✓"
                        } else if ok.iter().any(|b| *b) {
                            "? (one family)"
                        } else {
                            "✗"
                        };
                        match marks[j] {
                            Some(n) => format!("{mark} [{}]", n + 1),
                            None => mark.to_owned(),
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for r in results {
            print!(" {r:<15}");
        }
        println!();
    }
    for (n, l) in legend.iter().enumerate() {
        println!("  [{}] {l}", n + 1);
    }
    drop(servers);
    Ok(())
}

/// Which policy decides each pod's ingress (by pod index), as `flockctl
/// policy explain` answers it: the agents' own compiled policies.
fn policy_view() -> anyhow::Result<BTreeMap<usize, String>> {
    let socket = admin_socket(&NODES[0]);
    let mut out = BTreeMap::new();
    for (j, to) in PODS.iter().enumerate() {
        let Some(from) = PODS
            .iter()
            .find(|p| p.namespace != to.namespace || p.name != to.name)
        else {
            continue;
        };
        let request = AdminRequest::PolicyExplain {
            src: format!("{}/{}", from.namespace, from.name),
            dst: format!("{}/{}", to.namespace, to.name),
            port: to.port,
            protocol: "TCP".into(),
        };
        let AdminResponse::PolicyExplain(v) = ask(&socket, &request)? else {
            bail!(
                "policy explain for {}/{}: unexpected answer",
                to.namespace,
                to.name
            );
        };
        let policies = match (&v.ingress.policy, v.ingress.isolated_by.is_empty()) {
            (Some(policy), _) => policy.clone(),
            (None, false) => v.ingress.isolated_by.join(", "),
            (None, true) => continue,
        };
        out.insert(j, policies);
    }
    Ok(out)
}

/// The admin socket of `node`'s agent (beside its plugin socket).
fn admin_socket(node: &NodeSpec) -> PathBuf {
    root().join(node.name).join("admin.sock")
}

/// One admin request to an agent of the lab.
fn ask(socket: &Path, request: &AdminRequest) -> anyhow::Result<AdminResponse> {
    let (_, response) = flockctl::ask(socket, request).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let AdminResponse::Error(e) = &response {
        bail!("{}: {e}", socket.display());
    }
    Ok(response)
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

/// Stops the lab's processes (only the PIDs it recorded, and only when
/// they still are what it started), deletes its namespaces and files.
fn down(verbose: bool) -> anyhow::Result<()> {
    require_root()?;
    let pids = std::fs::read_to_string(root().join("pids")).unwrap_or_default();
    let mut stopped = 0;
    for line in pids.lines() {
        let Some((pid, what)) = line.split_once(' ') else {
            continue;
        };
        let program = what.split_whitespace().next().unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(program) {
            continue; // gone, or the PID now belongs to someone else
        }
        let _ = Command::new("kill").args(["-TERM", pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        stopped += 1;
    }
    let namespaces = lab_namespaces()?;
    for ns in &namespaces {
        let _ = run("ip", &["netns", "del", ns]);
    }
    if root().exists() {
        std::fs::remove_dir_all(root()).with_context(|| format!("removing {ROOT}"))?;
    }
    if verbose {
        println!(
            "flock lab is down: {stopped} processes stopped, {} namespaces and {ROOT} removed",
            namespaces.len()
        );
    }
    Ok(())
}
