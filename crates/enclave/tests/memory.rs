//! Tests of the enclave's memory budget: accounting, LRU spill, sealed restore and tamper detection.

use std::cell::Cell;

use trustsplit_enclave::memory::{BlobId, MemoryError, SecureMemory, Spill, DEFAULT_BUDGET_BYTES};

/// Random bytes from the OS, so sealed pages can be checked against real-looking plaintext (zeros
/// would hide mistakes such as returning the wrong blob).
fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).expect("OS RNG");
    bytes
}

fn is_resident(mem: &mut SecureMemory, id: BlobId) -> bool {
    mem.untrusted_page_mut(id).is_none()
}

fn contains_window(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn assert_tampered(result: Result<Vec<u8>, MemoryError>, expected_id: BlobId) {
    match &result {
        Err(err @ MemoryError::Tampered { id, reason }) => {
            assert_eq!(*id, expected_id.get());
            let message = err.to_string();
            assert!(message.contains(&format!("sealed page {id}")), "{message}");
            assert!(message.contains("aborting the step"), "{message}");
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("expected Tampered for blob {expected_id}, got {other}"),
        Ok(_) => panic!("tampered page {expected_id} was accepted"),
    }
}

#[test]
fn round_trip_below_budget_does_not_spill() {
    let mut mem = SecureMemory::new(DEFAULT_BUDGET_BYTES).unwrap();
    assert_eq!(mem.budget(), DEFAULT_BUDGET_BYTES);
    let blobs: Vec<Vec<u8>> = [1000, 1, 0, 4096, 12345].iter().map(|&n| random_bytes(n)).collect();
    let total: usize = blobs.iter().map(Vec::len).sum();
    let ids: Vec<BlobId> = blobs.iter().map(|b| mem.store(b.clone()).unwrap()).collect();

    let stats = mem.stats();
    assert_eq!(stats.resident_bytes, total);
    assert_eq!(stats.peak_bytes, total);
    assert_eq!(stats.spill_count, 0);

    assert_eq!(mem.get(ids[3]).unwrap(), &blobs[3][..]);
    for (id, blob) in ids.iter().zip(&blobs).rev() {
        assert_eq!(&mem.take(*id).unwrap(), blob);
    }
    let stats = mem.stats();
    assert_eq!(stats.resident_bytes, 0);
    assert_eq!(stats.peak_bytes, total, "peak is kept after taking");
    assert_eq!((stats.spill_count, stats.spill_bytes, stats.restore_count, stats.restore_bytes), (0, 0, 0, 0));
    assert_eq!(stats.spilled_bytes_now, 0);

    // Taken blobs are gone; freeing them again is a no-op.
    assert!(matches!(mem.take(ids[0]), Err(MemoryError::UnknownBlob { id }) if id == ids[0].get()));
    mem.free(ids[0]);
    mem.reset_peak();
    assert_eq!(mem.stats().peak_bytes, 0);
}

#[test]
fn over_budget_spills_lru_and_restores_exactly() {
    const BUDGET: usize = 10_000;
    let mut mem = SecureMemory::new(BUDGET).unwrap();
    let blobs: Vec<Vec<u8>> = (0..12).map(|i| random_bytes(1500 + 37 * i)).collect();
    let mut ids = Vec::new();
    for blob in &blobs {
        ids.push(mem.store(blob.clone()).unwrap());
        let stats = mem.stats();
        assert!(stats.resident_bytes <= BUDGET, "resident {} over budget", stats.resident_bytes);
        // Every blob is either resident or spilled, never both or neither.
        let stored: usize = blobs[..ids.len()].iter().map(Vec::len).sum();
        assert_eq!(stats.resident_bytes + stats.spilled_bytes_now, stored);
    }
    let stats = mem.stats();
    assert!(stats.spill_bytes > 0 && stats.spill_count > 0);
    assert!(stats.peak_bytes <= BUDGET);
    // The oldest blobs went first; the newest is resident.
    assert!(!is_resident(&mut mem, ids[0]));
    assert!(is_resident(&mut mem, ids[11]));

    // Touch an old blob: it is restored and becomes the most recently used, so further stores spill
    // others first and it stays resident.
    assert_eq!(mem.get(ids[0]).unwrap(), &blobs[0][..]);
    assert!(is_resident(&mut mem, ids[0]));
    let extra: Vec<Vec<u8>> = (0..3).map(|_| random_bytes(2000)).collect();
    let extra_ids: Vec<BlobId> = extra.iter().map(|b| mem.store(b.clone()).unwrap()).collect();
    assert!(is_resident(&mut mem, ids[0]), "the most recently used old blob was spilled before older ones");
    assert!(mem.stats().resident_bytes <= BUDGET);

    for (id, blob) in ids.iter().zip(&blobs).chain(extra_ids.iter().zip(&extra)) {
        assert_eq!(&mem.take(*id).unwrap(), blob, "blob {id} changed");
        assert!(mem.stats().resident_bytes <= BUDGET);
    }
    let stats = mem.stats();
    assert_eq!(stats.resident_bytes, 0);
    assert_eq!(stats.spilled_bytes_now, 0);
    assert!(stats.peak_bytes <= BUDGET);
    // Every spilled byte was restored exactly once here, because all blobs were taken.
    assert_eq!(stats.spill_bytes, stats.restore_bytes);
    assert_eq!(stats.spill_count, stats.restore_count);
    assert!(stats.seal_seconds > 0.0 && stats.unseal_seconds > 0.0);
}

#[test]
fn oversized_blob_is_accepted_alone() {
    const BUDGET: usize = 4096;
    let mut mem = SecureMemory::new(BUDGET).unwrap();
    let small = random_bytes(1000);
    let big = random_bytes(3 * BUDGET);
    let small_id = mem.store(small.clone()).unwrap();
    let big_id = mem.store(big.clone()).unwrap();

    // Everything else was spilled to make as much room as possible.
    assert!(!is_resident(&mut mem, small_id));
    let stats = mem.stats();
    assert_eq!(stats.resident_bytes, big.len());
    assert_eq!(stats.peak_bytes, big.len(), "the oversized blob counts toward the peak");

    // Restoring the small blob spills the oversized one (it is the only resident blob).
    assert_eq!(mem.get(small_id).unwrap(), &small[..]);
    assert!(!is_resident(&mut mem, big_id));
    assert_eq!(mem.stats().resident_bytes, small.len());
    assert_eq!(mem.take(big_id).unwrap(), big);
    assert_eq!(mem.take(small_id).unwrap(), small);
}

#[test]
fn flipped_bit_is_detected() {
    let mut mem = SecureMemory::new(3000).unwrap();
    let a = mem.store(random_bytes(2000)).unwrap();
    let b_data = random_bytes(2000);
    let b = mem.store(b_data.clone()).unwrap();
    assert!(is_resident(&mut mem, b));
    let page = mem.untrusted_page_mut(a).expect("a was spilled");
    page[100] ^= 0x04;
    assert_tampered(mem.take(a), a);
    // The failure is not forgotten: the page stays bad until freed.
    assert_tampered(mem.take(a), a);
    mem.free(a);
    assert!(matches!(mem.take(a), Err(MemoryError::UnknownBlob { .. })));
    // Making room for the failed restore spilled b; it is intact.
    assert_eq!(mem.stats().spilled_bytes_now, b_data.len());
    assert_eq!(mem.take(b).unwrap(), b_data);
}

#[test]
fn flipped_tag_and_truncation_are_detected() {
    let mut mem = SecureMemory::new(1000).unwrap();
    let a = mem.store(random_bytes(800)).unwrap();
    let b = mem.store(random_bytes(800)).unwrap();
    let c = mem.store(random_bytes(800)).unwrap();
    let page = mem.untrusted_page_mut(a).unwrap();
    let last = page.len() - 1;
    page[last] ^= 0x80;
    assert_tampered(mem.take(a), a);
    mem.untrusted_page_mut(b).unwrap().pop();
    assert_tampered(mem.take(b), b);
    assert_eq!(mem.take(c).unwrap().len(), 800);
}

#[test]
fn swapped_pages_are_detected() {
    let mut mem = SecureMemory::new(1500).unwrap();
    let a = mem.store(random_bytes(1000)).unwrap();
    let b = mem.store(random_bytes(1000)).unwrap();
    let c = mem.store(random_bytes(1000)).unwrap();
    assert!(!mem.swap_untrusted_pages(a, c), "c is resident");
    assert!(mem.swap_untrusted_pages(a, b));
    assert_tampered(mem.take(a), a);
    assert_tampered(mem.take(b), b);
}

#[test]
fn replayed_old_page_is_detected() {
    let mut mem = SecureMemory::new(1500).unwrap();
    let data = random_bytes(1000);
    let a = mem.store(data.clone()).unwrap();
    let _b = mem.store(random_bytes(1000)).unwrap();
    let old_page = mem.untrusted_page_mut(a).expect("a was spilled").clone();

    // Restore a (this spills b), then force a out again: it is re-sealed under a new generation.
    assert_eq!(mem.get(a).unwrap(), &data[..]);
    let _c = mem.store(random_bytes(1000)).unwrap();
    let new_page = mem.untrusted_page_mut(a).expect("a was spilled again");
    assert_ne!(*new_page, old_page, "re-sealing must not reproduce the old page");
    *new_page = old_page;
    assert_tampered(mem.take(a), a);
}

#[test]
fn instances_use_different_keys_and_pages_hide_plaintext() {
    let plaintext = random_bytes(4096);
    let filler = random_bytes(4096);
    let mut pages = Vec::new();
    for _ in 0..2 {
        let mut mem = SecureMemory::new(5000).unwrap();
        // Same sequence in both instances, so ids, generations and nonces are identical too: only
        // the key can make the pages differ.
        let id = mem.store(plaintext.clone()).unwrap();
        mem.store(filler.clone()).unwrap();
        let page = mem.untrusted_page_mut(id).expect("spilled").clone();
        assert_eq!(page.len(), plaintext.len() + 16, "ciphertext plus tag");
        assert!(!contains_window(&page, &plaintext[..32]), "sealed page contains the plaintext");
        assert!(!contains_window(&page, &plaintext[2000..2032]), "sealed page contains the plaintext");
        assert_eq!(mem.take(id).unwrap(), plaintext);
        pages.push(page);
    }
    assert_ne!(pages[0], pages[1], "two instances sealed identical plaintext identically");
}

#[test]
fn transient_reservations_count_and_force_spills() {
    const BUDGET: usize = 10_000;
    let mut mem = SecureMemory::new(BUDGET).unwrap();
    let a_data = random_bytes(4000);
    let b_data = random_bytes(4000);
    let a = mem.store(a_data.clone()).unwrap();
    let b = mem.store(b_data.clone()).unwrap();
    assert_eq!(mem.stats().spill_count, 0);

    mem.reserve_transient(3000).unwrap();
    let stats = mem.stats();
    assert_eq!(stats.spill_count, 1, "one blob had to go to make room for the working buffer");
    assert!(!is_resident(&mut mem, a) && is_resident(&mut mem, b), "the LRU blob is spilled");
    assert_eq!(stats.transient_bytes, 3000);
    assert_eq!(stats.resident_bytes, 7000);
    assert_eq!(stats.peak_bytes, 8000);

    mem.reserve_transient(2000).unwrap();
    assert_eq!(mem.stats().peak_bytes, 9000);
    mem.release_transient(5000);
    assert_eq!(mem.stats().resident_bytes, 4000);
    assert_eq!(mem.stats().transient_bytes, 0);

    // A reservation larger than the budget spills everything and is still granted.
    mem.reset_peak();
    mem.reserve_transient(BUDGET + 1).unwrap();
    let stats = mem.stats();
    assert_eq!(stats.resident_bytes, BUDGET + 1);
    assert_eq!(stats.peak_bytes, BUDGET + 1);
    assert_eq!(stats.spilled_bytes_now, 8000);
    mem.release_transient(BUDGET + 1);

    assert_eq!(mem.take(a).unwrap(), a_data);
    assert_eq!(mem.take(b).unwrap(), b_data);
}

#[test]
#[should_panic(expected = "exceeds")]
fn releasing_more_than_reserved_panics() {
    let mut mem: SecureMemory = SecureMemory::new(1000).unwrap();
    mem.reserve_transient(10).unwrap();
    mem.release_transient(11);
}

#[test]
fn stats_serialise_to_json() {
    let mut mem = SecureMemory::new(100).unwrap();
    mem.store(random_bytes(80)).unwrap();
    mem.store(random_bytes(80)).unwrap();
    let json = serde_json::to_value(mem.stats()).unwrap();
    assert_eq!(json["budget_bytes"], 100);
    assert_eq!(json["spill_count"], 1);
    assert_eq!(json["spilled_bytes_now"], 80);
}

thread_local! {
    /// How many times a `Words` blob was encoded on this test thread.
    static ENCODED: Cell<usize> = const { Cell::new(0) };
}

/// A blob that is not bytes: words, encoded little-endian (and counted) only when sealed.
/// `claimed_len`, when set, is a wrong `spill_len`, standing for a codec bug.
#[derive(Clone, Debug, PartialEq)]
struct Words {
    words: Vec<u32>,
    claimed_len: Option<usize>,
}

impl Spill for Words {
    fn spill_len(&self) -> usize {
        self.claimed_len.unwrap_or(4 * self.words.len())
    }
    fn into_bytes(self) -> Vec<u8> {
        ENCODED.with(|n| n.set(n.get() + 1));
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
    fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        if !bytes.len().is_multiple_of(4) {
            return Err(format!("{} bytes are not whole words", bytes.len()));
        }
        let words = bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(Words { words, claimed_len: None })
    }
}

fn words(n: usize) -> Words {
    let bytes = random_bytes(4 * n);
    Words::from_bytes(bytes).unwrap()
}

#[test]
fn blobs_are_encoded_only_when_sealed() {
    ENCODED.with(|n| n.set(0));
    let mut mem: SecureMemory<Words> = SecureMemory::new(1000).unwrap();
    // Three blobs of 400 bytes in a 1000-byte budget: the third spills the first, once.
    let blobs: Vec<Words> = (0..3).map(|_| words(100)).collect();
    let ids: Vec<BlobId> = blobs.iter().map(|b| mem.store(b.clone()).unwrap()).collect();
    assert_eq!(ENCODED.with(Cell::get), 1);
    assert!(!is_resident_words(&mut mem, ids[0]) && is_resident_words(&mut mem, ids[2]));
    assert_eq!(mem.stats().spilled_bytes_now, 400);
    // Resident blobs come back as they were stored, without a round trip through bytes.
    assert_eq!(mem.take(ids[2]).unwrap(), blobs[2]);
    assert_eq!(ENCODED.with(Cell::get), 1);
    // The spilled one is decrypted, authenticated and decoded back to the same words.
    assert_eq!(mem.take(ids[0]).unwrap(), blobs[0]);
    assert_eq!(mem.take(ids[1]).unwrap(), blobs[1]);
    assert_eq!(mem.stats().resident_bytes, 0);
}

#[test]
fn a_blob_that_encodes_to_another_length_than_accounted_is_refused() {
    let mut mem: SecureMemory<Words> = SecureMemory::new(100).unwrap();
    let liar = Words { claimed_len: Some(60), ..words(10) };
    let id = mem.store(liar).unwrap();
    // Storing another 60 bytes must spill the first, whose 40 encoded bytes do not match its 60.
    let err = mem.store(words(15)).unwrap_err();
    match &err {
        MemoryError::Codec { id: got, reason } => {
            assert_eq!(*got, id.get());
            assert!(reason.contains("40 bytes where 60"), "{reason}");
        }
        other => panic!("expected a codec error, got {other}"),
    }
    // The refused blob is gone from the accounting; the memory stays usable.
    assert!(matches!(mem.take(id), Err(MemoryError::UnknownBlob { .. })));
    assert_eq!(mem.stats().resident_bytes, 0);
    let again = words(5);
    let id2 = mem.store(again.clone()).unwrap();
    assert_eq!(mem.take(id2).unwrap(), again);
}

fn is_resident_words(mem: &mut SecureMemory<Words>, id: BlobId) -> bool {
    mem.untrusted_page_mut(id).is_none()
}
