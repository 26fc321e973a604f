//! The bucket as cvm-init sees it: the names it uses there (`bucket`), is S3 there (`probe`), is this the right
//! crypt key (`keycheck`), and how far S3 is behind the state dir (`lag`).

pub mod bucket;
pub mod keycheck;
pub mod lag;
pub mod lease;
pub mod probe;
