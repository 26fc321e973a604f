//! What PID 1 does with the kernel: `/proc` and `/dev/fuse` (`pid1`), the
//! one owner of `waitpid` (`process`), the mount table (`mountinfo`),
//! sd-notify (`sdnotify`), and the seam that puts mount, unmount and kill
//! behind a trait (`seam`).

pub mod mountinfo;
pub mod pid1;
pub mod process;
pub mod sdnotify;
pub mod seam;
