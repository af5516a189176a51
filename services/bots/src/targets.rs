//! Which addresses outbound events may be POSTed to. A subscription URL is
//! chosen by a tenant; on a server shared by many subscribers it must not
//! reach the provider's own network (loopback, private ranges, link-local
//! cloud metadata at 169.254.169.254, ...). Unless the operator allows
//! private targets (`bots.outbound_allow_private_addresses`), only public
//! addresses are used: literal IPs are checked when the subscription is
//! saved and before each POST, host names every time they are resolved (so
//! a name that later resolves to a private address is refused too).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether an address is on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(mapped) => is_public_v4(mapped),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // Benchmarking, 198.18.0.0/15; reserved, 240.0.0.0/4.
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // Unique local fc00::/7, link-local fe80::/10, documentation 2001:db8::/32.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}

/// Why a URL's host may not be used, if it may not: checks literal
/// addresses and `localhost`; other names are checked when resolved.
pub fn refuse_host(url: &reqwest::Url) -> Option<String> {
    let host = url.host()?;
    let ip = match host {
        url::Host::Ipv4(ip) => IpAddr::V4(ip),
        url::Host::Ipv6(ip) => IpAddr::V6(ip),
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                return Some(format!("`{name}` is this machine"));
            }
            return None;
        }
    };
    (!is_public(ip)).then(|| format!("{ip} is not a public address"))
}

/// A resolver that keeps only public addresses and fails when none is left.
pub struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = resolved.iter().copied().filter(|address| is_public(address.ip())).collect();
            if public.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = format!(
                    "`{host}` resolves only to private addresses ({}); the server allows them only with \
                     bots.outbound_allow_private_addresses = true",
                    resolved.iter().map(|address| address.ip().to_string()).collect::<Vec<_>>().join(", ")
                )
                .into();
                return Err(error);
            }
            let addresses: Addrs = Box::new(public.into_iter());
            Ok(addresses)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_reserved_addresses_are_not_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "240.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn literal_private_hosts_and_localhost_are_refused_names_are_left_to_resolution() {
        let refused = |url: &str| refuse_host(&reqwest::Url::parse(url).unwrap());
        assert!(refused("http://127.0.0.1:9000/hook").is_some());
        assert!(refused("http://[::1]/hook").is_some());
        assert!(refused("http://localhost/hook").is_some());
        assert!(refused("http://api.localhost/hook").is_some());
        assert!(refused("https://8.8.8.8/hook").is_none());
        assert!(refused("https://hooks.example.com/hook").is_none());
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_only_to_private_addresses() {
        let name: Name = "localhost".parse().unwrap();
        let error = match PublicOnly.resolve(name).await {
            Err(error) => error.to_string(),
            Ok(_) => panic!("localhost resolved to a public address"),
        };
        assert!(error.contains("private"), "{error}");
    }
}
