//! The Edgewise control plane: the custom resources, their controllers, the device gateway
//! and the S3 and ClickHouse adapters, as the production binary `edgewise-operator` runs
//! them. The dev stack (`operator/dev`, crate `edgewise-dev`) builds on this crate; nothing
//! here depends on it or on the agent.

pub mod cli;
pub mod controller;
pub mod crd;
pub mod gateway;
pub mod observability;
pub mod publish;
pub mod s3;
pub mod server;
pub mod shutdown;
pub mod telemetry;
