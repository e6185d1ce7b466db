//! `trustsplit privacy-report`: the recording holds what the transcript says was released, the
//! attacks are calibrated on gpu-only's view (which holds the raw input), and a protected run
//! reports its epsilon, what it covers, and what the attacks got.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trustsplit-privacy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn report(scheme: &str, more: &[&str], out: &Path) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_trustsplit"))
        .args(["privacy-report", "--scheme", scheme, "--epochs", "1", "--train-limit", "128", "--test-limit", "512"])
        .args(["--public-samples", "512", "--attack-steps", "250", "--threads", "2", "--json", "--out"])
        .arg(out)
        .args(more)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn attack<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["attacks"].as_array().unwrap().iter().find(|a| a["name"] == name).unwrap_or_else(|| panic!("no {name}: {r}"))
}

/// The digests of the values the device held (received) and returned (sent), from its recording.
fn recorded(dir: &Path) -> (BTreeSet<String>, Vec<String>) {
    let (mut received, mut sent) = (BTreeSet::new(), Vec::new());
    for line in std::fs::read_to_string(dir.join("index.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for t in v["tensors"].as_array().unwrap() {
            let digest = t["sha256"].as_str().unwrap().to_string();
            match t["direction"].as_str().unwrap() {
                "received" => drop(received.insert(digest)),
                _ => sent.push(digest),
            }
        }
    }
    sent.sort();
    (received, sent)
}

/// The same from the trusted side's transcript.
fn transcribed(path: &Path) -> (BTreeSet<String>, Vec<String>) {
    let (mut released, mut returned) = (BTreeSet::new(), Vec::new());
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let digest = v["sha256"].as_str().expect("the report's transcript records digests").to_string();
        match v["direction"].as_str().unwrap() {
            "tee-to-device" => drop(released.insert(digest)),
            _ => returned.push(digest),
        }
    }
    returned.sort();
    (released, returned)
}

#[test]
fn gpu_only_calibrates_the_attacks_and_asymml_reports_its_epsilon_and_what_it_covers() {
    let dir = temp("gpu-only");
    let r = report("gpu-only", &[], &dir);
    assert_eq!(recorded(&dir.join("view")), transcribed(&dir.join("transcript.jsonl")));
    // gpu-only sends the raw input: read as an image it is the image, and the learned inverse,
    // trained on public pairs only, gets it back too.
    assert!(attack(&r, "released-operand")["psnr"].as_f64().unwrap() > 99.0, "{r}");
    let inverse = attack(&r, "learned-inverse")["psnr"].as_f64().unwrap();
    let floor = attack(&r, "public-mean")["psnr"].as_f64().unwrap();
    assert!(inverse > 25.0 && floor < 15.0, "inverse {inverse} dB, public mean {floor} dB");
    assert!(r["epsilon"].is_null() && r["covers"].as_str().unwrap().contains("no differential privacy"), "{r}");
    assert!(r["released_by_kind"]["input"].as_u64().unwrap() > 0, "{r}");
    // The weight-difference attack, calibrated: gpu-only's device computed every weight gradient
    // itself, so what the two weights give back is what it computed.
    let leaks = r["weight_difference"].as_array().unwrap();
    assert_eq!(leaks.len(), 2, "{r}");
    for w in leaks {
        assert!(w["hidden_fraction"].as_f64().unwrap() < 0.01 && w["recovered_norm"].as_f64().unwrap() > 0.0, "{w}");
    }
    // Its classifier runs on the device, whose backward pass receives the logits' gradient.
    assert_eq!(attack(&r, "label-recovery")["label_accuracy"].as_f64(), Some(1.0), "{r}");
    for a in r["attacks"].as_array().unwrap().iter().filter(|a| a["name"] != "label-recovery") {
        let png = std::fs::read(a["grid"].as_str().unwrap()).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(a["ssim"].as_f64().unwrap() <= 1.0 && a["label_accuracy"].as_f64().unwrap() <= 1.0);
    }
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved["attacks"], r["attacks"]);

    // AsymML on one-channel images: the input's single channel stays inside, so the first release
    // is the second convolution's noised residual; its epsilon says what it leaves out.
    let r = report("asymml", &[], &dir);
    assert_eq!(recorded(&dir.join("view")), transcribed(&dir.join("transcript.jsonl")));
    assert!(r["epsilon"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["covers"].as_str().unwrap().contains("does NOT cover the weights"), "{r}");
    assert!(r["released_by_kind"].get("input").is_none(), "{r}");
    let names: Vec<&str> = r["attacks"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["learned-inverse", "optimisation-inverse", "public-mean"], "{r}");
    assert_eq!(r["not_applicable"][0]["name"], "label-recovery", "{r}");
    // The second convolution's weights, sent every step, give away the gradient the enclave kept.
    let leak = &r["weight_difference"][0];
    assert!(leak["hidden_fraction"].as_f64().unwrap() > 0.5, "{r}");
    let protected = attack(&r, "learned-inverse")["psnr"].as_f64().unwrap();
    assert!(protected < inverse - 10.0, "asymml {protected} dB against gpu-only's {inverse} dB");

    // Calibration of the optimisation-based inversion: without noise at rank 1 it finds the images
    // through the first convolution (initial weights) well above the public mean's floor.
    let r = report("asymml", &["--noise-multiplier", "0", "--rank-schedule", "1"], &dir);
    let (found, floor) = (
        attack(&r, "optimisation-inverse")["psnr"].as_f64().unwrap(),
        attack(&r, "public-mean")["psnr"].as_f64().unwrap(),
    );
    assert!(found > floor + 5.0, "optimisation-inverse {found} dB against the floor's {floor} dB");

    // With --dp full the epsilon covers the weights too: each step is DP-SGD (a pass per
    // sample), and the weight difference gives the attacker the clipped gradients under noise of
    // about its own size.
    let r = report("asymml", &["--dp", "full"], &dir);
    assert!(r["covers"].as_str().unwrap().starts_with("the device's whole view"), "{r}");
    assert_eq!(recorded(&dir.join("view")), transcribed(&dir.join("transcript.jsonl")));
    let leak = &r["weight_difference"][0];
    assert!(leak["hidden_fraction"].is_null(), "{r}");
    let (got, noise) = (leak["recovered_norm"].as_f64().unwrap(), leak["update_noise_norm"].as_f64().unwrap());
    assert!(got > 0.5 * noise && got < 3.0 * noise, "recovered {got}, noise {noise}");
    assert!(attack(&r, "learned-inverse")["psnr"].as_f64().unwrap() < inverse - 10.0, "{r}");

    // Nothing released, nothing to attack.
    let r = report("tee-only", &[], &dir);
    assert_eq!(r["attacks"].as_array().unwrap().len(), 0);
    assert_eq!(r["no_attack"], "nothing was released");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_what_it_cannot_report_on() {
    let dir = temp("refuse");
    let run = |more: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_trustsplit"))
            .args(["privacy-report", "--epochs", "1"])
            .args(more)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(&[]).contains("needs --out DIR"));
    let out = dir.to_str().unwrap();
    assert!(run(&["--out", out, "--resume"]).contains("drop --resume"));
    assert!(run(&["--out", out, "--device", "tcp://127.0.0.1:9"]).contains("trustsplit device --record"));
    std::fs::create_dir_all(dir.join("view")).unwrap();
    std::fs::write(dir.join("view/notes.txt"), "mine").unwrap();
    assert!(run(&["--out", out]).contains("is not a recording"));
    assert!(dir.join("view/notes.txt").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn goten_servers_views_are_attacked_one_by_one_and_give_nothing_beyond_the_prior() {
    let dir = temp("goten");
    let output = Command::new(env!("CARGO_BIN_EXE_trustsplit"))
        .args(["privacy-report", "--scheme", "goten", "--epochs", "1", "--train-limit", "64", "--test-limit", "256"])
        .args(["--public-samples", "256", "--attack-steps", "150", "--threads", "2", "--json", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let r: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(r["epsilon"].is_null(), "{r}");
    let floor = attack(&r, "public-mean")["psnr"].as_f64().unwrap();
    for (role, share) in [(0, "A0"), (1, "A1"), (2, "U")] {
        // Each server's recording holds its own shares and masks, which the transcript released.
        let view = dir.join("view").join(format!("server{role}"));
        let first: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(view.join("index.jsonl")).unwrap().lines().next().unwrap())
                .unwrap();
        assert_eq!(first["tensors"][0]["name"], share, "{first}");
        let inverse = attack(&r, &format!("learned-inverse (server {role})"))["psnr"].as_f64().unwrap();
        assert!(inverse < floor + 1.5, "server {role}: {inverse} dB against the floor's {floor} dB");
        let operand = attack(&r, &format!("released-operand (server {role})"))["psnr"].as_f64().unwrap();
        assert!(operand < floor, "server {role}: its share read as an image: {operand} dB");
    }
    let released: BTreeSet<String> = transcribed(&dir.join("transcript.jsonl")).0;
    for role in 0..3 {
        let (received, _) = recorded(&dir.join("view").join(format!("server{role}")));
        assert!(received.is_subset(&released), "server {role} held a value the transcript did not release");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
