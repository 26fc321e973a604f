//! rclone's VFS cache on `CVM_LOCAL_DIR`, mended before a mount starts.
//!
//! rclone keeps each cached file as its data (`vfs/<remote>/<path>`) and a
//! JSON record (`vfsMeta/<remote>/<path>`) saying which bytes are present and
//! whether they still wait for upload. It rewrites the record in place
//! (truncate, then write) on every close, even a reader's, and a rename moves
//! the data before the record. A crash at either moment leaves a data file
//! whose record is empty, cut short or gone, and rclone's next start deletes
//! that data ("failed to load metadata", "metadata doesn't exist"), writes
//! that never reached S3 included (docs/facts.md §2). So before rclone starts,
//! each such data file gets a record again, or is moved out of rclone's way.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::json;

/// What becomes of a data file whose record a crash broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mend {
    /// Every byte is there: a fresh record marks it for upload. If it was in
    /// fact a clean copy, the same bytes are uploaded once more.
    Upload,
    /// Some bytes were never fetched (a sparse, partial copy of the bucket's
    /// object, or a change to one): uploading it could write zeros over the
    /// bucket's bytes, so it is moved to `CVM_LOCAL_DIR/rescued` and the
    /// mount serves the bucket's version.
    Rescue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    Readable,
    Unreadable,
    Missing,
}

/// The decision, apart from the file system: only a broken record needs
/// mending, and only a complete data file may be uploaded from.
fn decide(record: Record, complete: bool) -> Option<Mend> {
    match (record, complete) {
        (Record::Readable, _) => None,
        (Record::Unreadable | Record::Missing, true) => Some(Mend::Upload),
        (Record::Unreadable | Record::Missing, false) => Some(Mend::Rescue),
    }
}

/// One data file mended: its path in the state dir, and where it went if
/// it was rescued ([`Mend::Rescue`]) rather than marked for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mended {
    pub path: PathBuf,
    pub rescued: Option<PathBuf>,
}

/// Gives every data file in `cache_dir` whose record is missing or unreadable
/// a record again, or moves it to `rescue_dir`. Run only while no rclone uses
/// the cache. On error, returns the path that failed; nothing is deleted.
pub fn mend(cache_dir: &Path, rescue_dir: &Path) -> Result<Vec<Mended>, (PathBuf, io::Error)> {
    let data_root = cache_dir.join("vfs");
    let meta_root = cache_dir.join("vfsMeta");
    let mut mended = Vec::new();
    let mut dirs = vec![data_root.clone()];
    while let Some(dir) = dirs.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err((dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| (dir.clone(), e))?;
            let data = entry.path();
            let kind = entry.file_type().map_err(|e| (data.clone(), e))?;
            if kind.is_dir() {
                dirs.push(data);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let rel = data
                .strip_prefix(&data_root)
                .expect("walked below the root");
            let meta = meta_root.join(rel);
            let Some(mend) = decide(record(&meta), complete(&data)?) else {
                continue;
            };
            // `rel` starts with the remote's own directory (`s3-crypt`).
            let path: PathBuf = rel.components().skip(1).collect();
            let rescued = match mend {
                Mend::Upload => {
                    write_record(&data, &meta)?;
                    None
                }
                Mend::Rescue => Some(rescue(&data, &meta, &rescue_dir.join(&path))?),
            };
            mended.push(Mended { path, rescued });
        }
    }
    Ok(mended)
}

fn record(meta: &Path) -> Record {
    match fs::read(meta) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Record::Missing,
        Err(_) => Record::Unreadable,
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) if v.is_object() => Record::Readable,
            _ => Record::Unreadable,
        },
    }
}

/// No hole before the end: every byte was written or fetched. rclone's cache
/// files are sparse, so a hole is a range it never had.
fn complete(data: &Path) -> Result<bool, (PathBuf, io::Error)> {
    let at = |e| (data.to_owned(), e);
    let file = fs::File::open(data).map_err(at)?;
    let len = file.metadata().map_err(at)?.len();
    if len == 0 {
        return Ok(true);
    }
    let hole = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(0))
        .map_err(|e| at(io::Error::from(e)))?;
    Ok(hole >= len)
}

/// rclone's record (its `vfscache.Info`): all bytes present, dirty, no
/// fingerprint of a remote object, so its next start queues the upload.
fn write_record(data: &Path, meta: &Path) -> Result<(), (PathBuf, io::Error)> {
    fn at(p: &Path) -> impl FnOnce(io::Error) -> (PathBuf, io::Error) + '_ {
        move |e| (p.to_owned(), e)
    }
    let stat = fs::metadata(data).map_err(at(data))?;
    let len = stat.len();
    let modified = stat.modified().map_err(at(data))?;
    let ranges = if len == 0 {
        json!([])
    } else {
        json!([{ "Pos": 0, "Size": len }])
    };
    let info = json!({
        "ModTime": humantime::format_rfc3339_nanos(modified).to_string(),
        "ATime": humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
        "Size": len,
        "Rs": ranges,
        "Fingerprint": "",
        "Dirty": true,
    });
    let parent = meta.parent().expect("a record has a directory");
    fs::create_dir_all(parent).map_err(at(parent))?;
    // A crash here must not leave a half record either: write aside, rename.
    // An orphaned `.cvm-tmp` has no data file, and rclone removes it.
    let mut tmp = meta.as_os_str().to_owned();
    tmp.push(".cvm-tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, info.to_string()).map_err(at(&tmp))?;
    fs::rename(&tmp, meta).map_err(at(meta))
}

/// Moves the data to `to` (or `to.1`, `to.2`… if taken) and drops the
/// broken record, which rclone would drop anyway.
fn rescue(data: &Path, meta: &Path, to: &Path) -> Result<PathBuf, (PathBuf, io::Error)> {
    let parent = to.parent().expect("a rescued file has a directory");
    fs::create_dir_all(parent).map_err(|e| (parent.to_owned(), e))?;
    let mut target = to.to_owned();
    let mut n = 0;
    while target.symlink_metadata().is_ok() {
        n += 1;
        let mut name = to.as_os_str().to_owned();
        name.push(format!(".{n}"));
        target = PathBuf::from(name);
    }
    fs::rename(data, &target).map_err(|e| (data.to_owned(), e))?;
    match fs::remove_file(meta) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err((meta.to_owned(), e)),
        _ => Ok(target),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn only_a_broken_record_is_mended_and_only_a_complete_file_uploaded() {
        let table = [
            (Record::Readable, true, None),
            (Record::Readable, false, None),
            (Record::Unreadable, true, Some(Mend::Upload)),
            (Record::Missing, true, Some(Mend::Upload)),
            (Record::Unreadable, false, Some(Mend::Rescue)),
            (Record::Missing, false, Some(Mend::Rescue)),
        ];
        for (record, complete, want) in table {
            assert_eq!(
                decide(record, complete),
                want,
                "{record:?} complete={complete}"
            );
        }
    }

    /// A cache as a crash leaves it: `data` maps a state-dir path to its data
    /// (with a hole when `sparse`), `records` to what its record holds.
    fn cache(root: &Path, files: &[(&str, &[u8], bool, Option<&str>)]) {
        for (path, bytes, sparse, record) in files {
            let data = root.join("vfs/s3-crypt").join(path);
            fs::create_dir_all(data.parent().unwrap()).unwrap();
            let mut f = fs::File::create(&data).unwrap();
            if *sparse {
                f.seek(SeekFrom::Start(1 << 20)).unwrap();
            }
            f.write_all(bytes).unwrap();
            if let Some(record) = record {
                let meta = root.join("vfsMeta/s3-crypt").join(path);
                fs::create_dir_all(meta.parent().unwrap()).unwrap();
                fs::write(meta, record).unwrap();
            }
        }
    }

    #[test]
    fn broken_records_are_rewritten_dirty_and_partial_copies_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, rescue_dir) = (tmp.path().join("cache"), tmp.path().join("rescued"));
        let good = r#"{"Size":2,"Rs":[{"Pos":0,"Size":2}],"Fingerprint":"x","Dirty":false}"#;
        cache(
            &root,
            &[
                ("ok.txt", b"ok", false, Some(good)),
                ("notes/cut.md", b"cut short", false, Some("{\n\t\"ModTi")),
                ("notes/empty-record.md", b"emptied", false, Some("")),
                ("renamed.json", b"{}", false, None),
                ("empty", b"", false, Some("")),
                ("big/partial.bin", b"tail", true, Some("")),
            ],
        );
        // One partial copy rescued before: the second gets a new name.
        fs::create_dir_all(rescue_dir.join("big")).unwrap();
        fs::write(rescue_dir.join("big/partial.bin"), b"earlier").unwrap();

        let mut got = mend(&root, &rescue_dir).unwrap();
        got.sort_by(|a, b| a.path.cmp(&b.path));
        let rescued: Vec<_> = got
            .iter()
            .map(|m| (m.path.to_str().unwrap(), m.rescued.is_some()))
            .collect();
        assert_eq!(
            rescued,
            [
                ("big/partial.bin", true),
                ("empty", false),
                ("notes/cut.md", false),
                ("notes/empty-record.md", false),
                ("renamed.json", false),
            ]
        );

        let meta = |p: &str| root.join("vfsMeta/s3-crypt").join(p);
        let info: serde_json::Value =
            serde_json::from_slice(&fs::read(meta("notes/cut.md")).unwrap()).unwrap();
        assert_eq!(info["Dirty"], true);
        assert_eq!(info["Size"], 9);
        assert_eq!(info["Rs"], json!([{ "Pos": 0, "Size": 9 }]));
        assert_eq!(info["Fingerprint"], "");
        humantime::parse_rfc3339(info["ModTime"].as_str().unwrap()).unwrap();
        let empty: serde_json::Value =
            serde_json::from_slice(&fs::read(meta("empty")).unwrap()).unwrap();
        assert_eq!(empty["Rs"], json!([]));
        assert_eq!(fs::read_to_string(meta("ok.txt")).unwrap(), good);

        assert_eq!(
            got[0].rescued.as_deref(),
            Some(rescue_dir.join("big/partial.bin.1").as_path())
        );
        assert!(!root.join("vfs/s3-crypt/big/partial.bin").exists());
        assert!(!meta("big/partial.bin").exists());
        assert_eq!(
            fs::read(rescue_dir.join("big/partial.bin")).unwrap(),
            b"earlier"
        );

        // Mended once, the cache needs nothing more.
        assert_eq!(mend(&root, &rescue_dir).unwrap(), []);
    }

    #[test]
    fn a_cache_never_used_has_nothing_to_mend() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(mend(tmp.path(), &tmp.path().join("rescued")).unwrap(), []);
    }
}
