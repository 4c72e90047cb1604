//! What `network` means to the router: whether this device can reach anything off the device
//! (the cloud targets a policy names), not whether the control plane answers. A gateway
//! outage therefore changes no routing decision. The agent looks at the kernel's routing
//! table: with no default route (IPv4 or IPv6) nothing off the device is reachable and the
//! router reports `offline`; an app that knows better (a captive portal, a metered link)
//! says so per request in `DecideRequest.network`.

use std::sync::Arc;
use std::time::Duration;

use edgewise_core::policy::Network;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::router::LocalRouter;

/// How often the routing table is read.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Whether `/proc/net/route` (IPv4) holds an up default route on a non-loopback interface.
#[must_use]
pub fn ipv4_default_route(table: &str) -> bool {
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags …; RTF_UP is 0x1.
        f.len() > 3
            && f[0] != "lo"
            && f[1] == "00000000"
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 1 == 1)
    })
}

/// Whether `/proc/net/ipv6_route` holds a default route (`::/0`) on a non-loopback interface.
#[must_use]
pub fn ipv6_default_route(table: &str) -> bool {
    table.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // dest dest_prefix_len src src_prefix_len next_hop metric refcnt use flags iface
        f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo"
    })
}

/// The device's connectivity from its routing table; `None` where it cannot be read (not
/// Linux), in which case the router assumes online.
#[must_use]
pub fn probe() -> Option<Network> {
    let v4 = std::fs::read_to_string("/proc/net/route").ok();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").ok();
    if v4.is_none() && v6.is_none() {
        return None;
    }
    let routed = v4.as_deref().is_some_and(ipv4_default_route)
        || v6.as_deref().is_some_and(ipv6_default_route);
    Some(if routed {
        Network::Online
    } else {
        Network::Offline
    })
}

/// Keeps the router's network state current until `shutdown`, logging each change.
pub async fn watch(router: Arc<LocalRouter>, shutdown: CancellationToken) {
    let mut last = None;
    loop {
        let now = probe();
        if now != last {
            if let Some(n) = now {
                router.set_network(n);
                info!(network = n.as_str(), "device connectivity");
            }
            last = now;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4_HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    #[test]
    fn a_default_route_means_online_and_its_absence_offline() {
        let routed = format!(
            "{V4_HEADER}eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\neth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
        );
        assert!(ipv4_default_route(&routed));
        let local_only =
            format!("{V4_HEADER}eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n");
        assert!(!ipv4_default_route(&local_only));
        let down =
            format!("{V4_HEADER}eth0\t00000000\t0102A8C0\t0002\t0\t0\t100\t00000000\t0\t0\t0\n");
        assert!(!ipv4_default_route(&down), "a route that is not up");
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wlan0\n";
        assert!(ipv6_default_route(v6));
        let v6_lo = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert!(
            !ipv6_default_route(v6_lo),
            "the loopback's unreachable route"
        );
    }
}
