//! The `CNI_*` environment, validated per verb.

use flock_proto::rpc::Op;
use flock_proto::{CniError, ErrorCode, is_valid_id};

/// The verb a runtime asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Answered by the plugin itself.
    Version,
    /// Forwarded to the agent.
    Forward(Op),
}

/// The parameters of one invocation. libcni exports every variable, empty
/// when unused, so empty counts as unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The verb.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub if_name: String,
    /// `CNI_ARGS`.
    pub args: String,
    /// `CNI_PATH`.
    pub path: String,
}

impl Invocation {
    /// Reads `CNI_COMMAND` alone: enough to know whether the rest matters.
    pub fn command(var: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
        let command = var("CNI_COMMAND").unwrap_or_default();
        match command.as_str() {
            "" => Err(CniError::new(
                ErrorCode::INVALID_ENVIRONMENT,
                "CNI_COMMAND is not set",
            )),
            "VERSION" => Ok(Command::Version),
            other => other.parse().map(Command::Forward).map_err(|_| {
                CniError::new(
                    ErrorCode::INVALID_ENVIRONMENT,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
                    ),
                )
            }),
        }
    }

    /// Reads and validates the variables `command` needs, naming every one
    /// that is missing or malformed in a single error (code 4).
    pub fn from_env(
        command: Command,
        var: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Invocation, CniError> {
        let get = |name: &str| var(name).unwrap_or_default();
        let inv = Invocation {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            if_name: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        };
        let (needs_container, needs_netns) = match command {
            Command::Forward(Op::Add | Op::Check) => (true, true),
            // The spec lets DEL arrive without a netns (the sandbox may be gone).
            Command::Forward(Op::Del) => (true, false),
            Command::Forward(Op::Gc | Op::Status) | Command::Version => (false, false),
        };
        let mut problems = Vec::new();
        if needs_container {
            if inv.container_id.is_empty() {
                problems.push("CNI_CONTAINERID is not set".to_owned());
            } else if !is_valid_id(&inv.container_id) {
                problems.push(format!(
                    "CNI_CONTAINERID {:?} must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                    inv.container_id
                ));
            }
            if inv.if_name.is_empty() {
                problems.push("CNI_IFNAME is not set".to_owned());
            } else if !is_valid_ifname(&inv.if_name) {
                problems.push(format!(
                    "CNI_IFNAME {:?} is not a valid interface name (1-15 bytes, not . or .., no '/', ':' or whitespace)",
                    inv.if_name
                ));
            }
        }
        if needs_netns && inv.netns.is_empty() {
            problems.push("CNI_NETNS is not set".to_owned());
        }
        if problems.is_empty() {
            Ok(inv)
        } else {
            Err(CniError::new(
                ErrorCode::INVALID_ENVIRONMENT,
                problems.join("; "),
            ))
        }
    }
}

/// Whether `name` is usable as a Linux interface name: 1 to 15 bytes, not
/// `.` or `..`, no `/`, `:` or whitespace.
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn command_must_be_set_and_known() {
        assert_eq!(
            Invocation::command(&env(&[])).expect_err("unset").code,
            ErrorCode::INVALID_ENVIRONMENT
        );
        assert_eq!(
            Invocation::command(&env(&[("CNI_COMMAND", "")]))
                .expect_err("empty")
                .code,
            ErrorCode::INVALID_ENVIRONMENT
        );
        assert_eq!(
            Invocation::command(&env(&[("CNI_COMMAND", "add")]))
                .expect_err("case")
                .code,
            ErrorCode::INVALID_ENVIRONMENT
        );
        assert_eq!(
            Invocation::command(&env(&[("CNI_COMMAND", "GC")])),
            Ok(Command::Forward(Op::Gc))
        );
    }

    #[test]
    fn add_names_every_missing_variable() {
        let err = Invocation::from_env(Command::Forward(Op::Add), &env(&[("CNI_IFNAME", "")]))
            .expect_err("nothing set");
        assert_eq!(err.code, ErrorCode::INVALID_ENVIRONMENT);
        for name in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
            assert!(err.msg.contains(name), "{name} named in {:?}", err.msg);
        }
    }

    #[test]
    fn del_needs_no_netns_and_gc_needs_nothing() {
        let del = env(&[
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]);
        assert!(Invocation::from_env(Command::Forward(Op::Del), &del).is_ok());
        assert!(Invocation::from_env(Command::Forward(Op::Gc), &env(&[])).is_ok());
        assert!(Invocation::from_env(Command::Forward(Op::Status), &env(&[])).is_ok());
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for ok in ["eth0", "net1", "a", "fifteen-chars15"] {
            assert!(is_valid_ifname(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-16"] {
            assert!(!is_valid_ifname(bad), "{bad}");
        }
    }
}
