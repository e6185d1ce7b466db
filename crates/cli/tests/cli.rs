//! The binary: help text, error exit codes, and the benchmark's JSON shape.

use std::process::Command;

fn trustsplit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trustsplit"))
}

#[test]
fn help_lists_the_commands() {
    let out = trustsplit().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["train", "eval", "bench", "data"] {
        assert!(text.contains(cmd), "--help does not mention {cmd}:\n{text}");
    }
}

#[test]
fn help_lists_every_scheme_with_what_it_releases_and_an_unknown_one_is_refused() {
    let out = trustsplit().args(["train", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for scheme in trustsplit::registry::Scheme::all() {
        let line = format!("- {}:", scheme.name());
        assert!(text.contains(&line), "train --help does not list {scheme}:\n{text}");
    }
    assert!(text.contains("INSECURE"), "{text}");
    let out = trustsplit().args(["train", "--scheme", "nonesuch"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nonesuch") && err.contains("asymml") && err.contains("tee-only"), "{err}");
}

#[test]
fn errors_exit_nonzero_with_a_message() {
    let out = trustsplit().args(["train", "--dataset", "mnist"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:") && err.contains("data"), "{err}");
    let out = trustsplit().args(["eval", "--checkpoint", "/nonexistent/c.safetensors"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/c.safetensors"));
}

#[test]
fn data_fetch_offline_and_with_a_wrong_archive_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("trustsplit-cli-fetch-{}", std::process::id()));
    // A local port nothing listens on stands for a machine without internet access (the test
    // never reaches the real site).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
    let out = trustsplit().args(["data", "fetch", "cifar10", "--url", &url, "--data-dir"]).arg(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("could not download {url}")) && err.contains("--archive FILE"), "{err}");
    assert!(err.contains("c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"), "{err}");
    // A file that is not the archive.
    let fake = dir.join("not-cifar.tar.gz");
    std::fs::write(&fake, b"not an archive").unwrap();
    let out = trustsplit()
        .args(["data", "fetch", "cifar100", "--archive"])
        .arg(&fake)
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has 14 bytes; cifar-100-binary.tar.gz has 168513733"), "{err}");
    // Datasets it does not fetch.
    let out = trustsplit().args(["data", "fetch", "fashion-mnist"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dataset-fashion-mnist"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_kernels_json_has_the_documented_keys() {
    let out = trustsplit()
        .args(["bench", "kernels", "--json", "--repeats", "1", "--vgg-batch", "2", "--threads", "1,2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["conv_fwd_ms", "conv_fwd_bwd_ms", "vgg16_step_ms", "gemm_baseline_ms"] {
        for t in ["1", "2"] {
            let ms = v[key][t].as_f64().unwrap_or_else(|| panic!("{key}.{t} missing in {v}"));
            assert!(ms > 0.0, "{key}.{t} = {ms}");
        }
    }
}

#[test]
fn train_json_prints_one_object() {
    let dir = std::env::temp_dir().join(format!("trustsplit-cli-json-{}", std::process::id()));
    let out = trustsplit()
        .args(["train", "--epochs", "1", "--train-limit", "200", "--test-limit", "100", "--json", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["accuracy", "loss", "epochs", "seconds"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
}

#[test]
fn bench_step_json_has_the_documented_keys() {
    for scheme in ["tee-only", "gpu-only", "asymml", "goten"] {
        let out = trustsplit()
            .args(["bench", "step", "--scheme", scheme, "--model", "lenet5", "--batch-size", "4", "--steps", "1"])
            .args(["--device", "cpu:1", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let keys = ["scheme", "model", "enclave_ms", "device_ms", "bytes_released", "device_bytes_sent", "spill_bytes"];
        for key in keys {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert!(v["peak_enclave_bytes"].as_u64().unwrap() > 0);
        let (released, sent) = (v["bytes_released"].as_u64().unwrap(), v["device_bytes_sent"].as_u64().unwrap());
        assert_eq!(released == 0, scheme == "tee-only", "{v}");
        // Every released value is sent at least once; AsymML sends each residual twice (for the
        // output and for the weight gradient), which the transcript counts once.
        assert!(sent >= released, "{v}");
        if scheme == "asymml" {
            assert!(sent > released, "{v}");
        }
        // The schemes that split a step with untrusted hardware are compared with tee-only
        // measured in the same run.
        assert_eq!(v["enclave_speedup"].is_f64(), scheme != "tee-only", "{v}");
        if scheme != "tee-only" {
            assert_eq!(v["baseline"]["scheme"], "tee-only", "{v}");
            assert!(v["enclave_macs"].as_u64().unwrap() < v["baseline"]["enclave_macs"].as_u64().unwrap(), "{v}");
        }
    }
}

#[test]
fn bench_step_alternates_the_baseline_and_reports_the_ratio_per_pair_of_steps() {
    let out = trustsplit()
        .args(["bench", "step", "--scheme", "asymml", "--model", "lenet5", "--batch-size", "4", "--steps", "3"])
        .args(["--warmup", "1", "--device", "cpu:1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["baseline"]["steps"], 3, "{v}");
    let overall = v["enclave_speedup"].as_f64().unwrap();
    let range = v["enclave_speedup_per_pair"].as_array().expect("a [lowest, highest] pair");
    let (lo, hi) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
    // The whole run's ratio (total over total) lies between its pairs' ratios.
    assert!(0.0 < lo && lo <= hi, "{v}");
    assert!(lo * (1.0 - 1e-9) <= overall && overall <= hi * (1.0 + 1e-9), "{overall} outside [{lo}, {hi}]: {v}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("over the 3 alternated pairs of steps"), "{text}");
    // Without a baseline there is no ratio.
    let out = trustsplit()
        .args(["bench", "step", "--scheme", "asymml", "--model", "lenet5", "--batch-size", "4", "--steps", "1"])
        .args(["--warmup", "0", "--device", "cpu:1", "--baseline", "none", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["enclave_speedup"].is_null() && v["enclave_speedup_per_pair"].is_null(), "{v}");
}

#[test]
fn bench_step_takes_other_image_sizes_and_names_a_size_a_model_cannot_take() {
    let run = |model: &str, size: &str| {
        trustsplit()
            .args(["bench", "step", "--model", model, "--image-size", size, "--batch-size", "2", "--steps", "1"])
            .args(["--warmup", "0", "--json"])
            .output()
            .unwrap()
    };
    // LeNet-5 at 36x36 instead of 28x28: 1.65x the pixels, and more multiply-adds per sample.
    let usual = trustsplit()
        .args(["bench", "step", "--model", "lenet5", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--json"])
        .output()
        .unwrap();
    let larger = trustsplit()
        .args(["bench", "step", "--model", "lenet5", "--image-size", "36", "--batch-size", "2", "--steps", "1"])
        .args(["--warmup", "0", "--lr", "0", "--json"])
        .output()
        .unwrap();
    assert!(usual.status.success() && larger.status.success(), "{}", String::from_utf8_lossy(&larger.stderr));
    let (usual, larger): (serde_json::Value, serde_json::Value) =
        (serde_json::from_slice(&usual.stdout).unwrap(), serde_json::from_slice(&larger.stdout).unwrap());
    assert_eq!(usual["input_shape"], serde_json::json!([1, 28, 28]));
    assert_eq!(larger["input_shape"], serde_json::json!([1, 36, 36]));
    assert_eq!((usual["lr"].as_f64(), larger["lr"].as_f64()), (Some(1e-3), Some(0.0)));
    assert!(larger["forward_macs_per_sample"].as_u64() > usual["forward_macs_per_sample"].as_u64());
    // VGG's five poolings need at least 32 pixels: the error names the model, the size and the layer.
    let out = run("vgg11", "16");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vgg11 does not take 16x16 images") && err.contains("maxpool"), "{err}");
}
