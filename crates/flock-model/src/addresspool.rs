//! The `AddressPool` custom resource: the operator's consent for the
//! anycast and `addresses` IPs pods claim by annotation.

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bgp::{Communities, FieldError, parse_communities};
use crate::nodeconfig::parse_prefix;
use crate::{ModelError, Result};

/// Prefixes pods may claim IPs from, for one use, from some namespaces.
/// Cluster-scoped.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "flock.fritzlab.net",
    version = "v1alpha1",
    kind = "AddressPool",
    plural = "addresspools",
    shortname = "ap",
    status = "AddressPoolStatus",
    printcolumn = r#"{"name":"USE","type":"string","jsonPath":".spec.use"}"#,
    printcolumn = r#"{"name":"CIDRS","type":"string","jsonPath":".spec.cidrs"}"#,
    printcolumn = r#"{"name":"VALID","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AddressPoolSpec {
    /// The prefixes claimed IPs must lie in (IPv6 or IPv4), such as 203.0.113.0/28.
    pub cidrs: Vec<String>,
    /// `anycast`: many pods may share an IP; `addresses`: one pod per IP, cluster-wide.
    #[serde(rename = "use")]
    pub usage: PoolUse,
    /// The namespaces whose pods may claim these IPs; absent: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Communities added when a node announces an IP of this pool, as `ASN:VALUE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// Large communities added when a node announces an IP of this pool, as `ASN:X:Y`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
}

/// What a pool's IPs are for.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PoolUse {
    /// The `flock.fritzlab.net/anycast` annotation: shared by many pods.
    Anycast,
    /// The `flock.fritzlab.net/addresses` annotation: one pod per IP.
    Addresses,
}

impl PoolUse {
    /// The annotation that claims IPs of this use.
    pub fn annotation(self) -> &'static str {
        match self {
            PoolUse::Anycast => crate::ANYCAST,
            PoolUse::Addresses => crate::ADDRESSES,
        }
    }
}

impl std::fmt::Display for PoolUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolUse::Anycast => "anycast",
            PoolUse::Addresses => "addresses",
        })
    }
}

/// What the agents report of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AddressPoolStatus {
    /// `Valid`: whether the pool is in force, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A pool after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// Its prefixes.
    pub cidrs: Vec<IpNet>,
    /// What its IPs are for.
    pub usage: PoolUse,
    /// The namespaces it serves; `None` is every namespace.
    pub namespace_selector: Option<LabelSelector>,
    /// Added to the announcement of every IP in the pool.
    pub communities: Communities,
}

impl Pool {
    /// The pool's prefix that holds `ip`, if one does.
    pub fn covering(&self, ip: std::net::IpAddr) -> Option<IpNet> {
        self.cidrs.iter().copied().find(|c| c.contains(&ip))
    }
}

impl AddressPool {
    /// Validates the spec, naming the first field that is wrong.
    pub fn validated(&self) -> Result<Pool> {
        let name = self.name_any();
        let bad = |field: String, value: &str, reason: &str| ModelError::AddressPool {
            pool: name.clone(),
            field,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if self.spec.cidrs.is_empty() {
            return Err(bad("spec.cidrs".into(), "", "lists no prefix"));
        }
        let mut cidrs = Vec::with_capacity(self.spec.cidrs.len());
        for (i, c) in self.spec.cidrs.iter().enumerate() {
            let net: IpNet =
                parse_prefix(c, "a CIDR").map_err(|r| bad(format!("spec.cidrs[{i}]"), c, &r))?;
            cidrs.push(net);
        }
        if let Some(selector) = &self.spec.namespace_selector {
            check_selector(selector, "spec.namespaceSelector")
                .map_err(|(field, value, reason)| bad(field, &value, &reason))?;
        }
        let communities =
            parse_communities(&self.spec.communities, &self.spec.large_communities, "spec")
                .map_err(|(field, value, reason)| bad(field, &value, &reason))?;
        Ok(Pool {
            name,
            cidrs,
            usage: self.spec.usage,
            namespace_selector: self.spec.namespace_selector.clone(),
            communities,
        })
    }
}

/// Checks a label selector's expressions (`at` names it, such as
/// `spec.namespaceSelector`): the API server refuses bad ones, a
/// hand-written manifest may not.
pub(crate) fn check_selector(selector: &LabelSelector, at: &str) -> Result<(), FieldError> {
    for (i, req) in selector.match_expressions.iter().flatten().enumerate() {
        let field = format!("{at}.matchExpressions[{i}].operator");
        let values = req.values.as_ref().map_or(0, Vec::len);
        let reason = match req.operator.as_str() {
            "In" | "NotIn" if values == 0 => "needs values",
            "Exists" | "DoesNotExist" if values > 0 => "takes no values",
            "In" | "NotIn" | "Exists" | "DoesNotExist" => continue,
            _ => "not In, NotIn, Exists or DoesNotExist",
        };
        return Err((field, req.operator.clone(), reason.to_owned()));
    }
    Ok(())
}
