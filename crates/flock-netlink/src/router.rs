//! Finding the router at the other end of an interface, for unnumbered
//! BGP: an ICMPv6 echo request to the all-routers group (`ff02::2`) on
//! that interface, answered by every node there that forwards IPv6 (the
//! kernel joins the group on an interface when forwarding is on). The
//! link-local sources of the replies are the routers. Router
//! advertisements would need the router to send them; an echo needs
//! nothing configured on it.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{NetlinkError, Result};

const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;

/// How long after the first reply further ones are waited for.
const FURTHER_REPLIES: Duration = Duration::from_millis(100);

/// The link-local addresses of the routers answering on `interface`
/// within `wait` (or shortly after the first answer), sorted; blocking, in
/// the calling thread's namespace.
pub fn find_routers(interface: &str, wait: Duration) -> Result<Vec<Ipv6Addr>> {
    let io = |what: &str| {
        let what = format!("{what} on interface {interface}");
        move |e: std::io::Error| NetlinkError::io(what)(e)
    };
    let index = nix::net::if_::if_nametoindex(interface)
        .map_err(|e| io("looking up the interface")(e.into()))?;
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .map_err(io("opening an ICMPv6 socket"))?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(io("binding an ICMPv6 socket"))?;
    socket
        .set_multicast_if_v6(index)
        .map_err(io("choosing the multicast interface"))?;
    // A node that forwards is in ff02::2 itself: it must not hear (and
    // answer) its own request.
    socket
        .set_multicast_loop_v6(false)
        .map_err(io("turning off multicast loopback"))?;
    // A datagram socket to std: its send_to and recv_from need no unsafe.
    let socket = UdpSocket::from(socket);
    // Identifies our replies among other ICMPv6 traffic on the link.
    let id = (std::process::id() as u16) ^ (index as u16);
    let [hi, lo] = id.to_be_bytes();
    // Type, code, checksum (the kernel fills it in), identifier, sequence.
    let request = [
        ECHO_REQUEST,
        0,
        0,
        0,
        hi,
        lo,
        0,
        1,
        b'f',
        b'l',
        b'o',
        b'c',
        b'k',
    ];
    let to = SocketAddrV6::new(ALL_ROUTERS, 0, 0, index);
    socket
        .send_to(&request, to)
        .map_err(io("sending an echo request to ff02::2"))?;
    let mut deadline = Instant::now() + wait;
    let mut routers = Vec::new();
    let mut packet = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(io("waiting for echo replies"))?;
        let (len, from) = match socket.recv_from(&mut packet) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("receiving echo replies")(e)),
        };
        let ours = len >= 8 && packet[0] == ECHO_REPLY && packet[4..6] == [hi, lo];
        if let SocketAddr::V6(source) = from
            && ours
            && source.ip().is_unicast_link_local()
            && !routers.contains(source.ip())
        {
            routers.push(*source.ip());
            // Others on the link answer about as fast: wait a little for
            // them (several routers is worth a warning), not the whole time.
            deadline = deadline.min(Instant::now() + FURTHER_REPLIES);
        }
    }
    routers.sort();
    Ok(routers)
}
