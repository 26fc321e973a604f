//! Reading committed frames out of a SQLite write-ahead log (the file
//! format of sqlite.org/fileformat2.html §4), from a remembered position
//! onwards. Pure: it sees bytes, never the file.
//!
//! A frame counts only with the header's salts and an unbroken checksum
//! chain, and only up to the last commit frame, exactly what SQLite's own
//! recovery would accept: a frame being written, a torn tail and the stale
//! frames of an earlier WAL incarnation are never taken.

use std::collections::BTreeMap;

pub const HEADER_LEN: usize = 32;
pub const FRAME_HEADER_LEN: usize = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;

/// The WAL header's fields a reader needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub page_size: u32,
    pub salt: (u32, u32),
    big_endian_cksum: bool,
    cksum: (u32, u32),
}

/// Where the last read stopped: after commit frame `frame` of the WAL
/// incarnation with `salt`, whose cumulative checksum was `cksum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub salt: (u32, u32),
    pub frame: u32,
    cksum: (u32, u32),
}

/// The commits read: the newest image of every page they changed, and the
/// database's size in pages after the last one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Commits {
    pub pages: BTreeMap<u32, Vec<u8>>,
    pub db_pages: u32,
    pub frames: u32,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

/// SQLite's WAL checksum: pairs of 32-bit words in the byte order the
/// magic names, folded into a running pair.
fn checksum(big_endian: bool, data: &[u8], seed: (u32, u32)) -> (u32, u32) {
    let (mut s1, mut s2) = seed;
    for pair in data.chunks_exact(8) {
        let word = |b: &[u8]| {
            let b: [u8; 4] = b.try_into().expect("4 bytes");
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s1 = s1.wrapping_add(word(&pair[..4])).wrapping_add(s2);
        s2 = s2.wrapping_add(word(&pair[4..])).wrapping_add(s1);
    }
    (s1, s2)
}

/// Parses a WAL header; `None` for a file too short or not (yet) a valid WAL.
pub fn header(b: &[u8]) -> Option<Header> {
    if b.len() < HEADER_LEN {
        return None;
    }
    let magic = be32(b);
    if magic != MAGIC_LE && magic != MAGIC_BE {
        return None;
    }
    let big_endian_cksum = magic == MAGIC_BE;
    let cksum = (be32(&b[24..]), be32(&b[28..]));
    if checksum(big_endian_cksum, &b[..24], (0, 0)) != cksum {
        return None;
    }
    let page_size = match be32(&b[8..]) {
        1 => 65536,
        n => n,
    };
    Some(Header {
        page_size,
        salt: (be32(&b[16..]), be32(&b[20..])),
        big_endian_cksum,
        cksum,
    })
}

impl Header {
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.page_size as usize
    }

    /// The frame to read next and the checksum seeding it: after `pos` in
    /// the same incarnation, else from the first frame (the WAL was restarted).
    pub fn resume(&self, pos: Option<Pos>) -> (u32, (u32, u32)) {
        match pos {
            Some(p) if p.salt == self.salt => (p.frame, p.cksum),
            _ => (0, self.cksum),
        }
    }

    /// Reads the commits in `frames`, the WAL's bytes from frame `done`
    /// (0-based: frames already read) onwards, seeded with `seed` as
    /// [`Header::resume`] gave them. Returns the commits and the position
    /// after the last one (`None` when no whole commit was found).
    pub fn commits(&self, frames: &[u8], done: u32, seed: (u32, u32)) -> (Commits, Option<Pos>) {
        let mut pending: Vec<(u32, &[u8])> = Vec::new();
        let mut out = Commits::default();
        let mut pos = None;
        let mut sum = seed;
        let mut n = done;
        for frame in frames.chunks_exact(self.frame_len()) {
            let (head, page) = frame.split_at(FRAME_HEADER_LEN);
            if (be32(&head[8..]), be32(&head[12..])) != self.salt {
                break;
            }
            sum = checksum(self.big_endian_cksum, &head[..8], sum);
            sum = checksum(self.big_endian_cksum, page, sum);
            if sum != (be32(&head[16..]), be32(&head[20..])) {
                break;
            }
            n += 1;
            pending.push((be32(head), page));
            let commit = be32(&head[4..]);
            if commit != 0 {
                for (pgno, page) in pending.drain(..) {
                    out.pages.insert(pgno, page.to_vec());
                }
                out.db_pages = commit;
                out.frames = n - done;
                pos = Some(Pos {
                    salt: self.salt,
                    frame: n,
                    cksum: sum,
                });
            }
        }
        // Pages past the end of the database after the last commit are free.
        let db_pages = out.db_pages;
        out.pages.retain(|&pgno, _| pgno <= db_pages);
        (out, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::path::Path;

    fn wal_of(db: &Path) -> Vec<u8> {
        std::fs::read(crate::sqlite::sidecar(db, "-wal")).unwrap()
    }

    fn writer(db: &Path) -> Connection {
        let c = Connection::open(db).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        c
    }

    fn read_all(wal: &[u8], pos: Option<Pos>) -> (Commits, Option<Pos>) {
        let h = header(wal).unwrap();
        let (done, seed) = h.resume(pos);
        let start = HEADER_LEN + done as usize * h.frame_len();
        h.commits(&wal[start.min(wal.len())..], done, seed)
    }

    #[test]
    fn reads_every_commit_and_resumes_where_it_stopped() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("a.sqlite");
        let c = writer(&db);
        c.execute("INSERT INTO t(v) VALUES (zeroblob(100))", [])
            .unwrap();
        let (first, pos) = read_all(&wal_of(&db), None);
        assert!(first.frames >= 2, "schema and row: {first:?}");
        assert_eq!(first.db_pages, 2);
        for _ in 0..10 {
            c.execute("INSERT INTO t(v) VALUES (zeroblob(3000))", [])
                .unwrap();
        }
        let (more, pos2) = read_all(&wal_of(&db), pos);
        assert!(more.frames >= 10);
        assert!(pos2.unwrap().frame > pos.unwrap().frame);
        let (none, same) = read_all(&wal_of(&db), pos2);
        assert_eq!((none.frames, same), (0, None), "nothing new");
    }

    #[test]
    fn a_torn_or_uncommitted_tail_is_not_taken() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("a.sqlite");
        let c = writer(&db);
        c.execute("INSERT INTO t(v) VALUES (zeroblob(100))", [])
            .unwrap();
        let wal = wal_of(&db);
        let (whole, pos) = read_all(&wal, None);
        // Cut into the last frame: the commit it carried is not there.
        let (torn, torn_pos) = read_all(&wal[..wal.len() - 10], None);
        assert!(torn.frames < whole.frames);
        assert_ne!(torn_pos, pos);
        // A flipped bit breaks the checksum chain from that frame on.
        let mut bad = wal.clone();
        let last = bad.len() - 5;
        bad[last] ^= 1;
        assert_ne!(read_all(&bad, None).1, pos);
        // Frames after the last commit frame (an open transaction) wait.
        let h = header(&wal).unwrap();
        let mut open = wal.clone();
        let at = open.len() - h.frame_len() + 4;
        open[at..at + 4].copy_from_slice(&0u32.to_be_bytes());
        assert_ne!(read_all(&open, None).1, pos);
    }

    #[test]
    fn a_restarted_wal_is_read_from_its_first_frame() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("a.sqlite");
        let c = writer(&db);
        for _ in 0..5 {
            c.execute("INSERT INTO t(v) VALUES (zeroblob(3000))", [])
                .unwrap();
        }
        let (_, pos) = read_all(&wal_of(&db), None);
        c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        // The next write restarts the WAL: new salts, frames from offset 32.
        c.execute("INSERT INTO t(v) VALUES (x'0102')", []).unwrap();
        let wal = wal_of(&db);
        assert_ne!(header(&wal).unwrap().salt, pos.unwrap().salt);
        let (after, _) = read_all(&wal, pos);
        assert!(after.frames >= 1 && after.frames < 5, "{}", after.frames);
    }

    #[test]
    fn both_checksum_byte_orders_verify() {
        for magic in [MAGIC_LE, MAGIC_BE] {
            let mut h = vec![0u8; HEADER_LEN];
            h[..4].copy_from_slice(&magic.to_be_bytes());
            h[8..12].copy_from_slice(&4096u32.to_be_bytes());
            let sum = checksum(magic == MAGIC_BE, &h[..24], (0, 0));
            h[24..28].copy_from_slice(&sum.0.to_be_bytes());
            h[28..32].copy_from_slice(&sum.1.to_be_bytes());
            assert_eq!(header(&h).unwrap().page_size, 4096);
            h[9] ^= 1;
            assert!(header(&h).is_none());
        }
    }
}
