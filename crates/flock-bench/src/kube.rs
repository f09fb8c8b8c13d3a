//! The `kubernetes` datastore at cluster scale, against a real
//! kube-apiserver and etcd (flock-testkit's [`KubeCluster`], built by
//! `scripts/kube-bin.sh`): the agent's start to ready and its RSS on an
//! empty cluster (the baseline) and on one holding 10,000 realistic pods
//! (100 of them on the node) in 100 namespaces and 1,000 NetworkPolicies —
//! the netpol scale benchmark's objects, created through the API with
//! their status patched as kubelets would.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use flock_testkit::agent::{NODE, default_node_config};
use flock_testkit::apiserver::KubeCluster;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::netpol_scale::{NAMESPACES, PER_NS, pod_json, pod_node, policies_json};

/// Requests in flight while the cluster is filled.
const CONCURRENCY: usize = 32;

/// What one agent start measured.
struct Start {
    ready: Duration,
    rss_ready_mb: f64,
    rss_idle_mb: f64,
    peak_mb: f64,
    lists: String,
}

pub fn run() -> anyhow::Result<()> {
    flock_testkit::require_root();
    let exe = std::env::current_exe()?;
    let (agent, plugin) = (
        exe.with_file_name("flock-agent"),
        exe.with_file_name("flock"),
    );
    let cluster = KubeCluster::start();
    cluster.create_node(NODE);
    cluster.apply(&default_node_config());

    let empty = start_agent(&cluster, &agent, &plugin)?;
    let filling = Instant::now();
    let (pods, policies) = fill(&cluster)?;
    let filled = filling.elapsed();
    println!(
        "created {pods} pods (status patched) and {policies} NetworkPolicies through the API in {:.1} s ({:.0} requests/s)",
        filled.as_secs_f64(),
        (2 * pods + policies) as f64 / filled.as_secs_f64()
    );
    let full = start_agent(&cluster, &agent, &plugin)?;

    println!("kubernetes datastore, agent start (spawn to ready: every kind listed, ADD served):");
    println!(
        "{:<34} {:>10} {:>12} {:>12} {:>10}",
        "cluster", "ready", "RSS ready", "RSS idle", "peak"
    );
    for (what, s) in [
        ("empty (baseline)", &empty),
        ("10,000 pods, 1,000 policies", &full),
    ] {
        println!(
            "{what:<34} {:>7.0} ms {:>9.1} MB {:>9.1} MB {:>7.1} MB",
            s.ready.as_secs_f64() * 1e3,
            s.rss_ready_mb,
            s.rss_idle_mb,
            s.peak_mb
        );
    }
    println!(
        "ratio (10,000 pods / empty): ready {:.2}x, RSS idle {:.2}x",
        full.ready.as_secs_f64() / empty.ready.as_secs_f64(),
        full.rss_idle_mb / empty.rss_idle_mb
    );
    println!("lists per kind at 10,000 pods: {}", full.lists);
    Ok(())
}

/// Starts an agent for the node, times it to ready, reads its RSS then
/// and after 10 s idle, and stops it.
fn start_agent(cluster: &KubeCluster, agent: &Path, plugin: &Path) -> anyhow::Result<Start> {
    let (mut node, _forward) = cluster.agent_node(agent, plugin, NODE);
    let t0 = Instant::now();
    node.spawn();
    let ready = t0.elapsed();
    let pid = node.pid().context("agent pid")?;
    let rss_ready_mb = status_mb(pid, "VmRSS:");
    std::thread::sleep(Duration::from_secs(10));
    let rss_idle_mb = status_mb(pid, "VmRSS:");
    let peak_mb = status_mb(pid, "VmHWM:");
    let (_, metrics) = node.http("/metrics");
    let lists = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("flock_datastore_lists_total{kind=\""))
        .map(|l| l.replace("\"} ", " "))
        .collect::<Vec<_>>()
        .join(", ");
    node.stop();
    Ok(Start {
        ready,
        rss_ready_mb,
        rss_idle_mb,
        peak_mb,
        lists,
    })
}

/// Creates the netpol scale benchmark's namespaces, pods (their status
/// patched after) and policies; returns how many pods and policies.
fn fill(cluster: &KubeCluster) -> anyhow::Result<(usize, usize)> {
    let client = cluster.admin();
    let mut pods = Vec::new();
    let mut policies = Vec::new();
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n:03}");
        cluster.create_namespace(&ns, &[("team", &format!("team-{}", n % 10))]);
        for j in 0..PER_NS {
            let k = (n * PER_NS + j) as u32;
            let node = pod_node(j, k);
            let mut pod: serde_json::Value =
                serde_json::from_str(&pod_json(&ns, &format!("pod-{j}"), j % 10, k, &node))?;
            // What the API server sets itself.
            let meta = pod["metadata"].as_object_mut().context("metadata")?;
            for field in ["uid", "resourceVersion", "creationTimestamp"] {
                meta.remove(field);
            }
            pods.push((ns.clone(), pod));
        }
        for line in policies_json(&ns).lines() {
            policies.push((ns.clone(), serde_json::from_str::<NetworkPolicy>(line)?));
        }
    }
    let (pod_count, policy_count) = (pods.len(), policies.len());
    cluster.block_on(async {
        futures_util::stream::iter(pods)
            .map(|(ns, pod)| {
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                async move {
                    let name = pod["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let status = serde_json::json!({"status": pod["status"].clone()});
                    let pod: Pod = serde_json::from_value(pod)?;
                    api.create(&PostParams::default(), &pod).await?;
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
    })?;
    cluster.block_on(async {
        futures_util::stream::iter(policies)
            .map(|(ns, policy)| {
                let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
                async move {
                    api.create(&PostParams::default(), &policy).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
    })?;
    // The namespaces are there: no need for a typed check beyond the count.
    let namespaces: Api<Namespace> = Api::all(client);
    let listed = cluster.block_on(namespaces.list(&Default::default()))?;
    anyhow::ensure!(listed.items.len() >= NAMESPACES, "namespaces missing");
    Ok((pod_count, policy_count))
}

/// A `/proc/PID/status` figure in MB.
fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
