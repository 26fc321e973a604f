//! A segment: the pages a run of commits changed, as one object. The
//! plaintext (before the crypt remote encrypts it) is one zstd frame with
//! its content checksum, then the plaintext's length and a magic: crypt
//! authenticates each of its blocks, not a truncation at a block boundary,
//! and a segment cut short must never be applied. The frame's checksum
//! (XXH64, checked by zstd as it decodes) catches damage crypt cannot see,
//! as a bug of ours would cause. Segments before stop 17 (`CVMSEG1`) end
//! with the length and a SHA-256 of the plaintext instead, and are still
//! read: hashing took half of a restore's decoding (73 of 150 ms for 110
//! MB of spans here), the frame's checksum a tenth of that.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"CVMSEG2\n";
/// After the frame: the plaintext's length (a u64), then [`MAGIC`].
const LEN_BYTES: usize = 8;
const MAGIC_V1: &[u8; 8] = b"CVMSEG1\n";
/// A `CVMSEG1` segment's trailer: the plaintext's length, then its SHA-256.
const TRAILER_LEN_V1: usize = 8 + 32;
/// A zstd frame header's descriptor bit saying the frame ends with a
/// checksum of its content (RFC 8878, 3.1.1.1.1).
const FRAME_CHECKSUM: u8 = 0x04;
/// The most bytes of consecutive pages [`Segment::apply`] writes at once.
const RUN_BYTES: usize = 1 << 20;
/// zstd's default level: fast, and page images compress well.
pub const LEVEL: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub page_size: u32,
    /// The database's size in pages after these commits.
    pub db_pages: u32,
    pub pages: BTreeMap<u32, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("not a cvm-init segment, or cut short")]
    Format,
    #[error("content does not match its checksum")]
    Checksum,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Segment {
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let plain = self.plain(MAGIC);
        let mut z = zstd::stream::Encoder::new(Vec::new(), LEVEL)?;
        z.include_checksum(true)?;
        z.write_all(&plain)?;
        let mut out = z.finish()?;
        out.write_all(&(plain.len() as u64).to_be_bytes())?;
        out.write_all(MAGIC)?;
        Ok(out)
    }

    /// The plaintext: `magic`, the sizes, then each page after its number.
    fn plain(&self, magic: &[u8; 8]) -> Vec<u8> {
        let mut plain = Vec::with_capacity(20 + self.pages.len() * (4 + self.page_size as usize));
        plain.extend_from_slice(magic);
        for n in [self.page_size, self.db_pages, self.pages.len() as u32] {
            plain.extend_from_slice(&n.to_be_bytes());
        }
        for (pgno, page) in &self.pages {
            plain.extend_from_slice(&pgno.to_be_bytes());
            plain.extend_from_slice(page);
        }
        plain
    }

    pub fn decode(bytes: &[u8]) -> Result<Segment, SegmentError> {
        let (plain, magic) = match bytes.strip_suffix(MAGIC) {
            Some(rest) => (Self::unframe(rest, LEN_BYTES, true)?, MAGIC),
            None => (Self::unframe_v1(bytes)?, MAGIC_V1),
        };
        Self::parse(&plain, magic)
    }

    /// The plaintext of a frame followed by its length (`trailer` bytes
    /// counted from the length on), with the frame's checksum when
    /// `checksummed` says it must have one.
    fn unframe(bytes: &[u8], trailer: usize, checksummed: bool) -> Result<Vec<u8>, SegmentError> {
        if bytes.len() < trailer {
            return Err(SegmentError::Format);
        }
        let (body, rest) = bytes.split_at(bytes.len() - trailer);
        if checksummed && body.get(4).is_none_or(|fhd| fhd & FRAME_CHECKSUM == 0) {
            return Err(SegmentError::Format);
        }
        let len = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
        // Sized from the trailer, not grown while decoding: a restore
        // decodes a database's worth of them. Bounded, as the trailer is not
        // checked yet.
        let mut plain = Vec::with_capacity(
            usize::try_from(len)
                .unwrap_or(usize::MAX)
                .min(body.len().saturating_mul(4) + (1 << 16)),
        );
        // A checksum that does not match is an error here too.
        zstd::stream::copy_decode(body, &mut plain).map_err(|_| SegmentError::Format)?;
        if plain.len() as u64 != len {
            return Err(SegmentError::Format);
        }
        Ok(plain)
    }

    fn unframe_v1(bytes: &[u8]) -> Result<Vec<u8>, SegmentError> {
        let plain = Self::unframe(bytes, TRAILER_LEN_V1, false)?;
        if Sha256::digest(&plain).as_slice() != &bytes[bytes.len() - 32..] {
            return Err(SegmentError::Checksum);
        }
        Ok(plain)
    }

    fn parse(plain: &[u8], magic: &[u8; 8]) -> Result<Segment, SegmentError> {
        let rest = plain.strip_prefix(magic).ok_or(SegmentError::Format)?;
        let word = |b: &[u8], i: usize| -> Result<u32, SegmentError> {
            let w = b.get(i * 4..i * 4 + 4).ok_or(SegmentError::Format)?;
            Ok(u32::from_be_bytes(w.try_into().expect("4 bytes")))
        };
        let (page_size, db_pages, n) = (word(rest, 0)?, word(rest, 1)?, word(rest, 2)?);
        let mut body = &rest[12..];
        let mut pages = BTreeMap::new();
        for _ in 0..n {
            if body.len() < 4 + page_size as usize {
                return Err(SegmentError::Format);
            }
            let pgno = word(body, 0)?;
            pages.insert(pgno, body[4..4 + page_size as usize].to_vec());
            body = &body[4 + page_size as usize..];
        }
        if !body.is_empty() {
            return Err(SegmentError::Format);
        }
        Ok(Segment {
            page_size,
            db_pages,
            pages,
        })
    }

    /// Bytes of page images held.
    pub fn bytes(&self) -> usize {
        self.pages.len() * self.page_size as usize
    }

    /// This segment followed by `later`: the newest image of each page.
    pub fn then(mut self, later: Segment) -> Segment {
        // Pages `later` cut off are gone, as applying both in turn leaves them.
        self.pages.retain(|&p, _| p <= later.db_pages);
        self.pages.extend(later.pages);
        self.db_pages = later.db_pages;
        self
    }

    /// `a` then `b`, either possibly absent.
    pub fn join(a: Option<Segment>, b: Option<Segment>) -> Option<Segment> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.then(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes the pages into the database file `db` and sets its size. It
    /// does not sync: a restore applies many segments and syncs once.
    pub fn apply(&self, db: &Path) -> io::Result<()> {
        let f = fs::OpenOptions::new().write(true).open(db)?;
        let size = u64::from(self.page_size);
        // Pages that follow each other go in one write: a history's pages
        // are mostly runs (a growing table), and a write per page costs a
        // restore more than copying them together.
        let mut run: Vec<u8> = Vec::with_capacity(RUN_BYTES);
        let mut run_start = 0;
        let mut next = 0;
        for (&pgno, page) in &self.pages {
            if pgno != next || run.len() + page.len() > RUN_BYTES {
                if !run.is_empty() {
                    f.write_all_at(&run, u64::from(run_start - 1) * size)?;
                }
                run.clear();
                run_start = pgno;
            }
            run.extend_from_slice(page);
            next = pgno + 1;
        }
        if !run.is_empty() {
            f.write_all_at(&run, u64::from(run_start - 1) * size)?;
        }
        f.set_len(u64::from(self.db_pages) * size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg() -> Segment {
        Segment {
            page_size: 512,
            db_pages: 3,
            pages: [(1, vec![1u8; 512]), (3, vec![3u8; 512])].into(),
        }
    }

    #[test]
    fn round_trips_and_refuses_a_cut_or_altered_object() {
        let bytes = seg().encode().unwrap();
        assert_eq!(Segment::decode(&bytes).unwrap(), seg());
        for cut in [1, 8, 16, 17, bytes.len() - 1] {
            assert!(
                Segment::decode(&bytes[..bytes.len() - cut]).is_err(),
                "cut {cut}"
            );
        }
        assert!(Segment::decode(&bytes[1..]).is_err());
        // A bit of the frame's header that does not change its content
        // (its window size) may go unseen; nothing else may.
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            if let Ok(got) = Segment::decode(&bad) {
                assert_eq!(got, seg(), "byte {at} altered");
            }
        }
    }

    #[test]
    fn a_frame_without_its_checksum_is_refused() {
        let plain = seg().plain(MAGIC);
        let mut bytes = zstd::encode_all(plain.as_slice(), LEVEL).unwrap();
        bytes.extend_from_slice(&(plain.len() as u64).to_be_bytes());
        bytes.extend_from_slice(MAGIC);
        assert!(matches!(Segment::decode(&bytes), Err(SegmentError::Format)));
    }

    /// A segment as cvm-init wrote them before stop 17.
    fn encode_v1(s: &Segment) -> Vec<u8> {
        let plain = s.plain(MAGIC_V1);
        let mut out = zstd::encode_all(plain.as_slice(), LEVEL).unwrap();
        out.extend_from_slice(&(plain.len() as u64).to_be_bytes());
        out.extend_from_slice(&Sha256::digest(&plain));
        out
    }

    #[test]
    fn reads_the_segments_an_older_cvm_init_wrote() {
        let bytes = encode_v1(&seg());
        assert_eq!(Segment::decode(&bytes).unwrap(), seg());
        assert!(Segment::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(Segment::decode(&bad), Err(SegmentError::Checksum)));
    }

    #[test]
    fn applying_writes_runs_longer_than_one_write_and_across_gaps() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("db");
        fs::write(&db, vec![0u8; 512 * 4]).unwrap();
        // Pages 2..=3001 (a run longer than one write) and 3003 after a gap.
        let mut pages: BTreeMap<u32, Vec<u8>> = (2..=3001)
            .map(|p| (p, vec![(p % 251) as u8; 512]))
            .collect();
        pages.insert(3003, vec![7u8; 512]);
        let s = Segment {
            page_size: 512,
            db_pages: 3003,
            pages,
        };
        s.apply(&db).unwrap();
        let got = fs::read(&db).unwrap();
        assert_eq!(got.len(), 512 * 3003);
        for p in 1..=3003u32 {
            let want = match p {
                1 | 3002 => 0,
                3003 => 7,
                p => (p % 251) as u8,
            };
            let at = (p as usize - 1) * 512;
            assert!(got[at..at + 512].iter().all(|&b| b == want), "page {p}");
        }
    }

    #[test]
    fn applying_writes_pages_and_sets_the_size() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("db");
        fs::write(&db, vec![9u8; 512 * 5]).unwrap();
        seg().apply(&db).unwrap();
        let got = fs::read(&db).unwrap();
        assert_eq!(got.len(), 512 * 3);
        assert!(got[..512].iter().all(|&b| b == 1));
        assert!(got[512..1024].iter().all(|&b| b == 9));
        assert!(got[1024..].iter().all(|&b| b == 3));
    }
}
