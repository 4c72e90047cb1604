//! Enrolment rate limits, checked before any work (the ed25519 proof check is the costly
//! part): per peer address, so one network cannot guess tokens or burn CPU at will, and per
//! bootstrap token (by its digest), so a leaked token cannot mint credentials in bulk.
//! Each replica limits what reaches it; behind a load balancer spreading peers evenly the
//! fleet-wide rate is the replicas' sum.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Keys tracked before idle ones are forgotten.
const FORGET_ABOVE: usize = 10_000;

/// A sustained rate with a burst, per key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests a minute, sustained.
    pub per_minute: u32,
    /// Requests at once after a quiet spell.
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Quota {
        let one = NonZeroU32::MIN;
        Quota::per_minute(NonZeroU32::new(self.per_minute).unwrap_or(one))
            .allow_burst(NonZeroU32::new(self.burst).unwrap_or(one))
    }
}

/// Enrolment rates per peer and per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolRates {
    /// Per peer address.
    pub per_peer: Rate,
    /// Per bootstrap token.
    pub per_token: Rate,
}

impl Default for EnrolRates {
    fn default() -> Self {
        EnrolRates {
            // A factory or a carrier NAT puts many devices behind one address: generous.
            per_peer: Rate {
                per_minute: 600,
                burst: 200,
            },
            // A fleet enrolling after a mass reset: 6,000 devices a minute per token.
            per_token: Rate {
                per_minute: 6_000,
                burst: 2_000,
            },
        }
    }
}

/// The gateway's enrolment limits.
pub struct EnrolLimits {
    peer: DefaultKeyedRateLimiter<IpAddr>,
    token: DefaultKeyedRateLimiter<[u8; 32]>,
    clock: DefaultClock,
}

impl std::fmt::Debug for EnrolLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolLimits").finish_non_exhaustive()
    }
}

impl EnrolLimits {
    /// Limits at `rates`.
    #[must_use]
    pub fn new(rates: EnrolRates) -> Self {
        EnrolLimits {
            peer: DefaultKeyedRateLimiter::keyed(rates.per_peer.quota()),
            token: DefaultKeyedRateLimiter::keyed(rates.per_token.quota()),
            clock: DefaultClock::default(),
        }
    }

    /// Admits one enrolment from `peer` with the token whose SHA-256 is `token`, or says
    /// how long to wait. A refused peer does not spend the token's allowance.
    ///
    /// # Errors
    /// The wait before this peer or token may try again.
    pub fn admit(&self, peer: Option<IpAddr>, token: &[u8; 32]) -> Result<(), Duration> {
        if self.peer.len() > FORGET_ABOVE {
            self.peer.retain_recent();
        }
        if self.token.len() > FORGET_ABOVE {
            self.token.retain_recent();
        }
        let now = self.clock.now();
        if let Some(ip) = peer {
            self.peer
                .check_key(&ip)
                .map_err(|until| until.wait_time_from(now))?;
        }
        self.token
            .check_key(token)
            .map_err(|until| until.wait_time_from(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_per_peer_and_per_token() {
        let limits = EnrolLimits::new(EnrolRates {
            per_peer: Rate {
                per_minute: 60,
                burst: 3,
            },
            per_token: Rate {
                per_minute: 60,
                burst: 5,
            },
        });
        let (a, b): (IpAddr, IpAddr) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let token = [7; 32];
        for _ in 0..3 {
            limits.admit(Some(a), &token).expect("within the burst");
        }
        let wait = limits.admit(Some(a), &token).expect_err("burst spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another peer has its own allowance; the token's is shared: 2 of 5 left.
        limits.admit(Some(b), &token).expect("another peer");
        limits.admit(Some(b), &token).expect("another peer");
        limits
            .admit(Some(b), &token)
            .expect_err("the token's burst is spent");
        // Another token from a fresh peer is unaffected.
        limits
            .admit(Some(IpAddr::from([10, 0, 0, 3])), &[8; 32])
            .expect("another token");
    }
}
