//! The Edgewise on-device agent.
//!
//! It keeps a device's models and routing policy in line with the control plane over the
//! `edgewise.v1.Fleet` protocol and answers routing questions locally through
//! `edgewise.agent.v1.Router`, offline too. The sync client, artifact store, local router,
//! telemetry buffer and fleet simulator arrive as modules of this crate.
