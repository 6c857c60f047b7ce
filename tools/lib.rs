//! The `ferry` package: the CLI's building blocks (the loopback demo, size
//! parsing) shared by the binary, the end-to-end tests and the benches.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod destination;
pub mod doctor;
pub mod estimate;
pub mod host;
pub mod lab;
pub mod metrics;
pub mod ops;
pub mod record;
pub mod size;
pub mod source;
pub mod vm;
