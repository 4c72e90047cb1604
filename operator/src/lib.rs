//! The Edgewise control plane: custom resources and (in later modules) the controllers, the
//! agent gateway, the S3 and ClickHouse adapters and the embedded dev stack.

pub mod admission;
pub mod cli;
pub mod clickhouse_server;
pub mod controller;
pub mod crd;
pub mod dev;
pub mod devapi;
pub mod gateway;
pub mod observability;
pub mod s3;
pub mod s3_server;
pub mod server;
pub mod telemetry;
