//! The enclave's memory budget, modelled on SGX's usable EPC.
//!
//! The trusted side keeps some buffers between a forward and a backward pass (saved activations,
//! stored here as blobs: anything that can turn itself into bytes, [`Spill`]; a resident blob stays
//! in its own form and is encoded only when it has to be sealed). Inside a real enclave they live
//! in the EPC, which is small (about 96 MiB usable on many SGX parts); past it, the hardware or the
//! runtime pages out to host memory that the attacker controls. [`SecureMemory`] makes that cost visible and the paging
//! safe:
//!
//! - Every byte is accounted: stored blobs that are resident, plus transient working buffers the
//!   caller declares with [`SecureMemory::reserve_transient`]. The peak is recorded.
//! - When the resident set would exceed the budget, least-recently-used blobs are sealed with
//!   AES-256-GCM and the ciphertext is moved to "untrusted memory", a store outside the budget that
//!   stands for host memory outside the enclave.
//! - On access, a spilled blob is restored: decrypted and authenticated. The associated data binds
//!   the blob id and its spill generation, and the nonce is kept on the trusted side, so a page that
//!   was modified, swapped with another page, or replaced by an older sealed version of itself fails
//!   authentication. That is reported as [`MemoryError::Tampered`] and the step must abort; wrong
//!   data is never returned.
//!
//! The sealing key is drawn from the OS CSPRNG for each [`SecureMemory`] and never leaves it. Nonces
//! come from a 96-bit counter per key, so a nonce is never reused under the same key.
//!
//! Tried and dropped:
//! - Sealing with the RustCrypto `aes-gcm` crate: about 7x slower than `ring`'s AES-256-GCM
//!   (tee-only VGG16's seal+unseal 90 against 12 ms per step in `trustsplit bench step`, a Zen 5,
//!   2026-12-01).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Instant;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// Usable EPC of a typical SGX machine; the default budget of the trusted side.
pub const DEFAULT_BUDGET_BYTES: usize = 96 << 20;

/// Size of the AES-GCM authentication tag appended to every sealed page.
const TAG_BYTES: usize = 16;

/// Nonces are 96 bits; the counter must stay below this.
const NONCE_LIMIT: u128 = 1 << 96;

/// Domain separation for the associated data, so sealed pages cannot be confused with any other
/// ciphertext a future version might produce under a related key.
const AAD_LABEL: &[u8; 24] = b"trustsplit/spill-page/v1";

/// What [`SecureMemory`] stores. A blob is accounted by its encoded length and encoded only to be
/// sealed, so contexts that never leave the budget are never copied into bytes and back (for
/// AsymML's VGG16 step, which never spills, that was about 4% of the enclave's time).
pub trait Spill: Sized {
    /// The length of [`Spill::into_bytes`]'s result, without encoding.
    fn spill_len(&self) -> usize;
    fn into_bytes(self) -> Vec<u8>;
    /// Rebuilds a blob from what `into_bytes` gave (after authenticated decryption).
    fn from_bytes(bytes: Vec<u8>) -> Result<Self, String>;
}

impl Spill for Vec<u8> {
    fn spill_len(&self) -> usize {
        self.len()
    }
    fn into_bytes(self) -> Vec<u8> {
        self
    }
    fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        Ok(bytes)
    }
}

/// Handle to a blob stored in a [`SecureMemory`]. Ids are never reused within one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(u64);

impl BlobId {
    /// The number behind the handle (used in error messages and logs).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Errors of the secure memory. `Tampered` means the untrusted host interfered: the caller must
/// abort the step, never continue with a substitute.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("sealed page {id} failed authentication when restored from untrusted memory: {reason}; aborting the step")]
    Tampered { id: u64, reason: String },
    #[error("no blob {id} in secure memory (it was never stored here, or was already taken or freed)")]
    UnknownBlob { id: u64 },
    #[error("the OS random number generator failed while drawing the page-sealing key: {0}")]
    Rng(String),
    #[error("could not seal page {id} for spilling to untrusted memory: {reason}")]
    Seal { id: u64, reason: String },
    #[error("blob {id} does not encode as accounted or decode after authentication: {reason}")]
    Codec { id: u64, reason: String },
    #[error("the 96-bit sealing nonce counter is exhausted; refusing to reuse a nonce (create a new SecureMemory)")]
    NonceExhausted,
}

/// A snapshot of the accounting. Byte counts of spills and restores are plaintext bytes (a sealed
/// page is 16 bytes larger, for the AES-GCM authentication tag).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemoryStats {
    /// The budget the instance was created with.
    pub budget_bytes: usize,
    /// Bytes counted against the budget now: resident blobs plus transient reservations.
    pub resident_bytes: usize,
    /// Highest `resident_bytes` seen since creation or the last [`SecureMemory::reset_peak`].
    pub peak_bytes: usize,
    /// Of `resident_bytes`, how much is transient reservations.
    pub transient_bytes: usize,
    /// Plaintext bytes of the blobs currently sealed in untrusted memory.
    pub spilled_bytes_now: usize,
    /// Total plaintext bytes sealed and spilled so far.
    pub spill_bytes: u64,
    /// Number of spills so far.
    pub spill_count: u64,
    /// Total plaintext bytes restored (and authenticated) so far.
    pub restore_bytes: u64,
    /// Number of restores so far.
    pub restore_count: u64,
    /// Seconds spent sealing pages.
    pub seal_seconds: f64,
    /// Seconds spent unsealing (decrypting and authenticating) pages.
    pub unseal_seconds: f64,
}

/// What the trusted side knows about one blob. For a spilled blob this is the metadata that makes
/// the untrusted copy verifiable; it never leaves the enclave.
enum Slot<T> {
    /// In enclave memory. `tick` is its position in the LRU order (key of `SecureMemory::lru`).
    Resident { blob: T, tick: u64 },
    /// Sealed in untrusted memory (the ciphertext is in `SecureMemory::untrusted`).
    Spilled { nonce: [u8; 12] },
}

struct Entry<T> {
    /// Plaintext length; kept so a spilled blob's size is known without trusting the host.
    len: usize,
    /// How many times this blob has been sealed. Bound into the associated data, so an older sealed
    /// version of the same blob does not authenticate once the blob has been sealed again.
    generation: u64,
    slot: Slot<T>,
}

/// The enclave's accounted memory: a budget, an LRU set of resident blobs, and sealed spill to
/// untrusted memory. See the [module documentation](crate::memory).
pub struct SecureMemory<T: Spill = Vec<u8>> {
    budget: usize,
    cipher: LessSafeKey,
    /// Next nonce, as a 96-bit counter (checked against [`NONCE_LIMIT`]).
    next_nonce: u128,
    next_id: u64,
    /// Monotonic use counter for the LRU order.
    next_tick: u64,
    entries: HashMap<BlobId, Entry<T>>,
    /// Resident blobs by last use, oldest first.
    lru: BTreeMap<u64, BlobId>,
    /// Host memory outside the enclave: sealed pages (ciphertext followed by the tag).
    untrusted: HashMap<BlobId, Vec<u8>>,
    resident_blob_bytes: usize,
    transient_bytes: usize,
    peak_bytes: usize,
    spilled_bytes_now: usize,
    spill_bytes: u64,
    spill_count: u64,
    restore_bytes: u64,
    restore_count: u64,
    seal_seconds: f64,
    unseal_seconds: f64,
}

impl<T: Spill> fmt::Debug for SecureMemory<T> {
    /// Shows the accounting only; the key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureMemory").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl<T: Spill> SecureMemory<T> {
    /// Creates an empty memory with the given budget and a fresh sealing key from the OS CSPRNG.
    ///
    /// A budget of 0 is allowed: every stored blob is then oversized (see [`SecureMemory::store`]).
    pub fn new(budget_bytes: usize) -> Result<Self, MemoryError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| MemoryError::Rng(e.to_string()))?;
        // ring rejects only keys of the wrong length, and this one is 32 bytes by type.
        let unbound = UnboundKey::new(&AES_256_GCM, &key).expect("AES-256-GCM takes a 32-byte key");
        let cipher = LessSafeKey::new(unbound);
        // Best effort: the cipher holds its own expanded key; do not leave a second copy around.
        key.fill(0);
        std::hint::black_box(&key);
        Ok(SecureMemory {
            budget: budget_bytes,
            cipher,
            next_nonce: 0,
            next_id: 0,
            next_tick: 0,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            untrusted: HashMap::new(),
            resident_blob_bytes: 0,
            transient_bytes: 0,
            peak_bytes: 0,
            spilled_bytes_now: 0,
            spill_bytes: 0,
            spill_count: 0,
            restore_bytes: 0,
            restore_count: 0,
            seal_seconds: 0.0,
            unseal_seconds: 0.0,
        })
    }

    /// The budget in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Stores a blob (takes ownership), spilling LRU blobs if needed. A single blob larger than the
    /// whole budget is still accepted (it is resident while in use) but everything else is spilled
    /// first, and it counts toward the peak.
    ///
    /// The new blob is the most recently used one.
    pub fn store(&mut self, blob: T) -> Result<BlobId, MemoryError> {
        let len = blob.spill_len();
        self.make_room(len)?;
        let id = BlobId(self.next_id);
        self.next_id += 1;
        let tick = self.next_tick();
        self.lru.insert(tick, id);
        self.entries.insert(id, Entry { len, generation: 0, slot: Slot::Resident { blob, tick } });
        self.resident_blob_bytes += len;
        self.note_peak();
        Ok(id)
    }

    /// Removes and returns a blob, restoring (and authenticating) it if spilled.
    ///
    /// A spilled blob is first restored into the budget (it has to be decrypted inside the enclave,
    /// so this may spill others and counts toward the peak); once returned it is the caller's and no
    /// longer accounted here. Callers that keep working on it should declare it with
    /// [`SecureMemory::reserve_transient`].
    ///
    /// On [`MemoryError::Tampered`] the blob stays spilled (every later access fails the same way)
    /// until it is freed.
    pub fn take(&mut self, id: BlobId) -> Result<T, MemoryError> {
        self.ensure_resident(id)?;
        let entry = self.entries.remove(&id).ok_or(MemoryError::UnknownBlob { id: id.0 })?;
        match entry.slot {
            Slot::Resident { blob, tick } => {
                self.lru.remove(&tick);
                self.resident_blob_bytes -= entry.len;
                Ok(blob)
            }
            Slot::Spilled { .. } => unreachable!("ensure_resident left blob {id} spilled"),
        }
    }

    /// Read access without removing (restores if spilled; marks it most recently used).
    pub fn get(&mut self, id: BlobId) -> Result<&T, MemoryError> {
        self.ensure_resident(id)?;
        let tick = self.next_tick();
        let entry = self.entries.get_mut(&id).ok_or(MemoryError::UnknownBlob { id: id.0 })?;
        match &mut entry.slot {
            Slot::Resident { blob, tick: old } => {
                self.lru.remove(old);
                self.lru.insert(tick, id);
                *old = tick;
                Ok(blob)
            }
            Slot::Spilled { .. } => unreachable!("ensure_resident left blob {id} spilled"),
        }
    }

    /// Drops a blob, resident or spilled. An unknown id is a no-op, so cleanup after an aborted step
    /// can free everything it stored without tracking what was already taken.
    pub fn free(&mut self, id: BlobId) {
        let Some(entry) = self.entries.remove(&id) else { return };
        match entry.slot {
            Slot::Resident { tick, .. } => {
                self.lru.remove(&tick);
                self.resident_blob_bytes -= entry.len;
            }
            Slot::Spilled { .. } => {
                self.untrusted.remove(&id);
                self.spilled_bytes_now -= entry.len;
            }
        }
    }

    /// Accounts a transient working buffer that the trusted side holds but does not store here (e.g.
    /// the current layer's input and output); may trigger spills. [`SecureMemory::release_transient`]
    /// gives it back.
    ///
    /// Like an oversized blob, a reservation that cannot fit even after spilling every blob is still
    /// granted (the computation needs the buffer either way); the peak then shows the overrun.
    pub fn reserve_transient(&mut self, bytes: usize) -> Result<(), MemoryError> {
        self.make_room(bytes)?;
        self.transient_bytes += bytes;
        self.note_peak();
        Ok(())
    }

    /// Gives back bytes reserved with [`SecureMemory::reserve_transient`].
    ///
    /// # Panics
    /// If more is released than is reserved: that is an accounting bug in the caller, and going on
    /// would make every later figure wrong.
    pub fn release_transient(&mut self, bytes: usize) {
        assert!(
            bytes <= self.transient_bytes,
            "release_transient({bytes}) exceeds the {} transient bytes reserved",
            self.transient_bytes
        );
        self.transient_bytes -= bytes;
    }

    /// A snapshot of the accounting.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            budget_bytes: self.budget,
            resident_bytes: self.resident_bytes(),
            peak_bytes: self.peak_bytes,
            transient_bytes: self.transient_bytes,
            spilled_bytes_now: self.spilled_bytes_now,
            spill_bytes: self.spill_bytes,
            spill_count: self.spill_count,
            restore_bytes: self.restore_bytes,
            restore_count: self.restore_count,
            seal_seconds: self.seal_seconds,
            unseal_seconds: self.unseal_seconds,
        }
    }

    /// Restarts peak tracking from the current resident size (e.g. to measure one step).
    pub fn reset_peak(&mut self) {
        self.peak_bytes = self.resident_bytes();
    }

    /// **Test hook only.** Stands for an attacker who controls untrusted memory: mutable access to the
    /// sealed bytes (ciphertext followed by the 16-byte tag) of a spilled blob, or `None` if the blob
    /// is resident or unknown. It exists so tests can show that tampering is detected on restore; the
    /// trusted side never reads these bytes except through authenticated decryption.
    pub fn untrusted_page_mut(&mut self, id: BlobId) -> Option<&mut Vec<u8>> {
        self.untrusted.get_mut(&id)
    }

    /// **Test hook only**, like [`SecureMemory::untrusted_page_mut`]: swaps the sealed contents of two
    /// spilled blobs, as a host could. Returns false (and changes nothing) if either is not spilled.
    pub fn swap_untrusted_pages(&mut self, a: BlobId, b: BlobId) -> bool {
        if !self.untrusted.contains_key(&a) || !self.untrusted.contains_key(&b) {
            return false;
        }
        if a != b {
            let page_a = self.untrusted.remove(&a).expect("checked above");
            let page_b = self.untrusted.insert(b, page_a).expect("checked above");
            self.untrusted.insert(a, page_b);
        }
        true
    }

    fn resident_bytes(&self) -> usize {
        self.resident_blob_bytes + self.transient_bytes
    }

    fn note_peak(&mut self) {
        self.peak_bytes = self.peak_bytes.max(self.resident_bytes());
    }

    fn next_tick(&mut self) -> u64 {
        let tick = self.next_tick;
        self.next_tick += 1;
        tick
    }

    /// Spills least-recently-used blobs until `incoming` more bytes fit in the budget, or nothing
    /// resident is left to spill.
    fn make_room(&mut self, incoming: usize) -> Result<(), MemoryError> {
        while self.resident_bytes().saturating_add(incoming) > self.budget {
            let Some((_, victim)) = self.lru.pop_first() else { break };
            self.spill(victim)?;
        }
        Ok(())
    }

    /// Seals a resident blob (already removed from the LRU order) and moves it to untrusted memory.
    fn spill(&mut self, id: BlobId) -> Result<(), MemoryError> {
        let nonce = self.fresh_nonce()?;
        let entry = self.entries.get_mut(&id).expect("LRU order names a blob that is not stored");
        let Slot::Resident { blob, .. } = std::mem::replace(&mut entry.slot, Slot::Spilled { nonce }) else {
            unreachable!("LRU order names spilled blob {id}");
        };
        entry.generation += 1;
        let aad = associated_data(id, entry.generation, entry.len);

        let started = Instant::now();
        let mut page = blob.into_bytes();
        if page.len() != entry.len {
            // The blob's `spill_len` was wrong: the accounting (and the length bound into the
            // associated data) would not match what is sealed. A bug, reported rather than sealed.
            let len = entry.len;
            self.entries.remove(&id);
            self.resident_blob_bytes -= len;
            let reason = format!("it encodes to {} bytes where {len} were accounted", page.len());
            return Err(MemoryError::Codec { id: id.0, reason });
        }
        page.reserve_exact(TAG_BYTES);
        // The nonce is unique: `fresh_nonce` counts up and never repeats under this key.
        let sealed =
            self.cipher.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut page);
        self.seal_seconds += started.elapsed().as_secs_f64();
        if let Err(e) = sealed {
            // Cannot happen below AES-GCM's 64 GiB message limit; if it does, report rather than lose
            // the blob silently. The blob's plaintext is gone from `page` in an unknown state, so drop
            // the entry entirely.
            let len = entry.len;
            self.entries.remove(&id);
            self.resident_blob_bytes -= len;
            return Err(MemoryError::Seal { id: id.0, reason: e.to_string() });
        }

        let len = entry.len;
        self.untrusted.insert(id, page);
        self.resident_blob_bytes -= len;
        self.spilled_bytes_now += len;
        self.spill_bytes += len as u64;
        self.spill_count += 1;
        Ok(())
    }

    /// Makes `id` resident, restoring it from untrusted memory if it is spilled. A restored blob
    /// becomes the most recently used one.
    fn ensure_resident(&mut self, id: BlobId) -> Result<(), MemoryError> {
        let entry = self.entries.get(&id).ok_or(MemoryError::UnknownBlob { id: id.0 })?;
        let Slot::Spilled { nonce } = entry.slot else { return Ok(()) };
        let (len, generation) = (entry.len, entry.generation);

        // The plaintext has to be decrypted into enclave memory, so make room for it first.
        self.make_room(len)?;

        let Some(page) = self.untrusted.get(&id) else {
            return Err(MemoryError::Tampered { id: id.0, reason: "its sealed page is missing".into() });
        };
        if page.len() != len + TAG_BYTES {
            return Err(MemoryError::Tampered {
                id: id.0,
                reason: format!(
                    "it is {} bytes long where {} were sealed, so it was modified, replayed or swapped",
                    page.len(),
                    len + TAG_BYTES
                ),
            });
        }
        // Decrypt a copy, so a failed attempt leaves the sealed page as it was and the plaintext is
        // only ever produced after the tag has verified.
        let mut bytes = page.clone();
        let aad = associated_data(id, generation, len);
        let started = Instant::now();
        let opened =
            self.cipher.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut bytes).is_ok();
        self.unseal_seconds += started.elapsed().as_secs_f64();
        if !opened {
            return Err(MemoryError::Tampered { id: id.0, reason: "it was modified, replayed or swapped".into() });
        }
        bytes.truncate(len);
        let blob = T::from_bytes(bytes).map_err(|reason| MemoryError::Codec { id: id.0, reason })?;

        self.untrusted.remove(&id);
        let tick = self.next_tick();
        self.lru.insert(tick, id);
        let entry = self.entries.get_mut(&id).expect("entry checked above");
        entry.slot = Slot::Resident { blob, tick };
        self.spilled_bytes_now -= len;
        self.resident_blob_bytes += len;
        self.restore_bytes += len as u64;
        self.restore_count += 1;
        self.note_peak();
        Ok(())
    }

    /// Next 96-bit nonce. The counter is per key and only goes up, so no nonce repeats.
    fn fresh_nonce(&mut self) -> Result<[u8; 12], MemoryError> {
        if self.next_nonce >= NONCE_LIMIT {
            return Err(MemoryError::NonceExhausted);
        }
        let counter = self.next_nonce;
        self.next_nonce += 1;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&counter.to_be_bytes()[4..]);
        Ok(nonce)
    }
}

/// Associated data of a sealed page: label, blob id, spill generation and plaintext length. The id
/// defeats swapping two pages; the generation defeats replaying an older sealing of the same blob.
fn associated_data(id: BlobId, generation: u64, len: usize) -> [u8; 48] {
    let mut aad = [0u8; 48];
    aad[..24].copy_from_slice(AAD_LABEL);
    aad[24..32].copy_from_slice(&id.0.to_be_bytes());
    aad[32..40].copy_from_slice(&generation.to_be_bytes());
    aad[40..48].copy_from_slice(&(len as u64).to_be_bytes());
    aad
}
