//! Session keys and per-stream frame encryption (AES-256-GCM).
//!
//! One [`SessionKeys`] value per migration holds an HKDF-SHA256 pseudo-random
//! key. Each (direction, stream, epoch) gets its own AES-256 key expanded
//! from it under the label `ferry v1 data key` and the migration id; the
//! nonce is the frame's sequence number, which strictly increases per stream
//! and direction, so a nonce is never reused under a key. A new epoch (a
//! fresh key) starts every 2^[`REKEY_SHIFT`] frames, far below AES-GCM's
//! safe usage limit (TLS 1.3 rekeys after 2^24.5 full records).
//!
//! Each (direction, stream) also has a header key (label `ferry v2 header
//! key`) for header protection: see [`crate::wire`] and
//! [`StreamCrypto::header_mask`].

use ferry_control::handshake::KeyGrant;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use thiserror::Error;

use crate::wire::{MigrationId, Seq, StreamId, HEADER_LEN, MASK_LEN, TAG_LEN};

/// Frames per key: a stream rekeys when `seq >> REKEY_SHIFT` changes.
pub const REKEY_SHIFT: u32 = 24;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source to destination (pages, state, commit).
    ToDestination = 1,
    /// Destination to source (acks, ready, resumed).
    ToSource = 2,
}

/// Which AES-256-GCM implementation seals frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AeadBackend {
    /// ring (default; VAES + PCLMUL at run time).
    #[default]
    Ring,
    /// RustCrypto's `aes-gcm` (cargo feature `rustcrypto-aead`).
    RustCrypto,
}

impl std::str::FromStr for AeadBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ring" => Ok(AeadBackend::Ring),
            "rustcrypto" if cfg!(feature = "rustcrypto-aead") => Ok(AeadBackend::RustCrypto),
            "rustcrypto" => Err("this build lacks the RustCrypto AEAD: rebuild with --features rustcrypto-aead".into()),
            other => Err(format!("unknown AEAD backend {other:?}: use ring or rustcrypto")),
        }
    }
}

/// Errors of frame crypto.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The tag did not verify: the frame (header or payload) was changed, or
    /// was sealed under another key.
    #[error("authentication tag mismatch")]
    BadTag,
    /// The OS random generator failed.
    #[error("system random generator failed")]
    Random,
}

/// The keys of one migration: all the engine receives from the control plane.
#[derive(Clone)]
pub struct SessionKeys {
    migration: MigrationId,
    prk: hkdf::Prk,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("migration", &self.migration)
            .field("prk", &"<redacted>")
            .finish()
    }
}

struct KeyLen(usize);
impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        self.0
    }
}

impl SessionKeys {
    /// The keys of an admitted migration: the only constructor outside tests.
    /// A [`KeyGrant`] comes only from `ferry_control::handshake::Admitted`,
    /// which only a passed handshake produces (authentication and
    /// authorization tickets, replay check, both policies, admission).
    pub fn from_grant(grant: &KeyGrant) -> SessionKeys {
        Self::from_secret(MigrationId(grant.migration_id()), grant.secret())
    }

    /// **Tests and benchmarks only: no authentication, no authorization.**
    /// Keys from a fresh random secret, shared in-process by whoever clones
    /// the value. Exists only in the engine's own tests and with the
    /// `insecure-test-keys` feature; a real migration gets its keys from
    /// [`SessionKeys::from_grant`].
    #[cfg(any(test, feature = "insecure-test-keys"))]
    pub fn test_only_unauthenticated(migration: MigrationId) -> Result<SessionKeys, CryptoError> {
        let mut secret = [0u8; 32];
        use ring::rand::SecureRandom as _;
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| CryptoError::Random)?;
        Ok(Self::from_secret(migration, &secret))
    }

    /// Keys from a shared secret (the control plane's exporter output).
    fn from_secret(migration: MigrationId, secret: &[u8]) -> SessionKeys {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ferry v1 session");
        SessionKeys {
            migration,
            prk: salt.extract(secret),
        }
    }

    /// The migration these keys belong to.
    pub fn migration(&self) -> MigrationId {
        self.migration
    }

    /// The key that data connections MAC their preamble with.
    pub(crate) fn connection_key(&self) -> ring::hmac::Key {
        let mig_b = self.migration.0.to_be_bytes();
        let info: [&[u8]; 2] = [b"ferry v1 connection key", &mig_b];
        let mut k = [0u8; 32];
        self.prk
            .expand(&info, KeyLen(32))
            .and_then(|okm| okm.fill(&mut k))
            .expect("HKDF-SHA256 can always expand 32 bytes");
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)
    }

    /// The header-protection key of (`dir`, `stream`).
    fn header_key(&self, dir: Direction, stream: StreamId) -> LessSafeKey {
        let dir_b = [dir as u8];
        let stream_b = stream.0.to_be_bytes();
        let mig_b = self.migration.0.to_be_bytes();
        let info: [&[u8]; 4] = [b"ferry v2 header key", &dir_b, &stream_b, &mig_b];
        let mut k = [0u8; 32];
        self.prk
            .expand(&info, KeyLen(32))
            .and_then(|okm| okm.fill(&mut k))
            .expect("HKDF-SHA256 can always expand 32 bytes");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32 bytes is an AES-256 key"))
    }

    fn key_bytes(&self, dir: Direction, stream: StreamId, epoch: u64) -> [u8; 32] {
        let dir_b = [dir as u8];
        let stream_b = stream.0.to_be_bytes();
        let epoch_b = epoch.to_be_bytes();
        let mig_b = self.migration.0.to_be_bytes();
        let info: [&[u8]; 5] = [b"ferry v1 data key", &dir_b, &stream_b, &epoch_b, &mig_b];
        let mut out = [0u8; 32];
        self.prk
            .expand(&info, KeyLen(32))
            .and_then(|okm| okm.fill(&mut out))
            .expect("HKDF-SHA256 can always expand 32 bytes");
        out
    }
}

enum Aead {
    Ring(LessSafeKey),
    #[cfg(feature = "rustcrypto-aead")]
    RustCrypto(Box<aes_gcm::Aes256Gcm>),
}

impl Aead {
    fn new(backend: AeadBackend, key: &[u8; 32]) -> Aead {
        match backend {
            AeadBackend::Ring => Aead::Ring(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key).expect("32 bytes is an AES-256 key"),
            )),
            #[cfg(feature = "rustcrypto-aead")]
            AeadBackend::RustCrypto => {
                use aes_gcm::KeyInit;
                Aead::RustCrypto(Box::new(aes_gcm::Aes256Gcm::new(key.into())))
            }
            #[cfg(not(feature = "rustcrypto-aead"))]
            AeadBackend::RustCrypto => {
                panic!("AeadBackend::RustCrypto needs the rustcrypto-aead feature (FromStr refuses it)")
            }
        }
    }
}

fn nonce_bytes(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// Seals or opens the frames of one stream in one direction.
pub struct StreamCrypto {
    keys: SessionKeys,
    dir: Direction,
    stream: StreamId,
    backend: AeadBackend,
    epoch: u64,
    aead: Aead,
    /// Header protection (ring in every backend: a mask is 24 bytes).
    header: LessSafeKey,
    /// Next sequence the sealer may use (sealing side only).
    next_seal: u64,
}

impl std::fmt::Debug for StreamCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCrypto")
            .field("dir", &self.dir)
            .field("stream", &self.stream)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl StreamCrypto {
    /// The cipher for `stream` in direction `dir`.
    pub fn new(keys: &SessionKeys, dir: Direction, stream: StreamId, backend: AeadBackend) -> Self {
        let aead = Aead::new(backend, &keys.key_bytes(dir, stream, 0));
        StreamCrypto {
            keys: keys.clone(),
            dir,
            stream,
            backend,
            epoch: 0,
            aead,
            header: keys.header_key(dir, stream),
            next_seal: 0,
        }
    }

    /// The header-protection mask of the frame whose tag is `tag`: the
    /// AES-256-CTR keystream under this stream's header key with the tag's
    /// first 12 bytes as the nonce (ring's AES-GCM sealing 24 zero bytes;
    /// its own tag is dropped). A tag is a fresh pseudo-random value per
    /// frame, so two frames share a mask only if their tags share 96 bits.
    pub fn header_mask(&self, tag: &[u8; TAG_LEN]) -> [u8; MASK_LEN] {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&tag[..12]);
        let mut mask = [0u8; MASK_LEN];
        let _ = self
            .header
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut mask)
            .expect("AES-GCM seals 24 bytes");
        mask
    }

    /// Unmasks the protected fields of a received `header` whose frame
    /// ends with `tag` (then decode it, and open the frame with it as the
    /// associated data: a changed masked byte fails the tag).
    pub fn unmask(&self, header: &mut [u8; HEADER_LEN], tag: &[u8; TAG_LEN]) {
        crate::wire::apply_mask(header, &self.header_mask(tag));
    }

    fn key_for(&mut self, seq: u64) -> &Aead {
        let epoch = seq >> REKEY_SHIFT;
        if epoch != self.epoch {
            self.aead = Aead::new(self.backend, &self.keys.key_bytes(self.dir, self.stream, epoch));
            self.epoch = epoch;
        }
        &self.aead
    }

    /// Encrypts `in_out` in place with `aad` authenticated, under nonce `seq`;
    /// returns the tag. Outside this crate frames are sealed through a
    /// [`Sealer`], which picks `seq` itself.
    ///
    /// # Panics
    /// If `seq` is not greater than every sequence sealed before: a reused
    /// nonce would break AES-GCM, so this is a crash, not an error (a
    /// [`Sealer`] cannot reach it).
    pub(crate) fn seal(&mut self, seq: u64, aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        assert!(
            seq >= self.next_seal,
            "nonce reuse: sequence {seq} sealed twice on {:?}",
            self.stream
        );
        self.next_seal = seq + 1;
        let nonce = nonce_bytes(seq);
        match self.key_for(seq) {
            Aead::Ring(k) => {
                let tag = k
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
                    .expect("AES-GCM seal fails only past 2^36 bytes per frame");
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(tag.as_ref());
                t
            }
            #[cfg(feature = "rustcrypto-aead")]
            Aead::RustCrypto(k) => {
                use aes_gcm::AeadInPlace;
                let tag = k
                    .encrypt_in_place_detached(&nonce.into(), aad, in_out)
                    .expect("AES-GCM seal fails only past 2^36 bytes per frame");
                tag.into()
            }
        }
    }

    /// Decrypts `in_out` (ciphertext followed by the tag) in place; returns the
    /// plaintext part.
    pub fn open<'a>(&mut self, seq: u64, aad: &[u8], in_out: &'a mut [u8]) -> Result<&'a mut [u8], CryptoError> {
        if in_out.len() < TAG_LEN {
            return Err(CryptoError::BadTag);
        }
        let nonce = nonce_bytes(seq);
        match self.key_for(seq) {
            Aead::Ring(k) => k
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
                .map_err(|_| CryptoError::BadTag),
            #[cfg(feature = "rustcrypto-aead")]
            Aead::RustCrypto(k) => {
                use aes_gcm::AeadInPlace;
                let (data, tag) = in_out.split_at_mut(in_out.len() - TAG_LEN);
                let tag = aes_gcm::Tag::clone_from_slice(tag);
                k.decrypt_in_place_detached(&nonce.into(), aad, data, &tag)
                    .map_err(|_| CryptoError::BadTag)?;
                Ok(data)
            }
        }
    }
}

/// The sealing half of one stream in one direction. It owns the frame
/// sequence number — the AES-GCM nonce — so no caller passes a counter in
/// and no two frames can share a nonce.
///
/// A frame's header carries its sequence and is the AEAD's associated data,
/// so a frame is built as: read [`next_seq`](Self::next_seq), write the
/// header with it, then [`seal_next`](Self::seal_next), which uses that
/// sequence and moves on.
#[derive(Debug)]
pub struct Sealer {
    /// Its `next_seal` is the next sequence: one counter, kept by the
    /// cipher that refuses to go back.
    crypto: StreamCrypto,
}

impl Sealer {
    /// The sealer for `stream` in direction `dir`, from sequence 0.
    pub fn new(keys: &SessionKeys, dir: Direction, stream: StreamId, backend: AeadBackend) -> Sealer {
        Sealer {
            crypto: StreamCrypto::new(keys, dir, stream, backend),
        }
    }

    /// The sequence the next sealed frame gets; equally, how many frames
    /// this sealer has sealed.
    pub fn next_seq(&self) -> Seq {
        Seq(self.crypto.next_seal)
    }

    /// Seals the frame payload `in_out` in place under
    /// [`next_seq`](Self::next_seq) with its `header` authenticated, then
    /// masks the header's protected fields (every sealed frame is
    /// protected; see [`crate::wire`]); returns that sequence and the tag.
    pub fn seal_next(&mut self, header: &mut [u8; HEADER_LEN], in_out: &mut [u8]) -> (Seq, [u8; TAG_LEN]) {
        let seq = self.crypto.next_seal;
        let tag = self.crypto.seal(seq, header, in_out);
        crate::wire::apply_mask(header, &self.crypto.header_mask(&tag));
        (Seq(seq), tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SessionKeys {
        SessionKeys::from_secret(MigrationId(1), &[9u8; 32])
    }

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let k = keys();
        let mut s = StreamCrypto::new(&k, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut o = StreamCrypto::new(&k, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut buf = b"hello pages".to_vec();
        let tag = s.seal(5, b"hdr", &mut buf);
        buf.extend_from_slice(&tag);
        let mut good = buf.clone();
        assert_eq!(o.open(5, b"hdr", &mut good).unwrap(), b"hello pages");
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert_eq!(o.open(5, b"hdr", &mut bad), Err(CryptoError::BadTag));
        let mut bad_aad = buf.clone();
        assert_eq!(o.open(5, b"hdR", &mut bad_aad), Err(CryptoError::BadTag));
        let mut bad_seq = buf.clone();
        assert_eq!(o.open(6, b"hdr", &mut bad_seq), Err(CryptoError::BadTag));
    }

    #[test]
    fn keys_differ_by_stream_direction_migration_and_epoch() {
        let k = keys();
        let a = k.key_bytes(Direction::ToDestination, StreamId(0), 0);
        assert_ne!(a, k.key_bytes(Direction::ToSource, StreamId(0), 0));
        assert_ne!(a, k.key_bytes(Direction::ToDestination, StreamId(1), 0));
        assert_ne!(a, k.key_bytes(Direction::ToDestination, StreamId(0), 1));
        let other = SessionKeys::from_secret(MigrationId(2), &[9u8; 32]);
        assert_ne!(a, other.key_bytes(Direction::ToDestination, StreamId(0), 0));
    }

    #[test]
    fn rekeys_at_epoch_boundary() {
        let k = keys();
        let mut s = StreamCrypto::new(&k, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut o = StreamCrypto::new(&k, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let seq = 1u64 << REKEY_SHIFT;
        let mut buf = vec![1u8; 10];
        let tag = s.seal(seq, b"", &mut buf);
        assert_eq!(s.epoch, 1);
        buf.extend_from_slice(&tag);
        assert!(o.open(seq, b"", &mut buf).is_ok());
        // The epoch-1 key differs from the epoch-0 key for the same nonce.
        assert_ne!(
            k.key_bytes(Direction::ToDestination, StreamId(0), 0),
            k.key_bytes(Direction::ToDestination, StreamId(0), 1)
        );
    }

    #[test]
    #[should_panic(expected = "nonce reuse")]
    fn sealing_a_sequence_twice_crashes() {
        let k = keys();
        let mut s = StreamCrypto::new(&k, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        s.seal(3, b"", &mut [0u8; 4]);
        s.seal(3, b"", &mut [0u8; 4]);
    }

    #[cfg(feature = "rustcrypto-aead")]
    #[test]
    fn rustcrypto_interoperates_with_ring() {
        let k = keys();
        let mut s = StreamCrypto::new(&k, Direction::ToDestination, StreamId(0), AeadBackend::RustCrypto);
        let mut o = StreamCrypto::new(&k, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut buf = vec![5u8; 100];
        let tag = s.seal(0, b"a", &mut buf);
        buf.extend_from_slice(&tag);
        assert_eq!(o.open(0, b"a", &mut buf).unwrap(), &[5u8; 100][..]);
    }
}
