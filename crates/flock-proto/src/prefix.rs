//! An IP address with a prefix length, as CNI writes them (`10.1.0.5/24`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address and a prefix length; host bits are kept, as CNI results do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// Builds a prefix, refusing a length longer than the address family allows.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, ParsePrefixError> {
        let max = max_len(addr);
        if len > max {
            return Err(ParsePrefixError(format!(
                "{addr}/{len}: prefix length {len} is longer than {max}"
            )));
        }
        Ok(IpPrefix { addr, len })
    }

    /// A host prefix: `/32` for IPv4, `/128` for IPv6.
    pub fn host(addr: IpAddr) -> Self {
        IpPrefix {
            addr,
            len: max_len(addr),
        }
    }

    /// The default route of `addr`'s family: `0.0.0.0/0` or `::/0`.
    pub fn default_route(addr: IpAddr) -> Self {
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        IpPrefix { addr, len: 0 }
    }

    /// The address, host bits included.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether this is an IPv4 prefix.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Why a string is not an `address/length` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsePrefixError(String);

impl fmt::Display for ParsePrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParsePrefixError {}

impl FromStr for IpPrefix {
    type Err = ParsePrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| ParsePrefixError(format!("{s:?} is not address/length")))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| ParsePrefixError(format!("{s:?}: {addr:?} is not an IP address")))?;
        // u8::from_str accepts a leading '+', which no CIDR spelling has.
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParsePrefixError(format!(
                "{s:?}: {len:?} is not a prefix length"
            )));
        }
        let len: u8 = len
            .parse()
            .map_err(|_| ParsePrefixError(format!("{s:?}: {len:?} is not a prefix length")))?;
        IpPrefix::new(addr, len)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for s in ["10.1.0.5/24", "0.0.0.0/0", "2001:db8::5/128", "::/0"] {
            let p: IpPrefix = s.parse().expect(s);
            assert_eq!(p.to_string(), s);
        }
    }

    #[test]
    fn refuses_malformed_prefixes() {
        for s in [
            "10.1.0.5",
            "10.1.0.5/33",
            "::/129",
            "x/1",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "/8",
        ] {
            assert!(s.parse::<IpPrefix>().is_err(), "{s:?} must be refused");
        }
    }
}
