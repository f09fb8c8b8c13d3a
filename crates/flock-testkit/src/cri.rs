//! A real CRI runtime for conformance tests: Debian's containerd (with its
//! CRI plugin) in a node namespace, pulling its images from Debian's
//! `docker-registry` on that namespace's loopback, images built here from
//! Debian's busybox-static as OCI layouts and pushed with Debian's `skopeo`.
//! containerd is told through its registry host configuration
//! (`certs.d/<host>/hosts.toml`) to speak plain HTTP to that registry.
//!
//! containerd runs in the node's network namespace but in the machine's
//! mount namespace (`nsenter --net`), so the pod namespaces it mounts under
//! `/run/netns` (a shared mount) are visible to an agent started with
//! `ip netns exec`. Its own mounts (the containers' root filesystems) are
//! under the kit's temporary directory; on drop the kit ends containerd,
//! every shim and container process rooted in that directory, unmounts what
//! is left there and deletes the pod namespaces it created.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::NetnsGuard;

/// The registry's address inside the node namespace.
pub const REGISTRY: &str = "127.0.0.1:5000";

/// The images the kit serves, by the name the CRI pulls them with.
#[derive(Debug, Clone)]
pub struct TestImages {
    /// A busybox image (`sh`, `top`, `cat`, `hostname`, …): critest's
    /// `defaultTestContainerImage`.
    pub busybox: String,
    /// busybox `httpd` serving `/www` on port 80: `webServerTestImage`.
    pub web_server: String,
    /// busybox `httpd` on port 12003, under the name critest's host-network
    /// port-forward spec pulls (served here through a registry mirror).
    pub host_net_web_server: String,
    /// The sandbox ("pause") image: `sleep` for as long as the pod lives.
    pub pause: String,
}

/// containerd with its CRI plugin and a registry, in a node namespace.
pub struct CriRuntime {
    dir: tempfile::TempDir,
    netns: String,
    registry: Option<Child>,
    containerd: Option<Child>,
    /// Pod namespaces under `/run/netns` before containerd started.
    netns_before: Vec<String>,
    images: TestImages,
}

impl std::fmt::Debug for CriRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriRuntime")
            .field("dir", &self.dir.path())
            .field("netns", &self.netns)
            .finish()
    }
}

impl CriRuntime {
    /// Starts the registry in `node`, builds and pushes the test images,
    /// then starts containerd there with CNI from `cni_bin_dir` and
    /// `cni_conf_dir`; returns once its CRI socket answers.
    pub fn start(node: &NetnsGuard, cni_bin_dir: &Path, cni_conf_dir: &Path) -> CriRuntime {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("flock-cri-")
            .tempdir()
            .expect("tempdir");
        let mut cri = CriRuntime {
            netns: node.name().to_owned(),
            registry: None,
            containerd: None,
            netns_before: pod_netns(),
            images: TestImages {
                busybox: format!("{REGISTRY}/flock/busybox:1"),
                web_server: format!("{REGISTRY}/flock/web-server:1"),
                host_net_web_server: "gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64:latest"
                    .to_owned(),
                pause: format!("{REGISTRY}/flock/pause:1"),
            },
            dir,
        };
        cri.start_registry();
        cri.push_images();
        cri.start_containerd(cni_bin_dir, cni_conf_dir);
        cri
    }

    /// The images it serves.
    pub fn images(&self) -> &TestImages {
        &self.images
    }

    /// The CRI endpoint (`unix://…`).
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.path("containerd.sock").display())
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("containerd.log")).unwrap_or_default()
    }

    /// A path in the kit's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_registry(&mut self) {
        let storage = self.path("registry");
        std::fs::create_dir_all(&storage).expect("registry dir");
        let config = self.path("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {REGISTRY}\n",
                storage.display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(self.path("registry.log")).expect("registry log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "docker-registry", "serve"])
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry (Debian package docker-registry)");
        self.registry = Some(child);
        let netns = flock_netlink::Netns::Path(PathBuf::from("/run/netns").join(&self.netns));
        let ready = || {
            let probe = netns.spawn(|| {
                Ok(std::net::TcpStream::connect_timeout(
                    &REGISTRY.parse().expect("registry address"),
                    Duration::from_millis(200),
                )
                .is_ok())
            });
            probe.join().ok().and_then(Result::ok).unwrap_or(false)
        };
        wait_for(ready, "docker-registry to serve", || {
            std::fs::read_to_string(self.path("registry.log")).unwrap_or_default()
        });
    }

    /// Builds the images as one OCI layout and pushes each with skopeo.
    fn push_images(&self) {
        let layout = self.path("oci");
        let layer = busybox_layer(&self.path("rootfs"), &self.path("layer.tar"));
        let images = &self.images;
        let httpd = |port: u16| json!(["/bin/httpd", "-f", "-p", port.to_string(), "-h", "/www"]);
        let configs = [
            (&images.busybox, json!({"Cmd": ["sh"]})),
            (&images.web_server, json!({"Entrypoint": httpd(80)})),
            (
                &images.host_net_web_server,
                json!({"Entrypoint": httpd(12003)}),
            ),
            (
                &images.pause,
                json!({"Entrypoint": ["/bin/sleep", "2147483647"]}),
            ),
        ];
        write_layout(&layout, &layer, &configs);
        for (name, _) in &configs {
            // The mirror serves gcr.io/<path> as <REGISTRY>/<path>.
            let pushed = match name.strip_prefix("gcr.io/") {
                Some(path) => format!("{REGISTRY}/{path}"),
                None => name.to_string(),
            };
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "skopeo", "copy", "--quiet"])
                .args(["--dest-tls-verify=false"])
                .arg(format!("oci:{}:{name}", layout.display()))
                .arg(format!("docker://{pushed}"))
                .output()
                .expect("run skopeo (Debian package skopeo)");
            assert!(
                out.status.success(),
                "skopeo copy {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn start_containerd(&mut self, cni_bin_dir: &Path, cni_conf_dir: &Path) {
        let d = self.dir.path().to_owned();
        for host in [REGISTRY, "gcr.io"] {
            let certs = d.join("certs.d").join(host);
            std::fs::create_dir_all(&certs).expect("certs.d");
            let server = if host == REGISTRY {
                format!("http://{REGISTRY}")
            } else {
                format!("https://{host}")
            };
            std::fs::write(
                certs.join("hosts.toml"),
                format!(
                    "server = \"{server}\"\n\n[host.\"http://{REGISTRY}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )
            .expect("hosts.toml");
        }
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#,
            d = d.display(),
            pause = self.images.pause,
            bin = cni_bin_dir.display(),
            conf = cni_conf_dir.display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("containerd log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd (Debian package containerd)");
        self.containerd = Some(child);
        let socket = d.join("containerd.sock");
        wait_for(
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            "containerd's CRI socket",
            || self.log(),
        );
    }
}

impl Drop for CriRuntime {
    fn drop(&mut self) {
        if let Some(child) = self.containerd.take() {
            crate::apiserver::terminate(child);
        }
        // Shims (their command line names the socket in the kit's
        // directory) and the containers (rooted in it).
        let dir = self.dir.path().to_owned();
        for pid in processes_under(&dir) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_under(&dir).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut mounts = mounts_under(&dir);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        for ns in pod_netns() {
            if !self.netns_before.contains(&ns) {
                let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            }
        }
        if let Some(mut child) = self.registry.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `cni-…` namespaces containerd mounts under `/run/netns`.
fn pod_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line or root directory lies under `dir`.
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&needle) || root.starts_with(dir)
        })
        .collect()
}

/// Mount points under `dir` in this mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

/// A root filesystem of busybox (static) and a symlink per applet, `/www`
/// with an index page, tarred reproducibly into `tar`; returns `tar`.
fn busybox_layer(rootfs: &Path, tar: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "{} is missing (Debian package busybox-static)",
        busybox.display()
    );
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root", "www"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet symlink");
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").expect("group");
    std::fs::write(
        rootfs.join("www/index.html"),
        "<html><body>served by busybox httpd in a flock pod</body></html>\n",
    )
    .expect("index.html");
    let out = Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
        .args(["--mtime=@0", "-C"])
        .arg(rootfs)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tar.to_owned()
}

/// An OCI image layout at `layout` holding one image per `(name, config)`,
/// all on the one `layer`, each named by `org.opencontainers.image.ref.name`.
fn write_layout(layout: &Path, layer: &Path, images: &[(&String, serde_json::Value)]) {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs dir");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let put = |bytes: &[u8]| -> (String, usize) {
        let digest = sha256(bytes);
        std::fs::write(blobs.join(&digest), bytes).expect("blob");
        (format!("sha256:{digest}"), bytes.len())
    };
    let (layer_digest, layer_size) = put(&std::fs::read(layer).expect("layer"));
    let mut manifests = Vec::new();
    for (name, config) in images {
        let mut config = config.clone();
        config["Env"] = json!(["PATH=/bin"]);
        let image_config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = put(image_config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer_size,
            }],
        });
        let (digest, size) = put(manifest.to_string().as_bytes());
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
    }
    let index = json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
}

/// The SHA-256 of `bytes`, in hex (coreutils' `sha256sum`).
fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("sha256sum stdin");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// Polls `ready` for up to 30 s; panics naming `what`, with `log()`.
fn wait_for(ready: impl Fn() -> bool, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
