//! Deciding where one request runs. Allocation-free: a decision borrows from the policy.

use xxhash_rust::xxh3::xxh3_64;

use super::compile::{Attr, CompiledPolicy, Cond, Target, TargetId};

/// Connectivity of the device when the request is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Network {
    /// Online on an unmetered link.
    #[default]
    Online,
    /// No connectivity: cloud targets are unusable.
    Offline,
    /// Online on a metered link.
    Metered,
}

impl Network {
    /// The attribute value policies match on.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Online => "online",
            Network::Offline => "offline",
            Network::Metered => "metered",
        }
    }
}

/// The attributes of one request, borrowed from the caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    /// Caller's request id; drives deterministic shadow sampling.
    pub request_id: &'a str,
    /// Task, e.g. `autocomplete`, `summarize`.
    pub task: Option<&'a str>,
    /// Data classification, e.g. `public`, `private`.
    pub data_class: Option<&'a str>,
    /// Prompt size in tokens.
    pub input_tokens: Option<u32>,
    /// How long the caller can wait.
    pub latency_budget_ms: Option<u32>,
    /// Connectivity.
    pub network: Network,
    /// Battery level, 0–1.
    pub battery: Option<f32>,
    /// Estimated difficulty, 0–1.
    pub complexity: Option<f32>,
    /// Installed version of the on-device model.
    pub model_version: Option<&'a str>,
    /// Free-form attributes, matched as `attributes.<key>`.
    pub attributes: &'a [(&'a str, &'a str)],
    /// Cloud requests this device made today (UTC), for budgets.
    pub cloud_requests_today: u32,
    /// Cloud spend this device made today (UTC), for budgets.
    pub cloud_spend_today_usd: f64,
}

/// Why a decision left the matched route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reroute {
    /// The device is offline; a device target from the fallback chain was used.
    Offline,
    /// The cloud budget is spent; a device target was used.
    OverBudget,
}

/// Where a request runs. Borrows from the [`CompiledPolicy`].
#[derive(Clone, Copy, Debug)]
pub struct Decision<'p> {
    /// Target that serves the request.
    pub target: &'p Target,
    fallback: &'p [TargetId],
    targets: &'p [Target],
    /// Target that refines the answer afterwards, if any.
    pub refine: Option<&'p Target>,
    /// Cloud target that also receives this request as a shadow, if sampled.
    pub shadow: Option<&'p Target>,
    /// Answered on the device because it is offline, and the rule asks for reprocessing:
    /// run the request on this (cloud) target again once online.
    pub reprocess: Option<&'p Target>,
    /// Index of the matching rule; `None` for the default route.
    pub rule_index: Option<usize>,
    /// Name of the matching rule, `default` for the default route.
    pub rule: &'p str,
    /// Content hash of the policy that decided.
    pub policy_version: &'p str,
    /// Set when the route was left because the cloud was unusable.
    pub reroute: Option<Reroute>,
}

impl<'p> Decision<'p> {
    /// Targets to try, in order, if `target` fails.
    pub fn fallback(&self) -> impl ExactSizeIterator<Item = &'p Target> + 'p {
        let targets = self.targets;
        self.fallback
            .iter()
            .map(move |&id| &targets[usize::from(id)])
    }
}

impl CompiledPolicy {
    /// Decides where `request` runs: the first rule whose conditions all hold, else the
    /// default; then offline and budget rerouting, refine and shadow sampling.
    #[must_use]
    pub fn decide<'p>(&'p self, request: &Request<'_>) -> Decision<'p> {
        let (rule_index, rule, route) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.conditions.iter().all(|c| c.holds(request)))
            .map_or((None, "default", &self.default), |(i, r)| {
                (Some(i), &*r.name, &r.route)
            });

        let cloud_blocked = if request.network == Network::Offline {
            Some(Reroute::Offline)
        } else if self.over_budget(request) {
            Some(Reroute::OverBudget)
        } else {
            None
        };

        let mut target = route.route;
        let mut fallback: &[TargetId] = &route.fallback;
        let mut reroute = None;
        if let Some(why) = cloud_blocked
            && self.target(target).is_cloud()
            && !route.pinned()
        {
            // Prefer the route's own device fallback; else the policy's first device target.
            if let Some(pos) = fallback.iter().position(|&t| !self.target(t).is_cloud()) {
                target = fallback[pos];
                fallback = &fallback[pos + 1..];
                reroute = Some(why);
            } else if let Some(device) = self.first_device_target {
                target = device;
                fallback = &[];
                reroute = Some(why);
            }
        }

        let on_device = !self.target(target).is_cloud();
        let refine = route
            .refine
            .filter(|&r| on_device && (cloud_blocked.is_none() || !self.target(r).is_cloud()))
            .map(|r| self.target(r));
        let shadow = self
            .shadow
            .as_ref()
            .filter(|s| {
                on_device
                    && !route.pinned()
                    && cloud_blocked.is_none()
                    && xxh3_64(request.request_id.as_bytes()) % 10_000 < s.per_10k
            })
            .map(|s| self.target(s.target));

        let reprocess = (route.reprocess && reroute == Some(Reroute::Offline))
            .then(|| self.target(route.route));

        Decision {
            target: self.target(target),
            fallback,
            targets: &self.targets,
            refine,
            shadow,
            reprocess,
            rule_index,
            rule,
            policy_version: &self.version,
            reroute,
        }
    }

    fn target(&self, id: TargetId) -> &Target {
        &self.targets[usize::from(id)]
    }

    fn over_budget(&self, request: &Request<'_>) -> bool {
        self.budget
            .max_cloud_requests
            .is_some_and(|max| request.cloud_requests_today >= max)
            || self
                .budget
                .max_cloud_spend_usd
                .is_some_and(|max| request.cloud_spend_today_usd >= max)
    }
}

/// A request attribute's value, borrowed.
enum Value<'a> {
    Str(&'a str),
    Num(f64),
    Absent,
}

impl Cond {
    fn holds(&self, request: &Request<'_>) -> bool {
        let value = match &self.attr {
            Attr::Task => request.task.map_or(Value::Absent, Value::Str),
            Attr::DataClass => request.data_class.map_or(Value::Absent, Value::Str),
            Attr::Network => Value::Str(request.network.as_str()),
            Attr::ModelVersion => request.model_version.map_or(Value::Absent, Value::Str),
            Attr::InputTokens => request
                .input_tokens
                .map_or(Value::Absent, |v| Value::Num(f64::from(v))),
            Attr::LatencyBudgetMs => request
                .latency_budget_ms
                .map_or(Value::Absent, |v| Value::Num(f64::from(v))),
            Attr::Battery => request
                .battery
                .map_or(Value::Absent, |v| Value::Num(f64::from(v))),
            Attr::Complexity => request
                .complexity
                .map_or(Value::Absent, |v| Value::Num(f64::from(v))),
            Attr::Custom(key) => request
                .attributes
                .iter()
                .find(|(k, _)| *k == &**key)
                .map_or(Value::Absent, |(_, v)| Value::Str(v)),
        };
        match value {
            // Absent: only "absent or not one of" and "does not exist" can hold.
            Value::Absent => {
                self.exists != Some(true)
                    && self.one_of.is_none()
                    && self.eq.is_none()
                    && self.lower.is_none()
                    && self.upper.is_none()
            }
            Value::Str(s) => {
                self.exists != Some(false)
                    && self
                        .one_of
                        .as_ref()
                        .is_none_or(|l| l.iter().any(|v| &**v == s))
                    && self
                        .none_of
                        .as_ref()
                        .is_none_or(|l| !l.iter().any(|v| &**v == s))
                    && self.eq.as_ref().is_none_or(|v| &**v == s)
                    && (self.lower.is_none() && self.upper.is_none()
                        || s.parse::<f64>().is_ok_and(|n| self.in_bounds(n)))
            }
            Value::Num(n) => self.exists != Some(false) && self.in_bounds(n),
        }
    }

    fn in_bounds(&self, n: f64) -> bool {
        self.lower
            .is_none_or(|(lo, inclusive)| if inclusive { n >= lo } else { n > lo })
            && self
                .upper
                .is_none_or(|(hi, inclusive)| if inclusive { n <= hi } else { n < hi })
    }
}
