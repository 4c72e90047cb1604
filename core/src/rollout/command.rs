//! Manual commands on a rollout: annotations in, at most one action per request out.
//!
//! A request is an annotation whose value identifies it (the plugin writes a timestamp), as
//! `kubectl rollout restart` does with `kubectl.kubernetes.io/restartedAt`. The controller
//! records the value of every request it handled in `status.handledCommands`, in the same
//! write as the state the command produced; a request whose value is already recorded is
//! never acted on again, however often the object is reconciled. Setting the annotation
//! again with a new value is a new request.

use std::collections::BTreeMap;

/// A manual command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Command {
    /// Skip the current pause step; never an analysis step.
    Promote,
    /// Make the canary stable on the whole segment now, skipping every remaining step and
    /// analysis (Argo's `promote --full`).
    PromoteFull,
    /// Send every device back to the stable version and stop.
    Abort,
    /// Restart a rollout that rolled back, was aborted or is held on failure from its first
    /// step.
    Retry,
}

/// Prefix of every command annotation.
pub const ANNOTATION_PREFIX: &str = "edgewise.dev/";

impl Command {
    /// Every command, in the order pending requests are handled: stopping before restarting,
    /// restarting before moving on.
    pub const ALL: [Command; 4] = [
        Command::Abort,
        Command::Retry,
        Command::PromoteFull,
        Command::Promote,
    ];

    /// The name in annotations, status and events.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Command::Promote => "promote",
            Command::PromoteFull => "promote-full",
            Command::Abort => "abort",
            Command::Retry => "retry",
        }
    }

    /// The annotation that requests it, e.g. `edgewise.dev/promote`.
    #[must_use]
    pub fn annotation(self) -> &'static str {
        match self {
            Command::Promote => "edgewise.dev/promote",
            Command::PromoteFull => "edgewise.dev/promote-full",
            Command::Abort => "edgewise.dev/abort",
            Command::Retry => "edgewise.dev/retry",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One request for a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// The annotation's value, which identifies the request.
    pub id: String,
}

/// The first request not handled yet, if any.
#[must_use]
pub fn pending(
    annotations: &BTreeMap<String, String>,
    handled: &BTreeMap<String, String>,
) -> Option<Request> {
    Command::ALL.into_iter().find_map(|command| {
        let id = annotations.get(command.annotation())?;
        (handled.get(command.name()) != Some(id)).then(|| Request {
            command,
            id: id.clone(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_request_is_pending_until_its_value_is_recorded() {
        let annotations = map(&[("edgewise.dev/promote", "1"), ("team", "ml")]);
        let first = pending(&annotations, &BTreeMap::new()).expect("pending");
        assert_eq!(first.command, Command::Promote);
        assert_eq!(first.id, "1");
        assert_eq!(pending(&annotations, &map(&[("promote", "1")])), None);
        let again = map(&[("edgewise.dev/promote", "2")]);
        assert_eq!(
            pending(&again, &map(&[("promote", "1")])).map(|r| r.id),
            Some("2".to_owned()),
            "a new value is a new request"
        );
    }

    #[test]
    fn abort_is_handled_before_anything_else() {
        let annotations = map(&[
            ("edgewise.dev/promote", "1"),
            ("edgewise.dev/promote-full", "1"),
            ("edgewise.dev/abort", "1"),
        ]);
        assert_eq!(
            pending(&annotations, &BTreeMap::new()).map(|r| r.command),
            Some(Command::Abort)
        );
        assert_eq!(
            pending(&annotations, &map(&[("abort", "1")])).map(|r| r.command),
            Some(Command::PromoteFull)
        );
    }

    #[test]
    fn annotations_are_the_prefix_plus_the_name() {
        for c in Command::ALL {
            assert_eq!(c.annotation(), format!("{ANNOTATION_PREFIX}{}", c.name()));
        }
    }
}
