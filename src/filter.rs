//! rclone filter patterns (`CVM_EXCLUDE` and cvm-init's own rules) matched
//! locally with rclone's semantics, so what cvm-init scans and what rclone
//! copies agree: a leading `/` anchors at the state dir, otherwise a pattern
//! matches at any depth; `*` never crosses `/`, `**` does.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// The patterns as one set; the first one that is not a usable pattern is
/// the error (config validation reports each such `CVM_EXCLUDE` entry).
pub fn globset<S: AsRef<str>>(rules: &[S]) -> Result<GlobSet, globset::Error> {
    let mut b = GlobSetBuilder::new();
    for r in rules {
        b.add(glob(r.as_ref())?);
    }
    b.build()
}

/// One rclone filter pattern as a glob.
pub fn glob(rule: &str) -> Result<Glob, globset::Error> {
    let glob = match rule.strip_prefix('/') {
        Some(anchored) => anchored.to_owned(),
        None => format!("**/{rule}"),
    };
    GlobBuilder::new(&glob).literal_separator(true).build()
}

/// `name` as a literal in an rclone filter pattern.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_match_only_themselves() {
        let name = "a*b?[c]{d}";
        let set = globset(&[format!("/{}", escape(name))]).unwrap();
        assert!(set.is_match(name));
        assert!(!set.is_match("aXb?[c]{d}"));
    }

    #[test]
    fn anchored_and_floating_patterns() {
        let set = globset(&["/tmp/**", "*.lock", "*.sqlite.generation-lock.sqlite*"]).unwrap();
        for (path, want) in [
            ("tmp/a/b", true),
            ("x/tmp/a", false),
            ("a.lock", true),
            ("deep/er/a.lock", true),
            (
                "agents/main/agent/openclaw-agent.sqlite.generation-lock.sqlite",
                true,
            ),
            (
                "agents/main/agent/openclaw-agent.sqlite.generation-lock.sqlite-wal",
                true,
            ),
            ("agents/main/agent/openclaw-agent.sqlite", false),
        ] {
            assert_eq!(set.is_match(path), want, "{path}");
        }
    }

    #[test]
    fn an_unusable_pattern_is_an_error_not_a_pattern_that_matches_nothing() {
        assert!(glob("/tmp/[a").is_err());
        assert!(globset(&["*.lock", "a{b"]).is_err());
    }
}
