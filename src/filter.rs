//! rclone filter patterns (`CVM_EXCLUDE` and cvm-init's own rules) matched
//! locally with rclone's semantics, so what cvm-init scans and what rclone
//! copies agree: a leading `/` anchors at the state dir, otherwise a pattern
//! matches at any depth; `*` never crosses `/`, `**` does.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The patterns as one set. A pattern globset cannot parse matches nothing
/// (config validation has already refused unusable ones).
pub fn globset<S: AsRef<str>>(rules: &[S]) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for r in rules {
        let r = r.as_ref();
        let glob = match r.strip_prefix('/') {
            Some(anchored) => anchored.to_owned(),
            None => format!("**/{r}"),
        };
        if let Ok(g) = GlobBuilder::new(&glob).literal_separator(true).build() {
            b.add(g);
        }
    }
    b.build().unwrap_or_else(|_| GlobSet::empty())
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
        let set = globset(&[format!("/{}", escape(name))]);
        assert!(set.is_match(name));
        assert!(!set.is_match("aXb?[c]{d}"));
    }

    #[test]
    fn anchored_and_floating_patterns() {
        let set = globset(&["/tmp/**", "*.lock", "*.sqlite.generation-lock.sqlite*"]);
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
}
