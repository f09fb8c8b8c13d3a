//! A peer's test suite: cri-tools' critest (built by `scripts/kube-bin.sh`)
//! runs its networking and port-forward conformance specs against Debian's
//! containerd with flock as the CNI, `portmap` chained for hostPort, as
//! root. The conflist is the one `flock-install --portmap` writes; the
//! images come from a registry on the node namespace's loopback (the test
//! kit's [`CriRuntime`]).
//!
//! critest runs pod sandboxes no API server has heard of, while the agent
//! adds only pods its datastore holds (a kubelet only ever runs pods the
//! API server has). So the plugin containerd calls is a kubelet double: on
//! ADD it writes the Pod that `CNI_ARGS` names into the agent's `dir:`
//! datastore, as the API server would hold it, then runs the real `flock`
//! plugin unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;

use flock_testkit::agent::{AgentNode, NODE, default_node_config};
use flock_testkit::apiserver::KubeBinaries;
use flock_testkit::cri::CriRuntime;
use flock_testkit::require_root;

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");

/// The specs this test runs; every one must pass.
const FOCUS: &str = r"\[k8s\.io\] Networking|runtime should support portforward";

/// The specs `FOCUS` selects in cri-tools v1.37.0 (a spec that disappears
/// or appears on an upgrade should be noticed, not silently dropped).
const EXPECTED: [&str; 6] = [
    "runtime should support DNS config [Conformance]",
    "runtime should support set hostname [Conformance]",
    "runtime should support port mapping with only container port [Conformance]",
    "runtime should support port mapping with host port and container port [Conformance]",
    "runtime should support portforward [Conformance]",
    "runtime should support portforward in host network",
];

fn workspace_bin(name: &str) -> PathBuf {
    let path = Path::new(AGENT).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// The kubelet double (see the module's text): `manifests` is the agent's
/// datastore directory, `plugin` the real `flock`.
fn kubelet_double(manifests: &Path, plugin: &Path) -> String {
    format!(
        r#"#!/bin/sh
# A kubelet double for critest: on ADD, the Pod CNI_ARGS names is written
# into the agent's dir: datastore, as the API server would hold it; then the
# real flock plugin runs unchanged.
set -eu
if [ "${{CNI_COMMAND:-}}" = ADD ]; then
    ns= name= uid=
    IFS=';'
    for kv in ${{CNI_ARGS:-}}; do
        case $kv in
            K8S_POD_NAMESPACE=*) ns=${{kv#*=}} ;;
            K8S_POD_NAME=*) name=${{kv#*=}} ;;
            K8S_POD_UID=*) uid=${{kv#*=}} ;;
        esac
    done
    unset IFS
    tmp={dir}/.pod-$uid.tmp
    printf 'apiVersion: v1\nkind: Pod\nmetadata:\n  name: "%s"\n  namespace: "%s"\n  uid: "%s"\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox}}]\nstatus:\n  conditions: [{{type: Ready, status: "True"}}]\n' "$name" "$ns" "$uid" >"$tmp"
    mv "$tmp" {dir}/pod-$uid.yaml
fi
exec {plugin} "$@"
"#,
        dir = manifests.display(),
        node = NODE,
        plugin = plugin.display(),
    )
}

/// One spec's outcome in ginkgo's JSON report.
#[derive(Debug)]
struct Spec {
    name: String,
    state: String,
    failure: String,
}

/// The specs that ran (not skipped) from ginkgo's `--json-report`;
/// `output` is critest's, for the panic when there is no report.
fn specs(report: &Path, output: &str) -> Vec<Spec> {
    let text = std::fs::read_to_string(report)
        .unwrap_or_else(|e| panic!("critest wrote no JSON report ({e}):\n{output}"));
    let suites: serde_json::Value = serde_json::from_str(&text).expect("report JSON");
    let mut out = Vec::new();
    for suite in suites.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            let state = spec["State"].as_str().unwrap_or("").to_owned();
            let name = spec["LeafNodeText"].as_str().unwrap_or("").to_owned();
            if state == "skipped" || name.is_empty() {
                continue;
            }
            out.push(Spec {
                name,
                state,
                failure: spec["Failure"]["Message"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    out
}

#[test]
fn critest_networking_and_port_forward_pass_with_flock_as_the_cni() {
    require_root();
    let critest = KubeBinaries::get().critest.clone();
    let mut node = AgentNode::prepare(
        Path::new(AGENT),
        &workspace_bin("flock"),
        NODE,
        &default_node_config(),
    );
    node.spawn();
    // A node has an address of its own: critest's HTTP requests to pod IPs
    // and portmap's masquerade of 127.0.0.1 take their source from it.
    node.node
        .ip(&["addr", "add", "198.19.255.1/32", "dev", "lo"]);

    // The CNI directories containerd reads: Debian's reference plugins
    // (loopback, portmap), the kubelet double as `flock`, and the conflist
    // flock-install writes with portmap chained.
    let cni = tempfile::tempdir().expect("tempdir");
    let (bin, conf) = (cni.path().join("bin"), cni.path().join("net.d"));
    std::fs::create_dir_all(&bin).expect("bin dir");
    for plugin in ["loopback", "portmap"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(plugin), bin.join(plugin))
            .expect("symlink a reference plugin");
    }
    let double = cni.path().join("kubelet-double");
    std::fs::write(
        &double,
        kubelet_double(&node.manifests(), &workspace_bin("flock")),
    )
    .expect("kubelet double");
    let mut perms = std::fs::metadata(&double).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&double, perms).expect("chmod");
    let installed = Command::new(workspace_bin("flock-install"))
        .arg("--plugin")
        .arg(&double)
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .arg("--agent-socket")
        .arg(node.socket())
        .arg("--portmap")
        .output()
        .expect("run flock-install");
    assert!(
        installed.status.success(),
        "flock-install: {}",
        String::from_utf8_lossy(&installed.stderr)
    );

    let cri = CriRuntime::start(&node.node, &bin, &conf);
    let images = cri.path("test-images.yaml");
    std::fs::write(
        &images,
        format!(
            "defaultTestContainerImage: {}\nwebServerTestImage: {}\n",
            cri.images().busybox,
            cri.images().web_server
        ),
    )
    .expect("test images file");
    let report = cri.path("critest-report.json");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.node.path().display()))
        .arg(&critest)
        .arg(format!("--runtime-endpoint={}", cri.endpoint()))
        .arg(format!("--image-endpoint={}", cri.endpoint()))
        .arg(format!("--test-images-file={}", images.display()))
        .arg(format!("--ginkgo.focus={FOCUS}"))
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .args(["--ginkgo.no-color", "--ginkgo.timeout=10m"])
        .output()
        .expect("run critest");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ran = specs(&report, &output);
    eprintln!("critest (focus {FOCUS:?}) against containerd with flock:");
    for spec in &ran {
        eprintln!("  {:<8} {}", spec.state, spec.name);
        if let Some(why) = spec.failure.lines().next() {
            eprintln!("           {why}");
        }
    }
    let failed: Vec<&Spec> = ran.iter().filter(|s| s.state != "passed").collect();
    assert!(
        failed.is_empty() && out.status.success(),
        "critest failed {failed:#?}\n{output}\n--- containerd ---\n{}\n--- agent ---\n{}",
        cri.log(),
        node.log()
    );
    let mut names: Vec<&str> = ran.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    let mut expected = EXPECTED.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected, "the focused specs changed:\n{output}");

    // The pods were flock's: the agent added and deleted each, and every
    // address went back.
    let added = node.log().matches("\"pod added\"").count();
    assert!(
        added >= 5,
        "flock added {added} pods for critest's 5 pod-network sandboxes:\n{}",
        node.log()
    );
    let left = node.settled_store();
    assert!(
        left.is_empty(),
        "critest removed its sandboxes, yet the store holds {left:#?}"
    );
    assert!(
        node.flock_links().is_empty(),
        "flock veths left: {:?}",
        node.flock_links()
    );
}
