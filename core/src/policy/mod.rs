//! Routing policy: which request runs on the device and which in the cloud.
//!
//! [`spec`] is what users write, [`compile`] validates it into a [`CompiledPolicy`], and
//! [`CompiledPolicy::decide`] answers one request in well under a microsecond without
//! allocating.

mod compile;
mod eval;
mod lint;
pub mod spec;

pub use compile::{
    CompiledPolicy, PolicyError, PolicyIssue, Target, TargetKind, compile, policy_version,
};
pub use eval::{Decision, Network, Request, Reroute};
pub use lint::{PolicyWarning, lint};

#[cfg(test)]
mod tests;
