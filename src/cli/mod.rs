//! The commands besides running the appliance: `cvm-init check` and
//! `cvm-init attest`.

pub mod attest;
pub mod check;
