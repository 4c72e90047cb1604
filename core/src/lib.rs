//! Edgewise domain logic, with no I/O and no async.
//!
//! Everything here is a pure function of its inputs so that gateways, controllers, agents,
//! the kubectl plugin and tests compute the same answers:
//!
//! - [`agreement`]: whether two answers to one request agree (shadows, reprocessing);
//! - [`complexity`]: the learned router's request scoring;
//! - [`cohort`]: which devices are in a rollout's canary cohort;
//! - [`names`]: Kubernetes name and label rules;
//! - [`selector`]: label selectors over device labels;
//! - [`policy`]: routing-policy compilation and allocation-free decisions;
//! - [`rollout`]: the rollout step machine and gate evaluation;
//! - [`version`] and [`variant`]: semantic versions and which variant a device gets.

pub mod agreement;
pub mod cohort;
pub mod complexity;
pub mod names;
pub mod policy;
pub mod rollout;
pub mod selector;
pub mod variant;
pub mod version;
