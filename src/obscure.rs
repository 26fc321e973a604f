//! rclone's password obscuring and the `MASTER_KEY` derivation of the earlier
//! shell entrypoint (docs/facts.md §2 and §6), done in Rust so a password can be
//! checked before anything starts and derived without spawning rclone.

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hkdf::Hkdf;
use sha2::Sha256;

/// rclone's fixed, public obscuring key (fs/config/obscure/obscure.go).
/// Obscuring hides a password from a glance, it is not encryption.
const OBSCURE_KEY: [u8; 32] = [
    0x9c, 0x93, 0x5b, 0x48, 0x73, 0x0a, 0x55, 0x4d, 0x6b, 0xfd, 0x7c, 0x63, 0xc8, 0x86, 0xa9, 0x2b,
    0xd3, 0x90, 0x19, 0x8e, 0xb8, 0x12, 0x8a, 0xfb, 0xf4, 0xde, 0x16, 0x2b, 0x8b, 0x95, 0xf6, 0x38,
];
const IV_LEN: usize = 16;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// Why a value is not an rclone-obscured password. Messages never contain the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevealError {
    #[error("is not URL-safe base64 without padding, so it was not produced by `rclone obscure`")]
    NotBase64,
    #[error("is too short to be an rclone-obscured password")]
    TooShort,
    #[error("does not reveal to text, so it was not produced by `rclone obscure`")]
    NotText,
    #[error("reveals to an empty password")]
    Empty,
}

fn apply_keystream(iv: &[u8], data: &mut [u8]) {
    let mut cipher = Aes256Ctr::new(&OBSCURE_KEY.into(), iv.into());
    cipher.apply_keystream(data);
}

/// Obscures `plain` as `rclone obscure` does, with a fresh random IV.
pub fn obscure(plain: &str) -> String {
    let mut buf = vec![0u8; IV_LEN + plain.len()];
    getrandom::getrandom(&mut buf[..IV_LEN]).expect("the kernel's random source is unavailable");
    buf[IV_LEN..].copy_from_slice(plain.as_bytes());
    let (iv, data) = buf.split_at_mut(IV_LEN);
    apply_keystream(iv, data);
    URL_SAFE_NO_PAD.encode(&buf)
}

/// Reveals an obscured password. Stricter than rclone (which accepts any
/// bytes): an empty or non-UTF-8 result means the input was a plaintext
/// password that happened to be valid base64, the mistake this check exists for.
pub fn reveal(obscured: &str) -> Result<String, RevealError> {
    let mut buf = URL_SAFE_NO_PAD
        .decode(obscured.trim())
        .map_err(|_| RevealError::NotBase64)?;
    if buf.len() < IV_LEN {
        return Err(RevealError::TooShort);
    }
    let (iv, data) = buf.split_at_mut(IV_LEN);
    apply_keystream(iv, data);
    let plain = String::from_utf8(data.to_vec()).map_err(|_| RevealError::NotText)?;
    if plain.is_empty() {
        return Err(RevealError::Empty);
    }
    Ok(plain)
}

/// HKDF info strings of the shell entrypoint; changing them makes its buckets unreadable.
pub const INFO_PASSWORD: &str = "rclone-crypt-password";
pub const INFO_SALT: &str = "rclone-crypt-salt";

/// Derives a crypt password from `MASTER_KEY` exactly as the shell entrypoint
/// did: HKDF-SHA256 over the key's UTF-8 bytes as given, empty salt, 32 bytes,
/// standard padded base64. The base64 text (not the raw bytes) is the password.
pub fn derive_from_master_key(master_key: &str, info: &str) -> String {
    let hk = Hkdf::<Sha256>::new(Some(&[]), master_key.as_bytes());
    let mut okm = [0u8; 32];
    hk.expand(info.as_bytes(), &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    STANDARD.encode(okm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reveals_what_stock_rclone_obscured() {
        // `rclone obscure potato` with rclone 1.75.2.
        assert_eq!(reveal("ubtafWYbU0c8NpC9CUBaxEr8xvy76Q").unwrap(), "potato");
    }

    #[test]
    fn obscure_round_trips_with_a_fresh_iv() {
        let a = obscure("correct horse");
        let b = obscure("correct horse");
        assert_ne!(a, b, "each obscure call must use a new IV");
        assert_eq!(reveal(&a).unwrap(), "correct horse");
        assert_eq!(reveal(&b).unwrap(), "correct horse");
    }

    #[test]
    fn rejects_plaintext_passwords() {
        assert_eq!(reveal("not base64!"), Err(RevealError::NotBase64));
        assert_eq!(reveal("c2hvcnQ"), Err(RevealError::TooShort));
        assert_eq!(reveal(""), Err(RevealError::TooShort));
        // Exactly an IV and nothing else.
        assert_eq!(
            reveal(&URL_SAFE_NO_PAD.encode([7u8; 16])),
            Err(RevealError::Empty)
        );
    }

    #[test]
    fn master_key_vectors_from_facts() {
        let cases = [
            (
                "correct horse battery staple",
                INFO_PASSWORD,
                "fWxyhzuLSQizHmoLLNCIFuPKNGAgWm3D5LziNPZ2UdM=",
            ),
            (
                "correct horse battery staple",
                INFO_SALT,
                "H4BgUUYEIHkdwOCdLFt/MPbFWIl/8cxJmZmD5D/fVwU=",
            ),
            (
                "dGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGVzLWxvbmctISE=",
                INFO_PASSWORD,
                "iTpeJh0lfNsWISP0sVhPgzJPXPS2cZq2Dy0iYTiSUOY=",
            ),
            (
                "dGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGVzLWxvbmctISE=",
                INFO_SALT,
                "HxMjEeTm7bd5l0WiQyO4JpISOgBiAmZDv26t0IlrAXg=",
            ),
        ];
        for (key, info, want) in cases {
            assert_eq!(derive_from_master_key(key, info), want, "{key:?} / {info}");
        }
    }
}
