//! flock-anycast: keeps anycast and `addresses` IPs of Ready pods routed.
//!
//! [`resolve`] is pure: from the committed allocations and pod readiness it
//! computes, per IP, the sorted nexthops (each Ready pod's own address of
//! the same family, through its host veth). A [`Reconciler`] compares that
//! with the routes flock has installed and changes only what differs, so a
//! quiet pass touches nothing and an agent restart adopts the routes it
//! finds. It lists the kernel's routes at its first pass, after a change
//! failed and when told to ([`Reconciler::resync`]); otherwise it keeps what
//! it installed and a pass costs one link lookup by name per nexthop
//! device, never a dump of the node's links or routes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use flock_netlink::{Dataplane, FLOCK_ROUTE_PROTOCOL, InstalledRoute, Nexthop, RouteKind};
use flock_store::{AllocState, Allocation};
use ipnet::IpNet;

/// Desired routes: IP → its nexthops, sorted.
pub type Targets = BTreeMap<IpAddr, Vec<Nexthop>>;

/// What a claimed IP is claimed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// `flock.fritzlab.net/anycast`: shared.
    Anycast,
    /// `flock.fritzlab.net/addresses`: one pod's.
    Addresses,
}

/// The routes anycast and `addresses` IPs should have. `serving(namespace,
/// pod)` says whether a pod should get traffic (Ready and not being
/// deleted); `admit` whether its claim of an IP is (still) accepted, or
/// why not. An IP refused, or whose family the pod has no address of, is
/// skipped with a warning.
pub fn resolve<'a>(
    allocations: impl IntoIterator<Item = &'a Allocation>,
    serving: impl Fn(&str, &str) -> bool,
    admit: impl Fn(&Allocation, IpAddr, Claim) -> Result<(), String>,
) -> (Targets, Vec<String>) {
    let mut targets: Targets = BTreeMap::new();
    let mut warnings = Vec::new();
    for a in allocations {
        // Most pods claim nothing: they cost no readiness lookup.
        let claims_any = !a.anycast.is_empty() || !a.addresses.is_empty();
        if !claims_any || a.state != AllocState::Committed || !serving(&a.namespace, &a.pod) {
            continue;
        }
        let claims = a
            .anycast
            .iter()
            .map(|ip| (*ip, Claim::Anycast))
            .chain(a.addresses.iter().map(|ip| (*ip, Claim::Addresses)));
        for (ip, claim) in claims {
            if let Err(reason) = admit(a, ip, claim) {
                warnings.push(format!(
                    "pod {}/{}: {ip} withdrawn: {reason}",
                    a.namespace, a.pod
                ));
                continue;
            }
            let via = match ip {
                IpAddr::V4(_) => a.ip4.map(IpAddr::V4),
                IpAddr::V6(_) => a.ip6.map(IpAddr::V6),
            };
            let Some(via) = via else {
                warnings.push(format!(
                    "pod {}/{}: {ip} skipped: the pod has no address of its family to route it through",
                    a.namespace, a.pod
                ));
                continue;
            };
            targets.entry(ip).or_default().push(Nexthop {
                via,
                dev: a.host_iface.clone(),
            });
        }
    }
    for hops in targets.values_mut() {
        hops.sort();
        hops.dedup();
    }
    (targets, warnings)
}

/// What one reconcile pass changed, and what it could not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Routes installed or replaced.
    pub replaced: usize,
    /// Routes removed.
    pub removed: usize,
    /// Targets that could not be routed, with why; the others were still
    /// reconciled. They must not be announced.
    pub failed: BTreeMap<IpAddr, String>,
    /// Nexthops left out because their host veth does not exist, by IP:
    /// the IP is routed (and may be announced) through the others, and the
    /// missing ones are tried again on the next pass.
    pub missing: BTreeMap<IpAddr, Vec<Nexthop>>,
    /// Stale routes that could not be removed, each naming its prefix.
    pub errors: Vec<String>,
}

/// The node's routes as the reconciler needs them: what flock installed,
/// which host interfaces exist, and replacing or removing one route.
/// `flock_netlink::Dataplane` is the real one.
pub trait Routes: Send + Sync {
    /// Every route carrying flock's protocol number (a dump: the
    /// [`Reconciler`] asks for it once, and after a failure).
    fn installed(&self) -> impl Future<Output = flock_netlink::Result<Vec<InstalledRoute>>> + Send;
    /// The index of the host interface called `name`, or `None` when there
    /// is none (one lookup by name).
    fn link_index(
        &self,
        name: &str,
    ) -> impl Future<Output = flock_netlink::Result<Option<u32>>> + Send;
    /// The route the kernel would pick for `ip`, as it is installed (a
    /// lookup, not a dump); `None` when there is none.
    fn lookup(
        &self,
        ip: IpAddr,
    ) -> impl Future<Output = flock_netlink::Result<Option<InstalledRoute>>> + Send;
    /// Installs or replaces the route to `dst` over `nexthops`.
    fn replace(
        &self,
        dst: IpAddr,
        nexthops: &[Nexthop],
    ) -> impl Future<Output = flock_netlink::Result<()>> + Send;
    /// Removes flock's route to `dst`.
    fn remove(&self, dst: IpNet) -> impl Future<Output = flock_netlink::Result<()>> + Send;
}

impl Routes for Dataplane {
    async fn installed(&self) -> flock_netlink::Result<Vec<InstalledRoute>> {
        self.flock_routes().await
    }

    async fn link_index(&self, name: &str) -> flock_netlink::Result<Option<u32>> {
        Dataplane::link_index(self, name).await
    }

    async fn lookup(&self, ip: IpAddr) -> flock_netlink::Result<Option<InstalledRoute>> {
        self.route_to(ip).await
    }

    async fn replace(&self, dst: IpAddr, nexthops: &[Nexthop]) -> flock_netlink::Result<()> {
        self.replace_anycast(dst, nexthops).await
    }

    async fn remove(&self, dst: IpNet) -> flock_netlink::Result<()> {
        self.remove_route(dst).await
    }
}

/// A route's nexthops as the kernel holds them: (gateway, interface index),
/// sorted.
type Hops = Vec<(Option<IpAddr>, u32)>;

/// Keeps the anycast routes equal to the targets of each pass, remembering
/// what it installed between passes.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// flock's anycast routes as this reconciler left them; `None` until
    /// the kernel has been listed, and again after a change failed (the
    /// kernel may then hold something else).
    installed: Option<BTreeMap<IpNet, Hops>>,
}

impl Reconciler {
    /// A reconciler that lists the kernel's routes at its first pass.
    pub fn new() -> Reconciler {
        Reconciler::default()
    }

    /// Looks each route it installed up in the kernel (one lookup per
    /// route, not a dump of the node's) and forgets those the kernel holds
    /// otherwise or not at all, so the next pass puts them back; returns
    /// how many it forgot. A failed lookup makes the next pass list the
    /// kernel's routes instead.
    pub async fn verify(&mut self, routes: &impl Routes) -> usize {
        let Some(installed) = self.installed.as_mut() else {
            return 0; // the next pass lists them anyway
        };
        let mut drifted = Vec::new();
        for (dst, hops) in installed.iter() {
            match routes.lookup(dst.addr()).await {
                Ok(Some(r))
                    if r.dst == *dst
                        && r.protocol == FLOCK_ROUTE_PROTOCOL
                        && r.kind == RouteKind::Unicast
                        && r.nexthops == *hops => {}
                Ok(_) => drifted.push(*dst),
                Err(_) => {
                    self.installed = None;
                    return 0;
                }
            }
        }
        for dst in &drifted {
            installed.remove(dst);
        }
        drifted.len()
    }

    /// Makes the installed anycast routes equal `targets`, touching only
    /// what differs. Routes are told apart from the pods' own host routes
    /// by having a gateway. A nexthop whose veth is gone is left out (in
    /// [`Changes::missing`]) and the IP goes through the nexthops that
    /// exist; an IP with none left loses its route. A target that fails is
    /// reported in [`Changes::failed`] and the others go on, stale routes
    /// included; only when the kernel cannot even be read does nothing
    /// happen.
    pub async fn pass(
        &mut self,
        routes: &impl Routes,
        targets: &Targets,
    ) -> flock_netlink::Result<Changes> {
        let mut installed = match self.installed.take() {
            Some(known) => known,
            None => routes
                .installed()
                .await?
                .into_iter()
                .filter(|r| {
                    r.kind == RouteKind::Unicast && r.nexthops.iter().all(|(via, _)| via.is_some())
                })
                .map(|r| (r.dst, r.nexthops))
                .collect(),
        };
        let mut indices: HashMap<&str, Option<u32>> = HashMap::new();
        for hop in targets.values().flatten() {
            if !indices.contains_key(hop.dev.as_str()) {
                indices.insert(&hop.dev, routes.link_index(&hop.dev).await?);
            }
        }
        let index = |dev: &str| indices.get(dev).copied().flatten();
        let mut changes = Changes::default();
        let mut in_doubt = false;
        // Routes to remove: targets left without a veth, then stale ones.
        let mut unwanted: Vec<IpNet> = Vec::new();
        for (ip, hops) in targets {
            let (present, missing): (Vec<Nexthop>, Vec<Nexthop>) =
                hops.iter().cloned().partition(|h| index(&h.dev).is_some());
            if !missing.is_empty() {
                changes.missing.insert(*ip, missing);
            }
            let dst = IpNet::from(*ip);
            if present.is_empty() {
                changes
                    .failed
                    .insert(*ip, "no nexthop's host veth exists".to_owned());
                if installed.contains_key(&dst) {
                    unwanted.push(dst);
                }
                continue;
            }
            let mut want: Hops = present
                .iter()
                .filter_map(|h| index(&h.dev).map(|i| (Some(h.via), i)))
                .collect();
            want.sort();
            if installed.get(&dst) == Some(&want) {
                continue;
            }
            match routes.replace(*ip, &present).await {
                Ok(()) => {
                    installed.insert(dst, want);
                    changes.replaced += 1;
                }
                Err(e) => {
                    in_doubt = true;
                    changes.failed.insert(*ip, e.to_string());
                }
            }
        }
        unwanted.extend(installed.keys().filter(|dst| {
            dst.prefix_len() == dst.max_prefix_len() && !targets.contains_key(&dst.addr())
        }));
        for dst in unwanted {
            match routes.remove(dst).await {
                Ok(()) => {
                    installed.remove(&dst);
                    changes.removed += 1;
                }
                Err(e) => {
                    in_doubt = true;
                    changes.errors.push(format!("{dst}: {e}"));
                }
            }
        }
        if !in_doubt {
            self.installed = Some(installed);
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::SystemTime;

    use flock_netlink::{FLOCK_ROUTE_PROTOCOL, NetlinkError};

    use super::*;

    /// Routes in memory: the veths that exist, flock's routes, and IPs
    /// whose replace the kernel refuses.
    #[derive(Default)]
    struct MemRoutes {
        links: Vec<&'static str>,
        routes: Mutex<BTreeMap<IpNet, InstalledRoute>>,
        refuse: Vec<IpAddr>,
        /// How often the routes were listed (dumped).
        listed: std::sync::atomic::AtomicUsize,
    }

    fn index(dev: &str) -> u32 {
        dev.bytes().map(u32::from).sum()
    }

    impl MemRoutes {
        fn vias(&self, ip: &str) -> Option<Vec<String>> {
            let dst = IpNet::from(ip.parse::<IpAddr>().expect("ip"));
            let routes = self.routes.lock().expect("routes");
            let route = routes.get(&dst)?;
            Some(
                route
                    .nexthops
                    .iter()
                    .map(|(via, _)| via.expect("gateway").to_string())
                    .collect(),
            )
        }
    }

    impl Routes for MemRoutes {
        async fn installed(&self) -> flock_netlink::Result<Vec<InstalledRoute>> {
            self.listed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(self
                .routes
                .lock()
                .expect("routes")
                .values()
                .cloned()
                .collect())
        }

        async fn link_index(&self, name: &str) -> flock_netlink::Result<Option<u32>> {
            Ok(self.links.contains(&name).then(|| index(name)))
        }

        async fn lookup(&self, ip: IpAddr) -> flock_netlink::Result<Option<InstalledRoute>> {
            Ok(self
                .routes
                .lock()
                .expect("routes")
                .get(&IpNet::from(ip))
                .cloned())
        }

        async fn replace(&self, dst: IpAddr, nexthops: &[Nexthop]) -> flock_netlink::Result<()> {
            if self.refuse.contains(&dst) {
                return Err(NetlinkError::Conflict(format!("anycast {dst}: refused")));
            }
            let mut hops = Vec::new();
            for h in nexthops {
                if !self.links.contains(&h.dev.as_str()) {
                    return Err(NetlinkError::Conflict(format!(
                        "anycast {dst}: nexthop device {} does not exist",
                        h.dev
                    )));
                }
                hops.push((Some(h.via), index(&h.dev)));
            }
            hops.sort();
            let dst = IpNet::from(dst);
            self.routes.lock().expect("routes").insert(
                dst,
                InstalledRoute {
                    dst,
                    kind: RouteKind::Unicast,
                    nexthops: hops,
                    protocol: FLOCK_ROUTE_PROTOCOL,
                },
            );
            Ok(())
        }

        async fn remove(&self, dst: IpNet) -> flock_netlink::Result<()> {
            self.routes.lock().expect("routes").remove(&dst);
            Ok(())
        }
    }

    fn hop(via: &str, dev: &str) -> Nexthop {
        Nexthop {
            via: via.parse().expect("via"),
            dev: dev.into(),
        }
    }

    #[tokio::test]
    async fn a_missing_veth_or_a_failing_target_stops_nothing_else() {
        let kernel = MemRoutes {
            links: vec!["flockaaaa", "flockcccc"],
            refuse: vec!["203.0.113.3".parse().expect("ip")],
            ..MemRoutes::default()
        };
        // Routes of an earlier pass: one to an IP nobody claims any more,
        // one whose only pod's veth is gone.
        let old = Targets::from([
            (
                "203.0.113.9".parse().expect("ip"),
                vec![hop("198.18.0.2", "flockaaaa")],
            ),
            (
                "203.0.113.4".parse().expect("ip"),
                vec![hop("198.18.0.2", "flockaaaa")],
            ),
        ]);
        let mut reconciler = Reconciler::new();
        reconciler.pass(&kernel, &old).await.expect("first pass");
        let targets = Targets::from([
            (
                "203.0.113.1".parse().expect("ip"),
                vec![
                    hop("198.18.0.2", "flockaaaa"),
                    hop("198.18.0.3", "flockbbbb"),
                ],
            ),
            (
                "203.0.113.2".parse().expect("ip"),
                vec![hop("198.18.0.4", "flockcccc")],
            ),
            (
                "203.0.113.3".parse().expect("ip"),
                vec![hop("198.18.0.4", "flockcccc")],
            ),
            (
                "203.0.113.4".parse().expect("ip"),
                vec![hop("198.18.0.3", "flockbbbb")],
            ),
        ]);
        let changes = reconciler.pass(&kernel, &targets).await.expect("listed");
        assert_eq!(
            kernel.vias("203.0.113.1"),
            Some(vec!["198.18.0.2".to_owned()]),
            "the shared IP goes through the nexthop that exists"
        );
        assert_eq!(
            kernel.vias("203.0.113.2"),
            Some(vec!["198.18.0.4".to_owned()])
        );
        assert_eq!(kernel.vias("203.0.113.3"), None, "refused by the kernel");
        assert_eq!(
            kernel.vias("203.0.113.4"),
            None,
            "no nexthop left: no route"
        );
        assert_eq!(kernel.vias("203.0.113.9"), None, "stale route removed");
        assert_eq!(
            changes
                .missing
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["203.0.113.1", "203.0.113.4"]
        );
        assert_eq!(
            changes.missing[&"203.0.113.1".parse::<IpAddr>().expect("ip")][0].dev,
            "flockbbbb"
        );
        assert_eq!(
            changes
                .failed
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["203.0.113.3", "203.0.113.4"],
            "not routed, so not to be announced"
        );
        assert!(changes.failed[&"203.0.113.3".parse::<IpAddr>().expect("ip")].contains("refused"));
        assert_eq!((changes.replaced, changes.removed), (2, 2));
        assert!(changes.errors.is_empty(), "{:?}", changes.errors);
    }

    #[tokio::test]
    async fn the_kernel_is_listed_once_and_again_only_after_a_failure() {
        let kernel = MemRoutes {
            links: vec!["flockaaaa", "flockbbbb"],
            refuse: vec!["203.0.113.7".parse().expect("ip")],
            ..MemRoutes::default()
        };
        let listed = || kernel.listed.load(std::sync::atomic::Ordering::Relaxed);
        // What an earlier agent left: adopted, not touched.
        let adopted = Targets::from([(
            "203.0.113.1".parse().expect("ip"),
            vec![hop("198.18.0.2", "flockaaaa")],
        )]);
        Reconciler::new()
            .pass(&kernel, &adopted)
            .await
            .expect("earlier agent");
        let mut reconciler = Reconciler::new();
        let changes = reconciler.pass(&kernel, &adopted).await.expect("adopt");
        assert_eq!((changes.replaced, changes.removed, listed()), (0, 0, 2));
        // Passes that change something, and quiet ones: no listing.
        let both = Targets::from([(
            "203.0.113.1".parse().expect("ip"),
            vec![
                hop("198.18.0.2", "flockaaaa"),
                hop("198.18.0.3", "flockbbbb"),
            ],
        )]);
        for (targets, replaced, removed) in [(&both, 1, 0), (&both, 0, 0), (&Targets::new(), 0, 1)]
        {
            let changes = reconciler.pass(&kernel, targets).await.expect("pass");
            assert_eq!((changes.replaced, changes.removed), (replaced, removed));
        }
        assert_eq!(kernel.vias("203.0.113.1"), None, "withdrawn");
        assert_eq!(listed(), 2, "no pass after the first listed the routes");
        // A change the kernel refuses: the next pass lists it again.
        let refused = Targets::from([(
            "203.0.113.7".parse().expect("ip"),
            vec![hop("198.18.0.2", "flockaaaa")],
        )]);
        let changes = reconciler.pass(&kernel, &refused).await.expect("pass");
        assert_eq!(changes.failed.len(), 1);
        reconciler
            .pass(&kernel, &Targets::new())
            .await
            .expect("pass");
        assert_eq!(listed(), 3);
    }

    #[tokio::test]
    async fn verify_looks_up_what_it_installed_and_a_pass_puts_back_what_went() {
        let kernel = MemRoutes {
            links: vec!["flockaaaa", "flockbbbb"],
            ..MemRoutes::default()
        };
        let listed = || kernel.listed.load(std::sync::atomic::Ordering::Relaxed);
        let targets = Targets::from([
            (
                "203.0.113.1".parse().expect("ip"),
                vec![hop("198.18.0.2", "flockaaaa")],
            ),
            (
                "203.0.113.2".parse().expect("ip"),
                vec![hop("198.18.0.3", "flockbbbb")],
            ),
        ]);
        let mut reconciler = Reconciler::new();
        assert_eq!(reconciler.verify(&kernel).await, 0, "nothing known yet");
        let changes = reconciler.pass(&kernel, &targets).await.expect("pass");
        assert_eq!(changes.replaced, 2);
        assert_eq!(reconciler.verify(&kernel).await, 0, "all in place");
        // Removed by hand, and one changed by hand.
        let gone = IpNet::from("203.0.113.1".parse::<IpAddr>().expect("ip"));
        let changed = IpNet::from("203.0.113.2".parse::<IpAddr>().expect("ip"));
        {
            let mut routes = kernel.routes.lock().expect("routes");
            routes.remove(&gone);
            routes.get_mut(&changed).expect("route").nexthops = vec![(None, 7)];
        }
        assert_eq!(reconciler.verify(&kernel).await, 2);
        let changes = reconciler.pass(&kernel, &targets).await.expect("pass");
        assert_eq!(changes.replaced, 2, "both put back");
        assert_eq!(kernel.vias("203.0.113.1"), Some(vec!["198.18.0.2".into()]));
        assert_eq!(kernel.vias("203.0.113.2"), Some(vec!["198.18.0.3".into()]));
        assert_eq!(listed(), 1, "looked up, never listed again");
    }

    fn alloc(
        id: &str,
        pod: &str,
        ip4: Option<&str>,
        ip6: Option<&str>,
        anycast: &[&str],
    ) -> Allocation {
        Allocation {
            container_id: id.into(),
            ifname: "eth0".into(),
            namespace: "ns".into(),
            pod: pod.into(),
            pod_uid: String::new(),
            host_iface: format!("flock{id}"),
            ip6: ip6.map(|s| s.parse().expect("v6")),
            ip4: ip4.map(|s| s.parse().expect("v4")),
            anycast: anycast.iter().map(|s| s.parse().expect("ip")).collect(),
            addresses: vec![],
            netns: String::new(),
            netns_inode: None,
            mtu: None,
            state: AllocState::Committed,
            allocated_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn ready_pods_sharing_an_ip_become_sorted_nexthops() {
        let a = alloc(
            "c2",
            "b",
            Some("198.18.0.3"),
            Some("2001:db8::3"),
            &["203.0.113.1", "2001:db8:ffff::1"],
        );
        let b = alloc(
            "c1",
            "a",
            Some("198.18.0.2"),
            Some("2001:db8::2"),
            &["203.0.113.1"],
        );
        let (t, w) = resolve([&a, &b], |_, _| true, |_, _, _| Ok(()));
        assert!(w.is_empty());
        let v4 = &t[&"203.0.113.1".parse::<IpAddr>().expect("ip")];
        assert_eq!(
            v4.iter().map(|h| h.via.to_string()).collect::<Vec<_>>(),
            ["198.18.0.2", "198.18.0.3"]
        );
        assert_eq!(
            t[&"2001:db8:ffff::1".parse::<IpAddr>().expect("ip")].len(),
            1
        );
        let (again, _) = resolve([&b, &a], |_, _| true, |_, _, _| Ok(()));
        assert_eq!(again, t, "order of input does not matter");
    }

    #[test]
    fn not_ready_pending_and_familyless_pods_contribute_nothing() {
        let ready = alloc(
            "c1",
            "ready",
            Some("198.18.0.2"),
            None,
            &["203.0.113.1", "2001:db8:ffff::1"],
        );
        let not_ready = alloc("c2", "sleepy", Some("198.18.0.3"), None, &["203.0.113.1"]);
        let mut pending = alloc("c3", "new", Some("198.18.0.4"), None, &["203.0.113.1"]);
        pending.state = AllocState::Pending;
        let (t, w) = resolve(
            [&ready, &not_ready, &pending],
            |_, pod| pod != "sleepy",
            |_, _, _| Ok(()),
        );
        assert_eq!(
            t.len(),
            1,
            "the IPv6 anycast has no IPv6 pod address to go through"
        );
        assert_eq!(t[&"203.0.113.1".parse::<IpAddr>().expect("ip")].len(), 1);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("2001:db8:ffff::1"), "{w:?}");
        let (none, _) = resolve([&ready], |_, _| false, |_, _, _| Ok(()));
        assert!(none.is_empty(), "no Ready pod, no route");
    }

    #[test]
    fn a_claim_no_longer_admitted_is_withdrawn_with_its_reason() {
        let a = alloc(
            "c1",
            "a",
            Some("198.18.0.2"),
            None,
            &["203.0.113.1", "203.0.113.2"],
        );
        let (t, w) = resolve(
            [&a],
            |_, _| true,
            |_, ip, claim| {
                assert_eq!(claim, Claim::Anycast);
                if ip.to_string() == "203.0.113.2" {
                    Err("no AddressPool of use anycast contains it".into())
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(
            t.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["203.0.113.1"]
        );
        assert_eq!(
            w,
            ["pod ns/a: 203.0.113.2 withdrawn: no AddressPool of use anycast contains it"]
        );
    }
}
