//! Mount and unmount behind a small trait, as youki does with its
//! `Syscall`: the real one ([`Linux`]) makes the syscalls; the recording one
//! in tests can fail any call, so the order of the mount layout's mounts and
//! its failure paths are unit-tested without root.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::mountinfo::{self, Mounted, PROC_MOUNTINFO};

pub trait Mounts {
    /// A bind mount of `target` onto itself.
    fn bind(&self, target: &Path) -> nix::Result<()>;
    /// Makes the bind mount at `target` read-only.
    fn remount_read_only(&self, target: &Path) -> nix::Result<()>;
    /// Lazily unmounts the top mount at `target`.
    fn detach(&self, target: &Path) -> nix::Result<()>;
    /// What is mounted at `target`, bottom first (empty if unknown).
    fn mounts_at(&self, target: &Path) -> Vec<Mounted>;
}

/// The kernel.
pub struct Linux;

impl Mounts for Linux {
    fn bind(&self, target: &Path) -> nix::Result<()> {
        mount(
            Some(target),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    }

    fn remount_read_only(&self, target: &Path) -> nix::Result<()> {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, ro, None::<&str>)
    }

    fn detach(&self, target: &Path) -> nix::Result<()> {
        umount2(target, MntFlags::MNT_DETACH)
    }

    fn mounts_at(&self, target: &Path) -> Vec<Mounted> {
        mountinfo::mounts_at(Path::new(PROC_MOUNTINFO), target).unwrap_or_default()
    }
}

#[cfg(test)]
pub mod fake {
    use std::cell::RefCell;

    use super::*;

    /// Records every call; the calls named in `fail` fail (once each) with EBUSY.
    #[derive(Default)]
    pub struct Recording {
        pub calls: RefCell<Vec<&'static str>>,
        pub fail: RefCell<Vec<&'static str>>,
        pub mounted: RefCell<Vec<Mounted>>,
    }

    impl Recording {
        fn call(&self, name: &'static str) -> nix::Result<()> {
            self.calls.borrow_mut().push(name);
            let mut fail = self.fail.borrow_mut();
            match fail.iter().position(|f| *f == name) {
                Some(i) => {
                    fail.remove(i);
                    Err(nix::errno::Errno::EBUSY)
                }
                None => Ok(()),
            }
        }
    }

    impl Mounts for Recording {
        fn bind(&self, _: &Path) -> nix::Result<()> {
            self.call("bind")
        }
        fn remount_read_only(&self, _: &Path) -> nix::Result<()> {
            self.call("remount_ro")
        }
        fn detach(&self, _: &Path) -> nix::Result<()> {
            self.call("detach")
        }
        fn mounts_at(&self, _: &Path) -> Vec<Mounted> {
            self.mounted.borrow().clone()
        }
    }
}
