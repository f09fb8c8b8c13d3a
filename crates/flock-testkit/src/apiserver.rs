//! A real control plane for tests: etcd and kube-apiserver (built by
//! `scripts/kube-bin.sh`) on loopback, with RBAC authorization, serving
//! certificates from a CA the kit makes, and a service-account signing key.
//!
//! [`KubeCluster::start`] waits for `/readyz`, applies `deploy/crds/` and
//! `deploy/rbac.yaml` exactly as shipped, creates the ServiceAccounts a
//! controller-manager would, and hands out kubeconfigs holding a
//! TokenRequest token, so a client runs as that identity and RBAC is the
//! API server's own. Dropping the cluster stops both processes (by PID)
//! and removes their files.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::json;

use crate::NetnsGuard;

/// The binaries `scripts/kube-bin.sh` built (or found in its cache).
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    /// etcd.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// critest (cri-tools' CRI conformance suite).
    pub critest: PathBuf,
}

impl KubeBinaries {
    /// Runs `scripts/kube-bin.sh` once per process (a cached build takes
    /// seconds) and reads its `NAME PATH` lines; panics with its output
    /// when it fails, since a test that needs them cannot do its work.
    pub fn get() -> &'static KubeBinaries {
        static BINS: OnceLock<KubeBinaries> = OnceLock::new();
        BINS.get_or_init(|| {
            let script = repo_root().join("scripts/kube-bin.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .expect("run scripts/kube-bin.sh");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{} failed:\n{text}", script.display());
            let paths: BTreeMap<&str, PathBuf> = text
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(name, path)| (name, PathBuf::from(path)))
                .collect();
            let get = |name: &str| {
                let path = paths.get(name).unwrap_or_else(|| {
                    panic!("{} printed no {name} line:\n{text}", script.display())
                });
                assert!(path.is_file(), "{name}: {} is missing", path.display());
                path.clone()
            };
            KubeBinaries {
                etcd: get("etcd"),
                kube_apiserver: get("kube-apiserver"),
                critest: get("critest"),
            }
        })
    }
}

/// The repository's root (this crate lives in `crates/flock-testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The token the kit's own admin identity (group `system:masters`) uses.
const ADMIN_TOKEN: &str = "flock-testkit-admin";

/// etcd and kube-apiserver on loopback, and an admin client for them.
pub struct KubeCluster {
    /// The cluster's files (PKI, etcd's data, logs).
    dir: PathBuf,
    /// Removes `dir` on drop, unless the caller chose the directory.
    _temp: Option<tempfile::TempDir>,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_port: u16,
    api_port: u16,
    runtime: tokio::runtime::Runtime,
    admin: kube::Client,
    /// Flags kube-apiserver gets beyond the kit's own.
    extra_args: Vec<String>,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("dir", &self.dir)
            .field("api_port", &self.api_port)
            .field("etcd_port", &self.etcd_port)
            .finish()
    }
}

impl KubeCluster {
    /// Starts etcd and kube-apiserver, waits for `/readyz`, applies the
    /// shipped CRDs and RBAC and creates the `default` ServiceAccounts.
    pub fn start() -> KubeCluster {
        KubeCluster::start_with(&[])
    }

    /// [`KubeCluster::start`], kube-apiserver getting `extra_args` too
    /// (e.g. `--watch-cache=false`: every watch then reads etcd, so one
    /// behind a compaction gets 410 Gone instead of the cache's events).
    pub fn start_with(extra_args: &[&str]) -> KubeCluster {
        let temp = tempfile::Builder::new()
            .prefix("flock-kube-")
            .tempdir()
            .expect("tempdir");
        KubeCluster::start_at(temp.path().to_owned(), Some(temp), extra_args)
    }

    /// [`KubeCluster::start`] with its files in `dir` (created if missing),
    /// which outlives the cluster: for a control plane that stays up after
    /// [`KubeCluster::detach`] (`flock lab --kube`).
    pub fn start_in(dir: &Path) -> KubeCluster {
        std::fs::create_dir_all(dir).expect("cluster dir");
        KubeCluster::start_at(dir.to_owned(), None, &[])
    }

    fn start_at(dir: PathBuf, temp: Option<tempfile::TempDir>, extra_args: &[&str]) -> KubeCluster {
        let bins = KubeBinaries::get();
        make_pki(&dir);
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},flock-testkit-admin,uid-admin,\"system:masters\"\n"),
        )
        .expect("token file");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let etcd_port = free_port();
        let api_port = free_port();
        let admin_config = dir.join("admin.kubeconfig");
        write_kubeconfig(&admin_config, api_port, &dir.join("ca.crt"), ADMIN_TOKEN);
        let admin = runtime.block_on(client_from(&admin_config));
        let mut cluster = KubeCluster {
            dir,
            _temp: temp,
            etcd: None,
            apiserver: None,
            etcd_port,
            api_port,
            runtime,
            admin,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        cluster.start_etcd(&bins.etcd);
        cluster.start_apiserver();
        for crd in ["addresspools", "bgppeers", "nodeconfigs"] {
            let path = repo_root().join(format!("deploy/crds/{crd}.flock.fritzlab.net.yaml"));
            cluster.apply(&std::fs::read_to_string(&path).expect("read CRD"));
            cluster.wait_established(&format!("{crd}.flock.fritzlab.net"));
        }
        cluster.apply(
            &std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).expect("rbac.yaml"),
        );
        // What the controller-manager's ServiceAccount controller does.
        for ns in ["default", "kube-system"] {
            cluster.create_service_account(ns, "default");
        }
        cluster
    }

    /// The port kube-apiserver serves on, at 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// A kubeconfig for the kit's admin identity (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Leaves etcd and kube-apiserver running past the cluster's drop and
    /// returns their PIDs with their names (`etcd`, `kube-apiserver`);
    /// whoever detaches stops them. They run in process groups of their
    /// own, so a terminal's ^C to the caller does not reach them.
    pub fn detach(&mut self) -> Vec<(u32, &'static str)> {
        let mut pids = Vec::new();
        if let Some(child) = self.etcd.take() {
            pids.push((child.id(), "etcd"));
        }
        if let Some(child) = self.apiserver.take() {
            pids.push((child.id(), "kube-apiserver"));
        }
        pids
    }

    /// The kit's admin client (group `system:masters`).
    pub fn admin(&self) -> kube::Client {
        self.admin.clone()
    }

    /// Runs `f` on the kit's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    fn start_etcd(&mut self, etcd: &Path) {
        let data = self.dir.join("etcd");
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", free_port());
        let child = Command::new(etcd)
            .arg("--name=flock-test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=flock-test={peer}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn")
            .process_group(0)
            .stdout(self.log_file("etcd.log"))
            .stderr(self.log_file("etcd.log"))
            .spawn()
            .expect("spawn etcd");
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(self.etcd_port, "/health").contains("\"health\":\"true\"") {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "etcd never became healthy:\n{}",
                self.log("etcd.log")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts kube-apiserver (again, after [`KubeCluster::stop_apiserver`])
    /// on the same port and etcd, and waits for `/readyz`.
    pub fn start_apiserver(&mut self) {
        let bins = KubeBinaries::get();
        let d = &self.dir;
        let child = Command::new(&bins.kube_apiserver)
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            // No kubernetes Service endpoints for a loopback address.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--secure-port={}", self.api_port))
            .arg(format!(
                "--tls-cert-file={}",
                d.join("server.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("server.key").display()
            ))
            .arg(format!("--client-ca-file={}", d.join("ca.crt").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            // The tests compact etcd themselves when they mean to.
            .arg("--etcd-compaction-interval=0")
            .arg("--profiling=false")
            .args(&self.extra_args)
            .process_group(0)
            .stdout(self.log_file("kube-apiserver.log"))
            .stderr(self.log_file("kube-apiserver.log"))
            .spawn()
            .expect("spawn kube-apiserver");
        self.apiserver = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = self.block_on(async {
                let request = http::Request::get("/readyz")
                    .body(Vec::new())
                    .expect("request");
                self.admin.request_text(request).await
            });
            if matches!(ready.as_deref(), Ok("ok")) {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "kube-apiserver never became ready ({ready:?}):\n{}",
                self.log("kube-apiserver.log")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops kube-apiserver (SIGTERM, by PID) and waits for it to exit;
    /// etcd keeps everything.
    pub fn stop_apiserver(&mut self) {
        if let Some(child) = self.apiserver.take() {
            terminate(child);
        }
    }

    /// Compacts etcd at its current revision (through etcd's gRPC
    /// gateway), so a watch from an older resourceVersion gets 410 Gone;
    /// returns the revision.
    pub fn compact_etcd(&self) -> i64 {
        // A range over a key that does not exist still reports the revision.
        let range = http_post(self.etcd_port, "/v3/kv/range", r#"{"key":"AA=="}"#);
        let value: serde_json::Value = serde_json::from_str(&range).expect("etcd range answer");
        let revision: i64 = value["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {range}"));
        let answer = http_post(
            self.etcd_port,
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        );
        assert!(answer.contains("header"), "compaction refused: {answer}");
        revision
    }

    /// Panics with the logs if etcd or kube-apiserver has exited.
    fn assert_running(&mut self) {
        for (child, log) in [
            (&mut self.etcd, "etcd.log"),
            (&mut self.apiserver, "kube-apiserver.log"),
        ] {
            if let Some(Ok(Some(exit))) = child.as_mut().map(Child::try_wait) {
                let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
                panic!("{log}: the process exited ({exit}):\n{text}");
            }
        }
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .expect("log file")
    }

    /// One of the control plane's logs (`etcd.log`, `kube-apiserver.log`).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Server-side applies every document of `yaml` as the admin.
    pub fn apply(&self, yaml: &str) {
        self.block_on(apply_as(&self.admin, yaml))
            .unwrap_or_else(|e| panic!("apply failed: {e}\n{yaml}"));
    }

    fn wait_established(&self, crd: &str) {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let crds: Api<CustomResourceDefinition> = Api::all(self.admin.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let established = self.block_on(crds.get(crd)).ok().is_some_and(|c| {
                c.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                return;
            }
            assert!(Instant::now() < deadline, "CRD {crd} never established");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates namespace `name` with `labels` and its `default`
    /// ServiceAccount (pods need one).
    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels}
        }))
        .expect("namespace");
        let api: Api<Namespace> = Api::all(self.admin.clone());
        self.block_on(api.create(&PostParams::default(), &ns))
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        self.create_service_account(name, "default");
    }

    fn create_service_account(&self, namespace: &str, name: &str) {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("sa");
        let api: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), namespace);
        match self.block_on(api.create(&PostParams::default(), &sa)) {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create ServiceAccount {namespace}/{name}: {e}"),
        }
    }

    /// Mints a token for ServiceAccount `namespace/name` (TokenRequest)
    /// and writes a kubeconfig for it at `path`.
    pub fn kubeconfig_for(&self, namespace: &str, name: &str, path: &Path) {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(24 * 3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = self
            .block_on(api.create_token_request(name, &PostParams::default(), &request))
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"))
            .status
            .expect("TokenRequest status")
            .token;
        write_kubeconfig(path, self.api_port, &self.dir.join("ca.crt"), &token);
    }

    /// A client running as ServiceAccount `namespace/name`.
    pub fn client_as(&self, namespace: &str, name: &str) -> kube::Client {
        let path = self.dir.join(format!("{namespace}-{name}.kubeconfig"));
        self.kubeconfig_for(namespace, name, &path);
        self.block_on(client_from(&path))
    }

    /// Creates Node `name`, as its kubelet would register it.
    pub fn create_node(&self, name: &str) {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
        }))
        .expect("node");
        let api: Api<Node> = Api::all(self.admin.clone());
        self.block_on(api.create(&PostParams::default(), &node))
            .unwrap_or_else(|e| panic!("create node {name}: {e}"));
    }

    /// Creates pod `namespace/name` bound to `node` (no scheduler runs)
    /// with `labels` and `annotations`; returns its UID.
    pub fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
    ) -> String {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            }
        }))
        .expect("pod");
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), namespace);
        let pod = self
            .block_on(api.create(&PostParams::default(), &pod))
            .unwrap_or_else(|e| panic!("create pod {namespace}/{name}: {e}"));
        pod.metadata.uid.expect("uid")
    }

    /// Patches pod `namespace/name`'s status as its kubelet would: running,
    /// with `ips` and Ready = `ready`.
    pub fn set_pod_status(
        &self,
        namespace: &str,
        name: &str,
        ips: &[std::net::IpAddr],
        ready: bool,
    ) {
        let ready = if ready { "True" } else { "False" };
        let ips: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ips.first().map(|ip| ip["ip"].clone()),
            "podIPs": ips,
            "conditions": [
                {"type": "Ready", "status": ready},
                {"type": "ContainersReady", "status": ready},
            ],
        }});
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), namespace);
        self.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .unwrap_or_else(|e| panic!("patch status of pod {namespace}/{name}: {e}"));
    }

    /// An agent node `name` for this cluster, not yet spawned: its own
    /// namespace, the API server forwarded into it, a kubeconfig with the
    /// flock ServiceAccount's token, the `kubernetes` datastore. Keep the
    /// [`Forward`] as long as the agent runs.
    pub fn agent_node(
        &self,
        agent_bin: &Path,
        plugin_bin: &Path,
        name: &str,
    ) -> (crate::agent::AgentNode, Forward) {
        let mut node = crate::agent::AgentNode::prepare(agent_bin, plugin_bin, name, "");
        let forward = self.forward_into(&node.node);
        let kubeconfig = node.file("flock.kubeconfig");
        self.kubeconfig_for("kube-system", "flock", &kubeconfig);
        node.use_kubernetes(&kubeconfig);
        (node, forward)
    }

    /// Listens on 127.0.0.1 at the API server's port inside `ns` and
    /// forwards each connection to the API server: a node namespace's
    /// agent reaches it at the same address as the tests do.
    pub fn forward_into(&self, ns: &NetnsGuard) -> Forward {
        forward(&ns.netns(), self.api_port)
    }
}

/// Listens on 127.0.0.1:`port` inside `ns` and forwards each connection
/// to 127.0.0.1:`port` in the caller's namespace, until the [`Forward`]
/// drops.
pub fn forward(ns: &flock_netlink::Netns, port: u16) -> Forward {
    let listener = ns
        .spawn(move || {
            TcpListener::bind(("127.0.0.1", port)).map_err(|e| flock_netlink::NetlinkError::Io {
                what: "listen for the API server forward".into(),
                source: e,
            })
        })
        .join()
        .expect("forward thread")
        .expect("bind the forward");
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let thread = std::thread::spawn({
        let (stop, paused, open) = (stop.clone(), paused.clone(), open.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    // Paused: the connection is refused by closing it.
                    Ok(_) if paused.load(Ordering::SeqCst) => {}
                    Ok((inbound, _)) => {
                        let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                        open.retain(|c| c.peer_addr().is_ok());
                        if let Ok(c) = inbound.try_clone() {
                            open.push(c);
                        }
                        std::thread::spawn(move || pipe(inbound, port));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => return,
                }
            }
        }
    });
    Forward {
        stop,
        paused,
        open,
        thread: Some(thread),
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if let Some(child) = self.apiserver.take() {
            terminate(child);
        }
        if let Some(mut child) = self.etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The forward [`KubeCluster::forward_into`] runs; dropping it stops
/// accepting (connections open end with either side).
#[derive(Debug)]
pub struct Forward {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    /// The connections being forwarded (their inbound ends).
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forward {
    /// Cuts every forwarded connection and refuses new ones until
    /// [`Forward::resume`]: the node loses the API server while it runs on.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        for c in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways between a forwarded connection and the API server.
fn pipe(inbound: TcpStream, port: u16) {
    let _ = inbound.set_nonblocking(false);
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let (Ok(mut in_read), Ok(mut out_write)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut in_read, &mut out_write);
        let _ = out_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut out_read, mut in_write) = (outbound, inbound);
    let _ = std::io::copy(&mut out_read, &mut in_write);
    let _ = in_write.shutdown(std::net::Shutdown::Both);
    let _ = upstream.join();
}

/// SIGTERM, then SIGKILL after 10 s.
pub(crate) fn terminate(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Server-side applies every document of `yaml` through `client`.
pub async fn apply_as(client: &kube::Client, yaml: &str) -> Result<(), String> {
    use serde::Deserialize;
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::to_value(&value)
            .and_then(serde_json::from_value)
            .map_err(|e| e.to_string())?;
        let types = object
            .types
            .clone()
            .ok_or("a document without apiVersion/kind")?;
        let gvk = GroupVersionKind::try_from(&types).map_err(|e| e.to_string())?;
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .map_err(|e| format!("{}: {e}", types.kind))?;
        let name = object
            .metadata
            .name
            .clone()
            .ok_or("a document without a name")?;
        let api: Api<DynamicObject> = match (caps.scope, object.metadata.namespace.as_deref()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &name,
            &PatchParams::apply("flock-testkit").force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(|e| format!("{} {name}: {e}", types.kind))?;
    }
    Ok(())
}

/// A client from a kubeconfig file.
async fn client_from(path: &Path) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(config).expect("client")
}

/// A kubeconfig for `https://127.0.0.1:port` with a bearer token.
fn write_kubeconfig(path: &Path, port: u16, ca: &Path, token: &str) {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: flock-test
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {ca}
users:
- name: flock-test
  user:
    token: {token}
contexts:
- name: flock-test
  context: {{cluster: flock-test, user: flock-test}}
current-context: flock-test
",
        ca = ca.display()
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

/// A CA, a serving certificate for 127.0.0.1 signed by it, and the
/// service-account signing key pair, made with openssl in `dir`.
fn make_pki(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2"],
            &["-subj", "/CN=flock-test-ca"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=kube-apiserver",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("server.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    openssl(&["genrsa", "-out", "sa.key", "2048"]);
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// A free TCP port on 127.0.0.1 (the kernel's pick, released again).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A plain HTTP/1.0 request to 127.0.0.1:`port` (etcd's client URL);
/// the body of the answer, or "" when nothing answers.
fn http_request(port: u16, request: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}

fn http_get(port: u16, path: &str) -> String {
    http_request(
        port,
        &format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
}

fn http_post(port: u16, path: &str, body: &str) -> String {
    http_request(
        port,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}
