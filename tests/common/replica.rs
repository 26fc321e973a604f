//! The replicate layout's test setup: a Garage, an idle stand-in gateway,
//! and cvm-init booted against them, plus what the tests ask of S3.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::{rclone, script, stock_config, Appliance, Dirs, Garage, PASSWORD};

const T: Duration = Duration::from_secs(40);

pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub g: Garage,
    pub idle: String,
}

impl Setup {
    pub fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let g = Garage::start(tmp.path());
        let idle = script(tmp.path(), "idle.sh", "exec sleep 100000")
            .display()
            .to_string();
        Setup { tmp, g, idle }
    }

    pub fn boot(&self, name: &str, extra: &[(&str, &str)]) -> (Appliance, Dirs) {
        let dirs = Dirs::new(self.tmp.path(), name);
        let mut app = self.start(&dirs, extra);
        app.wait_ready(T);
        (app, dirs)
    }

    pub fn start(&self, dirs: &Dirs, extra: &[(&str, &str)]) -> Appliance {
        let mut env = self.g.s3_env();
        env.extend(dirs.env());
        env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
        env.push(("CVM_GATEWAY_CMD".into(), self.idle.clone()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Appliance::start(dirs, &env)
    }

    /// Remote names under `dir` of the crypt remote, as stock rclone sees them.
    pub fn remote(&self, dir: &str) -> Vec<String> {
        let conf = stock_config(&self.g, self.tmp.path());
        String::from_utf8(rclone(
            &conf,
            &["lsf", "-R", "--files-only", &format!("crypt:{dir}")],
        ))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
    }
}

pub fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

pub fn uploaded(app: &Appliance) -> usize {
    app.log_text()
        .lines()
        .filter(|l| l.contains("replicate: pass"))
        .filter_map(|l| {
            l.split("uploaded=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// Size of `name` on S3 as stock rclone lists it through the crypt remote, if there.
pub fn remote_size(s: &Setup, name: &str) -> Option<u64> {
    let conf = stock_config(&s.g, s.tmp.path());
    let out = std::process::Command::new(super::rclone_bin())
        .args([
            "--config",
            &conf.display().to_string(),
            "lsf",
            "--format",
            "sp",
            "--files-only",
        ])
        .arg(format!(
            "crypt:{}",
            Path::new(name).parent().unwrap().display()
        ))
        .output()
        .unwrap();
    let base = Path::new(name)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (size, file) = l.split_once(';')?;
        (file == base).then(|| size.parse().ok())?
    })
}
