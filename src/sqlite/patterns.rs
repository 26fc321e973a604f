//! Where databases are expected: glob patterns relative to the state dir,
//! matched one path component at a time so a search reads only the
//! directories a pattern can reach (on a FUSE mount, every readdir may cost
//! an S3 request).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobMatcher};

/// The spec's `agents/*/memory.db` plus what OpenClaw releases really write (docs/facts.md §1).
pub const DEFAULT: &str =
    "state/*.sqlite,memory/*.sqlite,agents/*/agent/*.sqlite,agents/*/memory.db";

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Glob(GlobMatcher),
}

impl Part {
    fn matches(&self, name: &str) -> bool {
        match self {
            Part::Literal(l) => l == name,
            Part::Glob(g) => g.is_match(name),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Patterns {
    list: Vec<Vec<Part>>,
    source: String,
    /// Paths that are never databases even when a pattern matches them
    /// (`CVM_EXCLUDE`: OpenClaw's SQLite lease files match `*.sqlite`).
    except: globset::GlobSet,
}

impl Patterns {
    /// Parses a comma-separated list. Each pattern is relative, has no `..`,
    /// and uses `*`, `?`, `[...]` within one path component (no `**`).
    pub fn parse(s: &str) -> Result<Patterns, String> {
        let mut list = Vec::new();
        for raw in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let path = Path::new(raw);
            if path.is_absolute() {
                return Err(format!(
                    "{raw:?} is absolute; patterns are relative to OPENCLAW_STATE_DIR"
                ));
            }
            let mut parts = Vec::new();
            for c in path.components() {
                let Component::Normal(name) = c else {
                    return Err(format!("{raw:?} may not contain '.' or '..' components"));
                };
                let name = name
                    .to_str()
                    .ok_or_else(|| format!("{raw:?} is not UTF-8"))?;
                if name.contains("**") {
                    return Err(format!(
                        "{raw:?}: '**' is not supported; name each directory level"
                    ));
                }
                if name.contains(['*', '?', '[']) {
                    let g = Glob::new(name).map_err(|e| format!("{raw:?}: {e}"))?;
                    parts.push(Part::Glob(g.compile_matcher()));
                } else {
                    parts.push(Part::Literal(name.to_owned()));
                }
            }
            list.push(parts);
        }
        if list.is_empty() {
            return Err("no patterns given".to_owned());
        }
        Ok(Patterns {
            list,
            source: s.to_owned(),
            except: globset::GlobSet::empty(),
        })
    }

    /// These patterns, minus whatever the rclone filter patterns `rules` match.
    pub fn except<S: AsRef<str>>(mut self, rules: &[S]) -> Result<Patterns, globset::Error> {
        self.except = crate::filter::globset(rules)?;
        Ok(self)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the relative path `rel` is a database path by these patterns.
    pub fn matches(&self, rel: &Path) -> bool {
        let names: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
        let file_ok = names.last().is_some_and(|n| !super::is_sidecar(n));
        file_ok
            && !self.except.is_match(rel)
            && self.list.iter().any(|p| {
                p.len() == names.len() && p.iter().zip(&names).all(|(part, n)| part.matches(n))
            })
    }

    /// Every non-directory entry below `root` that a pattern matches, as
    /// paths relative to `root`, sorted. Sidecars never match.
    pub fn find(&self, root: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for p in &self.list {
            walk(root, PathBuf::new(), p, &mut out)?;
        }
        out.retain(|rel| !self.except.is_match(rel));
        out.sort();
        out.dedup();
        Ok(out)
    }
}

impl Default for Patterns {
    fn default() -> Self {
        Patterns::parse(DEFAULT).expect("the default patterns parse")
    }
}

fn walk(root: &Path, rel: PathBuf, parts: &[Part], out: &mut Vec<PathBuf>) -> io::Result<()> {
    let Some((first, rest)) = parts.split_first() else {
        return Ok(());
    };
    let dir = root.join(&rel);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if !first.matches(name_str) {
            continue;
        }
        let is_dir = entry.file_type()?.is_dir();
        let child = rel.join(&name);
        match (rest.is_empty(), is_dir) {
            (true, false) if !super::is_sidecar(name_str) => out.push(child),
            (false, true) => walk(root, child, rest, out)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_spec_and_real_openclaw_paths() {
        let p = Patterns::default();
        for yes in [
            "state/openclaw.sqlite",
            "memory/main.sqlite",
            "agents/main/agent/openclaw-agent.sqlite",
            "agents/a1/memory.db",
        ] {
            assert!(p.matches(Path::new(yes)), "{yes}");
        }
        for no in [
            "state/openclaw.sqlite-wal",
            "state/openclaw.sqlite-shm",
            "openclaw.json",
            "agents/main/memory.db-journal",
            "cache/x.sqlite",
            "state/sub/deep.sqlite",
        ] {
            assert!(!p.matches(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn excluded_names_are_never_databases() {
        let p = Patterns::default()
            .except(
                &crate::config::DEFAULT_EXCLUDE
                    .split(',')
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let agent = "agents/main/agent/openclaw-agent.sqlite";
        assert!(p.matches(Path::new(agent)));
        for lease in [
            ".generation-lock.sqlite",
            ".generation-writer.sqlite",
            ".reindex-lock.sqlite",
        ] {
            assert!(!p.matches(Path::new(&format!("{agent}{lease}"))), "{lease}");
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("agents/main/agent");
        fs::create_dir_all(&d).unwrap();
        for f in [
            "openclaw-agent.sqlite",
            "openclaw-agent.sqlite.generation-lock.sqlite",
        ] {
            fs::write(d.join(f), "").unwrap();
        }
        assert_eq!(p.find(dir.path()).unwrap(), vec![PathBuf::from(agent)]);
    }

    #[test]
    fn bad_patterns_are_rejected_with_a_reason() {
        for bad in ["/abs/*.db", "../up.db", "a/**/b.db", "", " , "] {
            assert!(Patterns::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn find_walks_only_matching_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "state/openclaw.sqlite",
            "state/openclaw.sqlite-wal",
            "agents/a/agent/x.sqlite",
            "agents/b/memory.db",
            "cache/big.sqlite",
            "openclaw.json",
        ] {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, "x").unwrap();
        }
        let found = Patterns::default().find(root).unwrap();
        let want: Vec<PathBuf> = [
            "agents/a/agent/x.sqlite",
            "agents/b/memory.db",
            "state/openclaw.sqlite",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(found, want);
        assert!(Patterns::default()
            .find(&root.join("missing"))
            .unwrap()
            .is_empty());
    }
}
