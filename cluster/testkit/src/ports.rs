use std::sync::atomic::{AtomicU32, Ordering};

/// A free loopback port that no outgoing connection can take before a child
/// process binds it, or while a killed server is down before its restart on
/// the same port. A port handed out by `bind(0)` lies in the kernel's
/// ephemeral range, where any connection made meanwhile (by this test or any
/// other) may land on it; these come from below (or above) that range, at an
/// offset of this process's own, and are checked free.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (ephemeral_low, ephemeral_high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut bounds = range.split_whitespace().map(|bound| bound.parse::<u32>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999));
    let (low, high) = if ephemeral_low >= 12_000 { (10_000, ephemeral_low) } else { (ephemeral_high + 1, 65_536) };
    let span = high - low;
    let start = std::process::id() * 97 % span;
    for _ in 0..span {
        let port = low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("ports stay below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let bounds: Vec<u16> = range.split_whitespace().filter_map(|bound| bound.parse().ok()).collect();
        let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
        for port in &ports {
            if let [low, high] = bounds[..] {
                assert!(!(low..=high).contains(port), "{port} is in the ephemeral range {low}-{high}");
            }
            std::net::TcpListener::bind(("127.0.0.1", *port)).expect("the port is free");
        }
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }
}
