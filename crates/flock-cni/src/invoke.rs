//! One plugin invocation, from environment and stdin to stdout and exit status.

use std::io::Read;
use std::path::PathBuf;

use flock_proto::rpc::{self, Op, Request, Response, reply_timeout};
use flock_proto::{CniError, CniVersion, ErrorCode, NetConf};
use serde_json::json;

use crate::client::{DEFAULT_AGENT_SOCKET, SOCKET_ENV, call_agent};
use crate::env::{Command, Invocation};

/// What the plugin prints and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The single JSON document for stdout, or nothing.
    pub stdout: Vec<u8>,
    /// Exit status 0 when true, 1 otherwise.
    pub success: bool,
}

impl Outcome {
    fn ok(stdout: Vec<u8>) -> Self {
        Outcome {
            stdout,
            success: true,
        }
    }

    fn failed(error: &CniError) -> Self {
        Outcome {
            stdout: rpc::encode(error),
            success: false,
        }
    }
}

/// Runs one invocation: `var` reads the environment, `stdin` is the config.
pub fn run(var: &dyn Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    match invoke(var, stdin) {
        Ok(stdout) => Outcome::ok(stdout),
        Err(error) => Outcome::failed(&error),
    }
}

fn invoke(var: &dyn Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Result<Vec<u8>, CniError> {
    // stdin first, whatever the command: a runtime writing the config to a
    // plugin that already exited would see a broken pipe.
    let input = read_stdin(stdin);
    let command = Invocation::command(var)?;
    let input = input?;
    let Command::Forward(op) = command else {
        return Ok(version_answer(&input));
    };
    let config = NetConf::parse(&input)?;
    let version = config.cni_version;
    let stamp = |e: CniError| e.with_version(version.as_str());
    if matches!(op, Op::Gc | Op::Status) && !version.has_gc_and_status() {
        return Err(stamp(CniError::new(
            ErrorCode::INCOMPATIBLE_VERSION,
            format!("{op} needs cniVersion 1.1.0 or later, config has {version}"),
        )));
    }
    let inv = Invocation::from_env(command, var).map_err(stamp)?;
    let socket = var(SOCKET_ENV)
        .filter(|s| !s.is_empty())
        .or_else(|| config.agent_socket.clone())
        .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.to_owned());
    let request = Request {
        op,
        container_id: inv.container_id,
        netns: inv.netns,
        if_name: inv.if_name,
        args: inv.args,
        path: inv.path,
        config,
    };
    match call_agent(&PathBuf::from(socket), &request, reply_timeout(op)).map_err(stamp)? {
        Response::Result(result) if op == Op::Add => Ok(rpc::encode(&result.to_version(version))),
        Response::Done {} if op != Op::Add => Ok(Vec::new()),
        Response::Error(error) => Err(stamp(error)),
        other => Err(stamp(CniError::new(
            ErrorCode::AGENT_PROTOCOL,
            format!(
                "flock agent answered {op} with an unexpected {}",
                kind(&other)
            ),
        ))),
    }
}

fn kind(response: &Response) -> &'static str {
    match response {
        Response::Result(_) => "result",
        Response::Done {} => "bare success",
        Response::Error(_) => "error",
    }
}

/// Reads the whole config; anything larger than an RPC frame can carry is refused.
fn read_stdin(stdin: &mut dyn Read) -> Result<Vec<u8>, CniError> {
    let mut input = Vec::new();
    stdin
        .take(rpc::MAX_FRAME_BYTES as u64 + 1)
        .read_to_end(&mut input)
        .map_err(|e| {
            CniError::new(
                ErrorCode::IO_FAILURE,
                "cannot read the network config from stdin",
            )
            .with_details(e.to_string())
        })?;
    if input.len() > rpc::MAX_FRAME_BYTES {
        return Err(CniError::new(
            ErrorCode::INVALID_NETWORK_CONFIG,
            format!(
                "network config is larger than {} bytes",
                rpc::MAX_FRAME_BYTES
            ),
        ));
    }
    Ok(input)
}

/// The VERSION answer. It depends on nothing but stdin's `cniVersion`, which
/// is echoed when present (libcni may send a version newer than ours).
fn version_answer(input: &[u8]) -> Vec<u8> {
    let asked = serde_json::from_slice::<serde_json::Value>(input)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| CniVersion::LATEST.as_str().to_owned());
    let supported: Vec<&str> = CniVersion::ALL.iter().map(|v| v.as_str()).collect();
    rpc::encode(&json!({ "cniVersion": asked, "supportedVersions": supported }))
}
