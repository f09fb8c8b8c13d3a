//! Kubernetes label selectors.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `selector` selects an object with `labels`. Every `matchLabels`
/// pair and every `matchExpressions` requirement must hold; an empty
/// selector selects everything. An unknown operator selects nothing (the
/// API server refuses such a selector; a hand-written manifest may not).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_hold = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_hold
        && selector.match_expressions.iter().flatten().all(|req| {
            let value = labels.get(&req.key);
            let listed = |v: &String| req.values.iter().flatten().any(|x| x == v);
            match req.operator.as_str() {
                "In" => value.is_some_and(listed),
                "NotIn" => !value.is_some_and(listed),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}
