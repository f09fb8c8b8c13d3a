//! A node for end-to-end tests and benchmarks: a node namespace running
//! the real `flock-agent` with a `dir:` datastore, and pods added through
//! the real `flock` plugin the way a kubelet runtime calls it.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::NetnsGuard;

/// The node's name in every test NodeConfig.
pub const NODE: &str = "node-a";

/// The UID the test kit gives pod `namespace/name`, in its manifests and in
/// the `K8S_POD_UID` it sends as a kubelet would.
pub fn pod_uid(namespace: &str, name: &str) -> String {
    format!("uid-{namespace}-{name}")
}

/// A NodeConfig for [`NODE`] with the given spec lines (YAML, indented by 2).
pub fn node_config(spec: &str, annotations: &str) -> String {
    node_config_for(NODE, spec, annotations)
}

/// A NodeConfig for node `name` with the given spec lines.
pub fn node_config_for(name: &str, spec: &str, annotations: &str) -> String {
    format!(
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: NodeConfig\nmetadata:\n  name: {name}\n  annotations: {{{annotations}}}\nspec:\n{spec}\n"
    )
}

/// The default test NodeConfig: dual-stack prefixes, MTU 1400.
pub fn default_node_config() -> String {
    node_config(
        "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  mtu: 1400",
        "",
    )
}

/// AddressPools for the IPs the tests claim: anycast and `addresses` from
/// 203.0.113.0/24, 198.51.100.0/24, 2001:db8:aa::/48 and 2001:db8:ffff::/48,
/// every namespace. (With no pool, no claim is accepted.)
pub const TEST_POOLS: &str = "apiVersion: flock.fritzlab.net/v1alpha1
kind: AddressPool
metadata: {name: test-anycast}
spec:
  cidrs: [203.0.113.0/24, 198.51.100.0/24, 2001:db8:aa::/48, 2001:db8:ffff::/48]
  use: anycast
---
apiVersion: flock.fritzlab.net/v1alpha1
kind: AddressPool
metadata: {name: test-addresses}
spec:
  cidrs: [203.0.113.0/24, 198.51.100.0/24, 2001:db8:aa::/48, 2001:db8:ffff::/48]
  use: addresses
";

/// A running agent in a node namespace of its own.
#[derive(Debug)]
pub struct AgentNode {
    /// The node namespace.
    pub node: NetnsGuard,
    name: String,
    dir: tempfile::TempDir,
    agent_bin: PathBuf,
    plugin_bin: PathBuf,
    kubeconfig: Option<PathBuf>,
    child: Option<Child>,
}

impl AgentNode {
    /// Creates the node namespace, writes `node_config` into the manifest
    /// directory and starts the agent; returns once it is ready for ADD.
    pub fn start(agent_bin: &Path, plugin_bin: &Path, node_config: &str) -> AgentNode {
        AgentNode::start_named(agent_bin, plugin_bin, NODE, node_config)
    }

    /// [`AgentNode::start`] for a node called `name` (its NodeConfig must
    /// carry that name; pods put on it name it in `spec.nodeName`).
    pub fn start_named(
        agent_bin: &Path,
        plugin_bin: &Path,
        name: &str,
        node_config: &str,
    ) -> AgentNode {
        let mut n = AgentNode::prepare(agent_bin, plugin_bin, name, node_config);
        n.spawn();
        n
    }

    /// The node namespace, its manifests and directories, with no agent
    /// running yet (start it with [`AgentNode::spawn`]).
    pub fn prepare(
        agent_bin: &Path,
        plugin_bin: &Path,
        name: &str,
        node_config: &str,
    ) -> AgentNode {
        let node = NetnsGuard::new("node");
        // Proxy ARP needs a route to 169.254.1.1 through another device.
        node.ip(&["route", "add", "169.254.1.1/32", "dev", "lo"]);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("manifests")).expect("manifests");
        std::fs::write(dir.path().join("manifests/nodeconfig.yaml"), node_config)
            .expect("nodeconfig");
        std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
        // The runtime's CNI directory, as the installer leaves it.
        std::fs::create_dir_all(dir.path().join("cni")).expect("cni dir");
        std::fs::write(
            dir.path().join("cni/01-flock.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"flock"}]}"#,
        )
        .expect("conflist");
        AgentNode {
            node,
            name: name.to_owned(),
            dir,
            agent_bin: agent_bin.to_owned(),
            plugin_bin: plugin_bin.to_owned(),
            kubeconfig: None,
            child: None,
        }
    }

    /// From the next start on, the agent reads the `kubernetes` datastore
    /// through `kubeconfig` instead of its manifest directory.
    pub fn use_kubernetes(&mut self, kubeconfig: &Path) {
        self.kubeconfig = Some(kubeconfig.to_owned());
    }

    /// A path in the node's private directory (kubeconfigs, scratch files).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/flock.sock")
    }

    /// The agent's admin socket (`flockctl --socket`): beside its socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("run/admin.sock")
    }

    /// The runtime's CNI configuration directory the agent reads
    /// (`flockctl doctor`).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni")
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Where the agent writes bird.conf.
    pub fn bird_config(&self) -> PathBuf {
        self.dir.path().join("bird/bird.conf")
    }

    /// The store's entries once no DEL is still finishing (none is
    /// `releasing`), waiting up to 5 s: a DEL answers before the kernel's
    /// slow veth deletion is done, and its entry goes right after.
    pub fn settled_store(&self) -> Vec<flock_store::Allocation> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let entries =
                flock_store::Store::read_only(&self.state_dir()).expect("the store loads");
            let settled = entries
                .iter()
                .all(|a| a.state != flock_store::AllocState::Releasing);
            if settled || Instant::now() > deadline {
                return entries;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The host ends of pod veths in the node namespace.
    pub fn flock_links(&self) -> Vec<String> {
        self.node
            .ip_output(&["-br", "link"])
            .lines()
            .filter_map(|l| l.split(['@', ' ']).next())
            .filter(|n| n.starts_with("flock"))
            .map(str::to_owned)
            .collect()
    }

    /// The manifest directory.
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// BIRD's control socket for this node (the agent's `--bird-socket`).
    pub fn bird_socket(&self) -> PathBuf {
        self.dir.path().join("bird.ctl")
    }

    /// The agent's log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent and waits until STATUS succeeds.
    pub fn spawn(&mut self) {
        self.spawn_serving();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.cni(
                "STATUS",
                "",
                None,
                "",
                r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"flock"}"#,
            );
            if status.status.success() {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "agent never became ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with the log if the agent has exited.
    pub fn assert_running(&mut self) {
        if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
            panic!("flock-agent exited ({exit}):\n{}", self.log());
        }
    }

    /// Moves the NodeConfig manifest aside: the agent cannot see it, as
    /// when the API server is slow or unreachable.
    pub fn hold_node_config(&self) {
        std::fs::rename(
            self.manifests().join("nodeconfig.yaml"),
            self.dir.path().join("held-nodeconfig.yaml"),
        )
        .expect("hold the NodeConfig back");
    }

    /// Puts a held-back NodeConfig back.
    pub fn release_node_config(&self) {
        std::fs::rename(
            self.dir.path().join("held-nodeconfig.yaml"),
            self.manifests().join("nodeconfig.yaml"),
        )
        .expect("put the NodeConfig back");
    }

    /// GETs `path` from the agent's metrics and health port, inside the
    /// node namespace; returns the status code and the body.
    pub fn http(&self, path: &str) -> (u16, String) {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let text = self
            .node
            .netns()
            .spawn(move || {
                use std::io::Read;
                let io = |e: std::io::Error| flock_netlink::NetlinkError::Io {
                    what: "GET from the agent".into(),
                    source: e,
                };
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", 9602)).map_err(io)?;
                stream.write_all(request.as_bytes()).map_err(io)?;
                let mut text = String::new();
                stream.read_to_string(&mut text).map_err(io)?;
                Ok(text)
            })
            .join()
            .expect("http thread")
            .expect("GET");
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    /// Starts the agent and waits only until its socket accepts (DEL and
    /// CHECK are served from then on; ADD maybe not yet).
    pub fn spawn_serving(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("log");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.node.name()])
            .arg(&self.agent_bin)
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--node", &self.name])
            .args(["--log-format", "json", "--nodeconfig-timeout", "10"]);
        match &self.kubeconfig {
            Some(kubeconfig) => command
                .args(["--datastore", "kubernetes"])
                .env("KUBECONFIG", kubeconfig),
            None => command
                .arg("--datastore")
                .arg(format!("dir:{}", self.manifests().display())),
        };
        let child = command
            .args(["--metrics-addr", "127.0.0.1:9602"])
            // Never the host's /etc/flock or /run/flock.
            .arg("--bird-config")
            .arg(self.bird_config())
            .arg("--bird-socket")
            .arg(self.bird_socket())
            .arg("--cni-conf-dir")
            .arg(self.cni_conf_dir())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn flock-agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "agent never listened:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the agent (by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().expect("wait")
    }

    /// Writes [`TEST_POOLS`] into the datastore directory and gives the
    /// agent time to read them (it rescans at least every 200 ms).
    pub fn put_test_pools(&self) {
        self.put_manifest("test-pools", TEST_POOLS);
        std::thread::sleep(Duration::from_millis(450));
    }

    /// Writes a pod manifest on this node (its file is `<name>.yaml`).
    pub fn put_pod(&self, name: &str, annotations: &[(&str, &str)], ready: bool) {
        self.put_pod_in_state(name, annotations, ready, false);
    }

    /// [`AgentNode::put_pod`], with a `deletionTimestamp` when `deleting`
    /// (the pod is terminating: its preStop hooks run, it is still Ready).
    pub fn put_pod_in_state(
        &self,
        name: &str,
        annotations: &[(&str, &str)],
        ready: bool,
        deleting: bool,
    ) {
        let annotations: Vec<String> = annotations
            .iter()
            .map(|(k, v)| format!("{k:?}: {v:?}"))
            .collect();
        let deletion = if deleting {
            "\n  deletionTimestamp: '2026-01-01T00:00:00Z'"
        } else {
            ""
        };
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: {}{deletion}\n  labels: {{app: {name}}}\n  annotations: {{{}}}\nspec:\n  nodeName: {}\n  containers: [{{name: c, image: 'busybox:1'}}]\nstatus:\n  conditions: [{{type: Ready, status: '{}'}}]\n",
            pod_uid("default", name),
            annotations.join(", "),
            self.name,
            if ready { "True" } else { "False" }
        );
        self.put_manifest(name, &manifest);
    }

    /// Writes (atomically) manifest `<stem>.yaml` into the datastore
    /// directory; an empty `yaml` removes it.
    pub fn put_manifest(&self, stem: &str, yaml: &str) {
        let path = self.manifests().join(format!("{stem}.yaml"));
        if yaml.is_empty() {
            let _ = std::fs::remove_file(path);
            return;
        }
        let tmp = self.manifests().join(format!(".{stem}.tmp"));
        std::fs::write(&tmp, yaml).expect("manifest");
        std::fs::rename(&tmp, path).expect("rename");
    }

    /// Runs the real plugin like a kubelet runtime: `command` with
    /// kubelet-style CNI_ARGS for `pod` (namespace `default`), `config` on
    /// stdin.
    pub fn cni(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        pod: &str,
        config: &str,
    ) -> Output {
        self.cni_in("default", command, container_id, netns, pod, config)
    }

    /// Runs the real plugin with exactly these CNI_* values.
    pub fn cni_raw(
        &self,
        command: &str,
        container_id: &str,
        netns: &str,
        if_name: &str,
        args: &str,
        config: &str,
    ) -> Output {
        let mut child = Command::new(&self.plugin_bin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", if_name)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", "/usr/lib/cni")
            .env("FLOCK_AGENT_SOCKET", self.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flock");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(config.as_bytes())
            .expect("stdin");
        child.wait_with_output().expect("flock")
    }

    /// The kubelet-style CNI_ARGS for pod `namespace/pod` of uid `uid`.
    pub fn pod_args(namespace: &str, pod: &str, container_id: &str, uid: &str) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
        )
    }

    /// [`AgentNode::cni`] for a pod of `namespace`.
    pub fn cni_in(
        &self,
        namespace: &str,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        pod: &str,
        config: &str,
    ) -> Output {
        let args = AgentNode::pod_args(namespace, pod, container_id, &pod_uid(namespace, pod));
        let netns = netns.map(|p| p.display().to_string()).unwrap_or_default();
        self.cni_raw(command, container_id, &netns, "eth0", &args, config)
    }
}

/// A pod added through the plugin: its namespace, and the ADD result.
#[derive(Debug)]
pub struct Pod {
    /// The pod's network namespace.
    pub ns: NetnsGuard,
    /// The pod's name (namespace `default`).
    pub name: String,
    /// Its container id.
    pub id: String,
    /// The ADD result as the plugin printed it.
    pub result: serde_json::Value,
}

/// The addresses of a CNI ADD result, in its order.
pub fn result_ips(result: &serde_json::Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|ip| {
            ip["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .expect("an address")
        })
        .collect()
}

impl Pod {
    /// The pod's addresses from the ADD result.
    pub fn ips(&self) -> Vec<IpAddr> {
        result_ips(&self.result)
    }

    /// The pod's IPv4 (`v4`) or IPv6 address.
    pub fn ip(&self, v4: bool) -> IpAddr {
        *self
            .ips()
            .iter()
            .find(|ip| ip.is_ipv4() == v4)
            .expect("address of the family")
    }
}

impl AgentNode {
    /// Writes a Ready pod manifest, creates its namespace and ADDs it with
    /// `config`; panics naming the plugin's answer when the ADD fails.
    pub fn add_pod(&self, name: &str, annotations: &[(&str, &str)], config: &str) -> Pod {
        self.put_pod(name, annotations, true);
        self.add_pod_in("default", name, config)
    }

    /// ADDs pod `namespace/name`, whose manifest is already in place.
    pub fn add_pod_in(&self, namespace: &str, name: &str, config: &str) -> Pod {
        self.add_pod_as(namespace, name, &pod_uid(namespace, name), config)
    }

    /// ADDs pod `namespace/name` whose UID is `uid` (an API server's pod).
    pub fn add_pod_as(&self, namespace: &str, name: &str, uid: &str, config: &str) -> Pod {
        let ns = NetnsGuard::new("pod");
        let id = format!("c0ffee{namespace}{name}");
        let args = AgentNode::pod_args(namespace, name, &id, uid);
        let out = self.cni_raw(
            "ADD",
            &id,
            &ns.path().display().to_string(),
            "eth0",
            &args,
            config,
        );
        assert!(
            out.status.success(),
            "ADD {name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result = serde_json::from_slice(&out.stdout).expect("result JSON");
        Pod {
            ns,
            name: name.to_owned(),
            id,
            result,
        }
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.kill();
    }
}
