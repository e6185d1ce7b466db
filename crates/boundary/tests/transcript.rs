//! Releases are recorded; secrets do not print.

use trustsplit_boundary::*;

fn info(layer: &str, kind: &str, shape: &[usize]) -> ReleaseInfo {
    ReleaseInfo {
        scheme: "test".into(),
        layer: layer.into(),
        kind: kind.into(),
        shape: shape.to_vec(),
        reason: "unit test".into(),
    }
}

#[test]
fn releases_are_recorded_with_sizes_and_written_as_jsonl() {
    let dir = std::env::temp_dir().join(format!("trustsplit-transcript-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.jsonl");
    let t = Transcript::keeping_records().with_jsonl(&path).unwrap();
    let r = Released::new(&t, info("layers.0", "weight", &[2, 3]), vec![0.5f32; 6]);
    assert_eq!(r.get().len(), 6);
    let _ = Released::new(&t, info("layers.0", "weight", &[2, 3]), vec![0.25f32; 6]);
    t.record_received(info("layers.0", "activation", &[4]), 16);
    t.flush().unwrap();

    let s = t.summary();
    assert_eq!((s.records, s.bytes_released, s.bytes_returned), (3, 48, 16));
    assert_eq!(s.by_layer_kind["layers.0/weight/out"], (2, 48));
    let recs = t.records().unwrap();
    assert_eq!(recs[0].seq, 0);
    assert_eq!(recs[2].direction, Direction::DeviceToTee);

    let lines: Vec<ReleaseRecord> =
        std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines, recs);
}

#[test]
fn secrets_do_not_print() {
    let s = Secret::new(vec![42.0f32, 43.0]);
    let shown = format!("{s:?}");
    assert!(!shown.contains("42"), "{shown}");
    assert_eq!(s.expose()[1], 43.0);
}

#[test]
fn digests_are_the_sha256_of_the_wire_bytes_and_recorded_only_when_asked() {
    // Random-looking values whose byte order matters: the digest is over little-endian words.
    let values: Vec<f32> = (0..10_000u32).map(|i| (i.wrapping_mul(2654435761) as f32).sin() * 1e3).collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let expected: String =
        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(wire_digest(&values), expected);
    let words: Vec<u64> = (0..5000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    let word_bytes: Vec<u8> = words.iter().flat_map(|v| v.to_le_bytes()).collect();
    let expected_words: String =
        ring::digest::digest(&ring::digest::SHA256, &word_bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(wire_digest(&words), expected_words);

    let plain = Transcript::keeping_records();
    let _ = Released::new(&plain, info("layers.0", "input", &[10_000]), values.clone());
    assert_eq!(plain.records().unwrap()[0].sha256, None);

    let with = Transcript::keeping_records().with_digests();
    let _ = Released::new(&with, info("layers.0", "input", &[10_000]), &values);
    with.record_received_value(info("layers.0", "activation", &[5000]), &words);
    let recs = with.records().unwrap();
    assert_eq!(recs[0].sha256.as_deref(), Some(expected.as_str()));
    assert_eq!((recs[1].sha256.as_deref(), recs[1].bytes), (Some(expected_words.as_str()), 40_000));
}
