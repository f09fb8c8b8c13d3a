//! A node for end-to-end tests and benchmarks: a node namespace running
//! the real `flock-agent` with a `dir:` datastore, and pods added through
//! the real `flock` plugin the way a kubelet runtime calls it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::NetnsGuard;

/// The node's name in every test NodeConfig.
pub const NODE: &str = "node-a";

/// A NodeConfig for [`NODE`] with the given spec lines (YAML, indented by 2).
pub fn node_config(spec: &str, annotations: &str) -> String {
    format!(
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: NodeConfig\nmetadata:\n  name: {NODE}\n  annotations: {{{annotations}}}\nspec:\n{spec}\n"
    )
}

/// The default test NodeConfig: dual-stack prefixes, MTU 1400.
pub fn default_node_config() -> String {
    node_config(
        "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  mtu: 1400",
        "",
    )
}

/// A running agent in a node namespace of its own.
#[derive(Debug)]
pub struct AgentNode {
    /// The node namespace.
    pub node: NetnsGuard,
    dir: tempfile::TempDir,
    agent_bin: PathBuf,
    plugin_bin: PathBuf,
    child: Option<Child>,
}

impl AgentNode {
    /// Creates the node namespace, writes `node_config` into the manifest
    /// directory and starts the agent; returns once it is ready for ADD.
    pub fn start(agent_bin: &Path, plugin_bin: &Path, node_config: &str) -> AgentNode {
        let node = NetnsGuard::new("node");
        // Proxy ARP needs a route to 169.254.1.1 through another device.
        node.ip(&["route", "add", "169.254.1.1/32", "dev", "lo"]);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("manifests")).expect("manifests");
        std::fs::write(dir.path().join("manifests/nodeconfig.yaml"), node_config)
            .expect("nodeconfig");
        let mut n = AgentNode {
            node,
            dir,
            agent_bin: agent_bin.to_owned(),
            plugin_bin: plugin_bin.to_owned(),
            child: None,
        };
        n.spawn();
        n
    }

    /// The agent's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/flock.sock")
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Where the agent writes bird.conf.
    pub fn bird_config(&self) -> PathBuf {
        self.dir.path().join("bird/bird.conf")
    }

    /// The manifest directory.
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// The agent's log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent and waits until STATUS succeeds.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", self.node.name()])
            .arg(&self.agent_bin)
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args([
                "--node",
                NODE,
                "--log-format",
                "json",
                "--nodeconfig-timeout",
                "10",
            ])
            .arg("--datastore")
            .arg(format!("dir:{}", self.manifests().display()))
            .args(["--metrics-addr", "127.0.0.1:9602"])
            // Never the host's /etc/flock or /run/flock.
            .arg("--bird-config")
            .arg(self.bird_config())
            .arg("--bird-socket")
            .arg(self.dir.path().join("bird.ctl"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn flock-agent");
        self.child = Some(child);
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
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                panic!("flock-agent exited ({exit}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent never became ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
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

    /// Writes a pod manifest on this node (its file is `<name>.yaml`).
    pub fn put_pod(&self, name: &str, annotations: &[(&str, &str)], ready: bool) {
        let annotations: Vec<String> = annotations
            .iter()
            .map(|(k, v)| format!("{k:?}: {v:?}"))
            .collect();
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: uid-{name}\n  labels: {{app: {name}}}\n  annotations: {{{}}}\nspec:\n  nodeName: {NODE}\n  containers: [{{name: c, image: 'busybox:1'}}]\nstatus:\n  conditions: [{{type: Ready, status: '{}'}}]\n",
            annotations.join(", "),
            if ready { "True" } else { "False" }
        );
        let tmp = self.manifests().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, manifest).expect("pod manifest");
        std::fs::rename(&tmp, self.manifests().join(format!("{name}.yaml"))).expect("rename");
    }

    /// Runs the real plugin like a kubelet runtime: `command` with
    /// kubelet-style CNI_ARGS for `pod`, `config` on stdin.
    pub fn cni(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        pod: &str,
        config: &str,
    ) -> Output {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{pod}"
        );
        let mut child = Command::new(&self.plugin_bin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env(
                "CNI_NETNS",
                netns.map(|p| p.display().to_string()).unwrap_or_default(),
            )
            .env("CNI_IFNAME", "eth0")
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
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.kill();
    }
}
