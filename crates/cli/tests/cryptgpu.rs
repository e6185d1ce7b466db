//! `--scheme cryptgpu` from the command line: three in-process parties train, resume, benchmark,
//! and refuse what they cannot do on shares.

use std::process::Command;

fn trustsplit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trustsplit"))
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("trustsplit-cryptgpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const SMALL: [&str; 10] =
    ["--scheme", "cryptgpu", "--model", "lenet", "--train-limit", "96", "--test-limit", "64", "--batch-size", "32"];

#[test]
fn trains_resumes_and_reports_each_partys_traffic() {
    let dir = temp("train");
    let out =
        trustsplit().arg("train").args(SMALL).args(["--epochs", "1", "--json", "--out"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parties = v["parties"].as_array().expect("parties");
    assert_eq!(parties.len(), 3, "{v}");
    for p in parties {
        assert!(p["total"]["bytes_sent"].as_u64().unwrap() > 0 && p["total"]["rounds"].as_u64().unwrap() > 0, "{p}");
    }
    assert_eq!(v["bytes_released"], 0, "{v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("party 2: sent") && err.contains("released: nothing to any one party"), "{err}");

    let out = trustsplit()
        .arg("train")
        .args(SMALL)
        .args(["--epochs", "2", "--resume", "--json", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["resumed_from_epoch"].as_u64(), v["epochs"].as_u64()), (Some(1), Some(2)), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_step_reports_bytes_and_rounds_per_party() {
    for inference in [false, true] {
        let mut cmd = trustsplit();
        cmd.args(["bench", "step", "--scheme", "cryptgpu", "--model", "lenet", "--pool", "avg", "--batch-size", "2"]);
        cmd.args(["--steps", "1", "--warmup", "0", "--json"]);
        if inference {
            cmd.arg("--inference");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["model"], "lenet-avgpool", "{v}");
        let parties = v["parties"].as_array().expect("parties");
        assert_eq!(parties.len(), 3);
        for p in parties {
            assert!(p["bytes_sent"].as_u64().unwrap() > 0 && p["rounds"].as_u64().unwrap() > 0, "{p}");
        }
    }
}

#[test]
fn refuses_what_shares_cannot_train_with_a_reason() {
    let cases: [(&[&str], &str); 3] = [
        (&["--model", "vgg11-bn"], "batch-norm"),
        (&["--optimizer", "adam"], "Adam"),
        (&["--max-grad-norm", "1"], "clip"),
    ];
    for (args, expected) in cases {
        let dir = temp("refuse");
        let out = trustsplit()
            .args(["train", "--scheme", "cryptgpu", "--epochs", "1", "--train-limit", "32", "--test-limit", "32"])
            .args(args)
            .arg("--out")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}
