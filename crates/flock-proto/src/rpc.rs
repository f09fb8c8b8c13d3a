//! The plugin ↔ agent RPC: one request and one response per connection,
//! each a single line of JSON.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{CniError, CniResult, NetConf};

/// The largest frame either side accepts, newline excluded. A GC request
/// listing ten thousand attachments is about 1 MiB.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// The CNI verbs the plugin forwards to the agent (VERSION never leaves the plugin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
    /// Create the pod's interface.
    Add,
    /// Remove it.
    Del,
    /// Compare the kernel with the stored allocation.
    Check,
    /// Report whether ADD can be served.
    Status,
    /// Remove attachments the runtime no longer lists.
    Gc,
}

impl Op {
    /// Every forwarded verb.
    pub const ALL: [Op; 5] = [Op::Add, Op::Del, Op::Check, Op::Status, Op::Gc];

    /// The verb as `CNI_COMMAND` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Add => "ADD",
            Op::Del => "DEL",
            Op::Check => "CHECK",
            Op::Status => "STATUS",
            Op::Gc => "GC",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a CNI command flock forwards"))
    }
}

/// How long the plugin waits for the agent's answer to `op`.
pub fn reply_timeout(op: Op) -> Duration {
    Duration::from_secs(match op {
        Op::Add | Op::Del | Op::Check => 30,
        Op::Gc => 60,
        Op::Status => 5,
    })
}

/// How long the agent gives its handler for `op`: five sixths of the
/// plugin's patience, so that a slow operation comes back to the runtime as
/// the agent's own "try again later" rather than as a plugin timeout.
pub fn agent_deadline(op: Op) -> Duration {
    reply_timeout(op) * 5 / 6
}

/// One CNI invocation, as the plugin received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The verb.
    pub op: Op,
    /// `CNI_CONTAINERID` (empty for GC and STATUS).
    #[serde(rename = "containerId", default)]
    pub container_id: String,
    /// `CNI_NETNS` (empty when the runtime sent none).
    #[serde(default)]
    pub netns: String,
    /// `CNI_IFNAME` (empty for GC and STATUS).
    #[serde(rename = "ifName", default)]
    pub if_name: String,
    /// `CNI_ARGS`, unparsed.
    #[serde(default)]
    pub args: String,
    /// `CNI_PATH`.
    #[serde(default)]
    pub path: String,
    /// The network config from stdin.
    pub config: NetConf,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// ADD succeeded; the plugin prints this in the config's version.
    Result(CniResult),
    /// DEL, CHECK, STATUS or GC succeeded; the plugin prints nothing.
    Done {},
    /// The operation failed; the plugin prints this and exits non-zero.
    Error(CniError),
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the stream before sending anything.
    Closed,
    /// The peer closed the stream in the middle of a frame.
    Truncated,
    /// The frame is longer than the limit.
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The stream failed (including a read timeout).
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Closed => f.write_str("connection closed before a message arrived"),
            FrameError::Truncated => f.write_str("connection closed in the middle of a message"),
            FrameError::TooLarge { limit } => write!(f, "message is larger than {limit} bytes"),
            FrameError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Serialises `message` as one frame: compact JSON (which never contains a
/// raw newline) followed by `\n`.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string.
    let mut out = serde_json::to_vec(message).expect("RPC messages always serialise");
    out.push(b'\n');
    out
}

/// Writes one frame and flushes.
pub fn write_frame<T: Serialize>(w: &mut impl Write, message: &T) -> io::Result<()> {
    w.write_all(&encode(message))?;
    w.flush()
}

/// Reads one frame (without its newline) of at most `limit` bytes.
pub fn read_frame(r: &mut impl BufRead, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    // One byte over the limit, so that a frame of exactly `limit` plus its
    // newline fits and anything longer is seen as too large.
    r.take(limit as u64 + 1)
        .read_until(b'\n', &mut buf)
        .map_err(FrameError::Io)?;
    finish_frame(buf, limit)
}

/// Classifies what one bounded `read_until(b'\n')` returned: a frame, or why not.
/// Shared by blocking and async readers so both apply the same rules.
pub fn finish_frame(mut buf: Vec<u8>, limit: usize) -> Result<Vec<u8>, FrameError> {
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(buf);
    }
    if buf.len() > limit {
        return Err(FrameError::TooLarge { limit });
    }
    if buf.is_empty() {
        Err(FrameError::Closed)
    } else {
        Err(FrameError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_have_one_key_naming_their_kind() {
        let done = String::from_utf8(encode(&Response::Done {})).expect("utf8");
        assert_eq!(done, "{\"done\":{}}\n");
        let err = Response::Error(CniError::new(crate::ErrorCode::TRY_AGAIN_LATER, "x"));
        let err = String::from_utf8(encode(&err)).expect("utf8");
        assert_eq!(err, "{\"error\":{\"code\":11,\"msg\":\"x\"}}\n");
    }

    #[test]
    fn frames_are_split_at_newlines_and_bounded() {
        let mut input: &[u8] = b"{\"a\":1}\n{\"b\":2}\n";
        assert_eq!(read_frame(&mut input, 64).expect("first"), b"{\"a\":1}");
        assert_eq!(read_frame(&mut input, 64).expect("second"), b"{\"b\":2}");
        assert!(matches!(
            read_frame(&mut input, 64),
            Err(FrameError::Closed)
        ));

        let mut exact: &[u8] = b"12345678\n";
        assert_eq!(
            read_frame(&mut exact, 8).expect("exactly at the limit"),
            b"12345678"
        );
        let mut over: &[u8] = b"123456789\n";
        assert!(matches!(
            read_frame(&mut over, 8),
            Err(FrameError::TooLarge { limit: 8 })
        ));
        let mut cut: &[u8] = b"{\"a\"";
        assert!(matches!(
            read_frame(&mut cut, 64),
            Err(FrameError::Truncated)
        ));
    }
}
