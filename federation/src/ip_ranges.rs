//! IP ranges that outbound federation refuses, so that a room (whose
//! members' server names the sender does not choose) cannot make this
//! server probe its own network.
//!
//! The default deny list is Synapse's: loopback, private, carrier-grade
//! NAT, link-local, documentation, benchmarking, multicast and their IPv6
//! counterparts. An allow list carves exceptions out of it (for example
//! `127.0.0.0/8` for servers federating on one machine). The unspecified
//! addresses are refused whatever the lists say.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// The ranges denied when the configuration names none.
pub const DEFAULT_DENIED: [&str; 19] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

/// One CIDR range, such as `10.0.0.0/8` or `fc00::/7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix_len: u8,
}

/// Why a range did not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP range like 10.0.0.0/8 or fc00::/7")]
pub struct BadRange(pub String);

impl FromStr for IpRange {
    type Err = BadRange;

    fn from_str(text: &str) -> Result<Self, BadRange> {
        let bad = || BadRange(text.to_owned());
        let (address, prefix_len) = match text.split_once('/') {
            Some((address, len)) => (address, Some(len.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| bad())?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = prefix_len.unwrap_or(bits);
        if prefix_len > bits {
            return Err(bad());
        }
        Ok(IpRange {
            network,
            prefix_len,
        })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl IpRange {
    /// Whether `ip` is inside the range; IPv4-mapped IPv6 addresses count as
    /// their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                same_prefix(&network.octets(), &ip.octets(), self.prefix_len)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                same_prefix(&network.octets(), &ip.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

/// The outbound address policy: denied ranges minus allowed ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpPolicy {
    denied: Vec<IpRange>,
    allowed: Vec<IpRange>,
}

impl Default for IpPolicy {
    fn default() -> Self {
        let denied = DEFAULT_DENIED
            .iter()
            .map(|range| range.parse().expect("the default ranges are valid"))
            .collect();
        IpPolicy {
            denied,
            allowed: Vec::new(),
        }
    }
}

impl IpPolicy {
    pub fn new(denied: Vec<IpRange>, allowed: Vec<IpRange>) -> Self {
        IpPolicy { denied, allowed }
    }

    /// Whether a connection to `ip` may be made.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_unspecified() {
            return false;
        }
        if self.allowed.iter().any(|range| range.contains(ip)) {
            return true;
        }
        !self.denied.iter().any(|range| range.contains(ip))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(IpAddr::V6(v6), |v4: Ipv4Addr| IpAddr::V4(v4)),
        v4 => v4,
    }
}

fn same_prefix(network: &[u8], ip: &[u8], prefix_len: u8) -> bool {
    let full_bytes = usize::from(prefix_len / 8);
    if network[..full_bytes] != ip[..full_bytes] {
        return false;
    }
    let rest_bits = prefix_len % 8;
    if rest_bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest_bits);
    network[full_bytes] & mask == ip[full_bytes] & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_contain() {
        let range: IpRange = "172.16.0.0/12".parse().unwrap();
        assert!(range.contains(ip("172.31.255.1")));
        assert!(!range.contains(ip("172.32.0.1")));
        assert!(range.contains(ip("::ffff:172.20.0.1")));
        let single: IpRange = "203.0.113.7".parse().unwrap();
        assert_eq!(single.to_string(), "203.0.113.7/32");
        let v6: IpRange = "fc00::/7".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe00::1")));
        for bad in ["10.0.0.0/33", "nonsense", "::/129", "10.0.0.0/x"] {
            assert_eq!(bad.parse::<IpRange>(), Err(BadRange(bad.to_owned())));
        }
    }

    #[test]
    fn the_default_policy_refuses_internal_addresses() {
        let policy = IpPolicy::default();
        for denied in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "::",
        ] {
            assert!(!policy.permits(ip(denied)), "{denied}");
        }
        for permitted in ["8.8.8.8", "2606:4700::1111", "172.32.0.1"] {
            assert!(policy.permits(ip(permitted)), "{permitted}");
        }
    }

    #[test]
    fn an_allow_list_carves_out_of_the_deny_list() {
        let mut policy = IpPolicy::default();
        policy.allowed.push("127.0.0.0/8".parse().unwrap());
        assert!(policy.permits(ip("127.0.0.2")));
        assert!(!policy.permits(ip("10.0.0.1")));
        assert!(!policy.permits(ip("0.0.0.0")));
        let open = IpPolicy::new(Vec::new(), Vec::new());
        assert!(open.permits(ip("10.0.0.1")));
    }
}
