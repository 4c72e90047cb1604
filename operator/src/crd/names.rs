//! Names the controllers, the gateway, the plugin, the dev stack and tests all spell: condition
//! types and label keys. Command annotations live with the commands themselves
//! ([`edgewise_core::rollout::Command::annotation`]), since the step machine reads them.

/// `status.conditions[].type` of the Edgewise kinds.
pub mod condition {
    /// Every kind: the object is done, as `kubectl wait --for=condition=Ready` expects (a
    /// ModelVersion verified, a RoutingPolicy accepted, a ModelRollout succeeded).
    pub const READY: &str = "Ready";
    /// ModelVersion: every variant was found in S3 with the declared size and SHA-256.
    pub const VERIFIED: &str = "Verified";
    /// RoutingPolicy: the policy compiles; only accepted policies are pushed.
    pub const ACCEPTED: &str = "Accepted";
    /// RoutingPolicy: the compiler has warnings (`status.warnings`).
    pub const POLICY_WARNINGS: &str = "PolicyWarnings";
    /// ModelRollout: moving through steps or holding mid-way.
    pub const PROGRESSING: &str = "Progressing";
    /// ModelRollout: no failure and no failed analysis.
    pub const HEALTHY: &str = "Healthy";
    /// ModelRollout: the ModelVersion of `spec.version` exists and is Ready.
    pub const VERSION_READY: &str = "VersionReady";
    /// ModelRollout: the segment holds the devices the current step needs.
    pub const DEVICES_AVAILABLE: &str = "DevicesAvailable";
    /// ModelRollout: an older rollout selects some of the same devices.
    pub const CONFLICT: &str = "Conflict";
    /// ModelRollout: the last command (promote, abort, retry…) and whether it applied.
    pub const LAST_COMMAND: &str = "LastCommand";
}

/// Label keys Edgewise sets or selects on.
pub mod label {
    /// A device's operating system as the device reports it. Under `self.`, as every
    /// self-reported label, so it never overrides a server-side label and a selector must
    /// name it as what it is.
    pub const OS: &str = "self.edgewise.dev/os";
    /// A device's CPU architecture as the device reports it (`self.`, like [`OS`]).
    pub const ARCH: &str = "self.edgewise.dev/arch";
    /// Marks a Secret holding a bootstrap token (`edgewise.dev/bootstrap-token=true`).
    pub const BOOTSTRAP_TOKEN: &str = "edgewise.dev/bootstrap-token";
    /// Marks a ConfigMap revoking a device or a token (`edgewise.dev/revoked=device|token`).
    pub const REVOKED: &str = "edgewise.dev/revoked";
}
