//! `trustsplit enclave` and `trustsplit upload` as the separate processes they are in use: the
//! enclave prints its address, measurement and simulation key; the owner uploads a small
//! Fashion-MNIST-format dataset; the enclave trains on it. And the refusals: a wrong measurement
//! or key makes the owner send nothing, and the enclave says it got nothing.
//!
//! Every child process is killed when its guard drops, on success and on panic, and every wait
//! has a deadline, so a broken build fails these tests instead of hanging them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long the enclave may take to start listening, and any process to finish.
const DEADLINE: Duration = Duration::from_secs(60);
/// Training the small dataset takes seconds; this leaves room for slow, shared machines.
const TRAIN_DEADLINE: Duration = Duration::from_secs(300);

/// A child process, killed (and reaped) when dropped unless it has already exited.
struct Proc {
    child: Child,
    what: &'static str,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proc {
    /// Runs the binary with `args`, its stdout and stderr going to files in `dir` (files, not
    /// pipes: a pipe nobody drains can block the child).
    fn spawn(what: &'static str, dir: &Path, args: &[&str]) -> Proc {
        let (stdout, stderr) = (dir.join(format!("{what}.out")), dir.join(format!("{what}.err")));
        let child = Command::new(env!("CARGO_BIN_EXE_trustsplit"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting trustsplit {what}: {e}"));
        Proc { child, what, stdout, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Waits for the process to exit; past `limit` the test fails (and the guard kills it).
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > limit {
                panic!("trustsplit {} still running after {limit:?}; stderr:\n{}", self.what, self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A fresh folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("trustsplit-enclave-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An IDX u8 file: magic `00 00 08 D`, `D` big-endian sizes, data.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Deterministic pseudo-random bytes (xorshift64*), below `modulus`.
fn random_bytes(n: usize, modulus: u8, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % modulus as u64) as u8
        })
        .collect()
}

/// A Fashion-MNIST-format folder: 300 training and 100 test 28x28 images of noise, labels 0..9.
fn write_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, n, seed) in [("train", 300u32, 1), ("t10k", 100, 2)] {
        let images = idx(&[n, 28, 28], &random_bytes(n as usize * 784, 255, seed));
        let labels = idx(&[n], &random_bytes(n as usize, 10, seed + 10));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
    }
}

/// A running `trustsplit enclave` and what it printed for the data owner.
struct Enclave {
    proc: Proc,
    addr: String,
    measurement: String,
    key: String,
    /// The data owner's key file, whose public key the enclave was started with.
    owner_key: PathBuf,
}

/// Makes a key file with `trustsplit keygen` in `dir`; returns its path and public key.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let out = Command::new(env!("CARGO_BIN_EXE_trustsplit")).args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (path, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

/// The word after `prefix` on the first line that has it.
fn value_after(text: &str, prefix: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|rest| rest.split_whitespace().next()).map(String::from)
}

/// Starts a simulated enclave training LeNet-5 for one epoch, and reads its address, measurement
/// and key from its stderr.
fn start_enclave(dir: &Path) -> Enclave {
    start_enclave_with(dir, &["--scheme", "tee-only"])
}

/// Starts `trustsplit enclave` for LeNet-5 on uploaded Fashion-MNIST (one epoch unless the
/// flags say otherwise), with the given scheme and training flags.
fn start_enclave_with(dir: &Path, scheme_args: &[&str]) -> Enclave {
    let out = dir.join("run");
    let (owner_key, owner_public) = keygen(dir, "owner.key");
    let mut args = vec![
        "enclave",
        "--listen",
        "127.0.0.1:0",
        "--owner-key",
        &owner_public,
        "--dataset",
        "fashion-mnist",
        "--model",
        "lenet5",
        "--batch-size",
        "32",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(scheme_args);
    if !scheme_args.contains(&"--epochs") {
        args.extend_from_slice(&["--epochs", "1"]);
    }
    let mut proc = Proc::spawn("enclave", dir, &args);
    let start = Instant::now();
    loop {
        let err = proc.stderr();
        let found = (
            value_after(&err, "enclave listening on "),
            value_after(&err, "enclave measurement: "),
            value_after(&err, "enclave simulation key: "),
        );
        if let (Some(addr), Some(measurement), Some(key)) = found {
            assert!(err.contains("provides no security"), "no simulation warning:\n{err}");
            return Enclave { proc, addr, measurement, key, owner_key };
        }
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("trustsplit enclave exited ({status}) before listening:\n{err}");
        }
        if start.elapsed() > DEADLINE {
            panic!("trustsplit enclave did not print its address, measurement and key within {DEADLINE:?}:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `trustsplit upload` with simulated attestation to `enclave`, as the owner it was started
/// for, and waits for the enclave's report of the training; returns its exit status and stderr.
/// The training's summary, which the enclave sends the owner, is [`last_stdout`].
fn upload(dir: &Path, enclave: &Enclave, data: &Path, key: &str, measurement: &str) -> (ExitStatus, String) {
    upload_as(dir, enclave, &enclave.owner_key, data, key, measurement)
}

/// [`upload`] with the owner key file `owner_key`.
fn upload_as(
    dir: &Path,
    enclave: &Enclave,
    owner_key: &Path,
    data: &Path,
    key: &str,
    measurement: &str,
) -> (ExitStatus, String) {
    let args = [
        "upload",
        "--to",
        &enclave.addr,
        "--key",
        owner_key.to_str().unwrap(),
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        data.to_str().unwrap(),
        "--attestation",
        "simulated",
        "--simulation-key",
        key,
        "--expect-measurement",
        measurement,
    ];
    let mut proc = Proc::spawn("upload", dir, &args);
    let status = proc.wait(TRAIN_DEADLINE);
    LAST_STDOUT.with(|o| *o.borrow_mut() = proc.stdout());
    (status, proc.stderr())
}

thread_local! {
    static LAST_STDOUT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The stdout of this thread's last upload: the enclave's summary of the training, as JSON.
fn last_stdout() -> String {
    LAST_STDOUT.with(|o| o.borrow().clone())
}

#[test]
fn owner_uploads_to_attested_enclave_which_trains() {
    let tmp = TempDir::new("ok");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let mut enclave = start_enclave(&tmp.0);
    let (measurement, key) = (enclave.measurement.clone(), enclave.key.clone());

    let (status, err) = upload(&tmp.0, &enclave, &data, &key, &measurement);
    assert!(status.success(), "upload failed ({status}):\n{err}\nenclave:\n{}", enclave.proc.stderr());
    assert!(err.contains(&format!("measurement {measurement}")), "{err}");
    assert!(err.contains("TCB status SIMULATED") && err.contains("uploaded 4 file(s)"), "{err}");

    let status = enclave.proc.wait(TRAIN_DEADLINE);
    let enclave_err = enclave.proc.stderr();
    assert!(status.success(), "enclave failed ({status}):\n{enclave_err}");
    // The summary goes to the owner; the host's terminal gets none of it.
    let summary: serde_json::Value = serde_json::from_str(last_stdout().trim())
        .unwrap_or_else(|e| panic!("the owner's stdout is not one JSON object ({e}):\n{}", last_stdout()));
    assert!(enclave.proc.stdout().is_empty(), "{}", enclave.proc.stdout());
    assert!(!enclave_err.contains("test accuracy") && !enclave_err.contains("loss"), "{enclave_err}");
    assert!(err.contains("enclave: done: test accuracy"), "{err}");
    assert_eq!(summary["test_samples"], 100, "{summary}");
    assert_eq!(summary["train_samples"], 300, "{summary}");
    assert_eq!(summary["dataset"], "fashion-mnist", "{summary}");
    assert_eq!(summary["scheme"], "tee-only", "{summary}");
    assert_eq!(summary["bytes_released"], 0, "tee-only releases nothing: {summary}");
    assert!(tmp.0.join("run/checkpoint.safetensors").is_file(), "{enclave_err}");
    assert!(enclave_err.contains("received 4 file(s)"), "{enclave_err}");
}

/// Starts an enclave with `flags`, uploads `data` to it (which must be received) and waits for the
/// enclave to end: whether it succeeded, the summary the owner received (stdout) and both sides'
/// stderr, the owner's first. The owner's upload command ends as the enclave's training does.
fn train_on_upload(dir: &Path, data: &Path, flags: &[&str]) -> (bool, String, String) {
    let mut enclave = start_enclave_with(dir, flags);
    let (measurement, key) = (enclave.measurement.clone(), enclave.key.clone());
    let (status, err) = upload(dir, &enclave, data, &key, &measurement);
    assert!(
        err.contains("the enclave confirmed receipt"),
        "upload failed:\n{err}\nenclave:\n{}",
        enclave.proc.stderr()
    );
    let enclave_status = enclave.proc.wait(TRAIN_DEADLINE);
    assert_eq!(status.success(), enclave_status.success(), "owner:\n{err}\nenclave:\n{}", enclave.proc.stderr());
    if !status.success() {
        assert!(err.contains("the enclave's training failed"), "{err}");
    }
    (enclave_status.success(), last_stdout(), format!("{err}\n{}", enclave.proc.stderr()))
}

/// [`train_on_upload`] where the enclave must succeed: its JSON summary and stderr.
fn summary_of_training(dir: &Path, data: &Path, flags: &[&str]) -> (serde_json::Value, String) {
    let (ok, out, err) = train_on_upload(dir, data, flags);
    assert!(ok, "enclave failed:\n{err}");
    let summary = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("the owner's stdout is not one JSON object ({e}):\n{out}"));
    (summary, err)
}

#[test]
fn enclave_takes_the_training_flags_and_resumes_from_its_checkpoint() {
    let tmp = TempDir::new("resume");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let transcript = tmp.0.join("transcript.jsonl");
    let transcript = transcript.to_str().unwrap();
    let with = |optimizer: &str, extra: &[&str]| -> Vec<String> {
        ["--scheme", "asymml", "--optimizer", optimizer, "--schedule", "constant", "--lr", "0.001"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let run = |flags: Vec<String>| {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        summary_of_training(&tmp.0, &data, &flags)
    };
    let (first, _) = run(with("adam", &["--epochs", "1", "--transcript", transcript]));
    assert_eq!(first["epochs"], 1, "{first}");
    let lines = std::fs::read_to_string(transcript).unwrap().lines().count();
    assert!(lines > 0, "the transcript flag wrote nothing");
    // The second enclave gets the data again and continues the first one's run.
    let (second, err) = run(with("adam", &["--epochs", "2", "--resume"]));
    assert_eq!(second["epochs"], 2, "{second}");
    assert_eq!(second["resumed_from_epoch"], 1, "{second}\n{err}");
    // A different optimiser is a different run: refused, naming the settings.
    let flags = with("sgd", &["--epochs", "3", "--resume"]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (ok, _, err) = train_on_upload(&tmp.0, &data, &flags);
    assert!(!ok && err.contains("cannot resume"), "{err}");
}

#[test]
fn enclave_trains_the_upload_under_asymml_with_its_flags() {
    let tmp = TempDir::new("asymml");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let flags = ["--scheme", "asymml", "--noise-multiplier", "1.5", "--rank-schedule", "1,3", "--device", "cpu:1"];
    let (summary, enclave_err) = summary_of_training(&tmp.0, &data, &flags);
    assert_eq!(summary["scheme"], "asymml", "{summary}");
    let privacy = &summary["privacy"];
    assert_eq!(privacy["noise_multiplier"], 1.5, "the flag did not reach the scheme: {summary}");
    assert!(privacy["epsilon"].as_f64().is_some_and(|e| e.is_finite() && e > 0.0), "{summary}");
    let ranks: Vec<f64> = summary["scheme_report"]["placement"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["what"] == "forward")
        .map(|l| l["mean_rank"].as_f64().unwrap())
        .collect();
    assert_eq!(ranks, [1.0, 3.0], "the rank schedule did not reach the scheme: {summary}");
    assert!(summary["bytes_released"].as_u64().unwrap() > 0, "{summary}");
    let checks = &summary["scheme_report"]["placement"]["device_checks"];
    assert!(checks["checks"].as_u64().is_some_and(|n| n > 0), "the device's results were not checked: {summary}");
    assert!(enclave_err.contains("device results: verified ("), "{enclave_err}");
}

#[test]
fn enclave_refuses_bad_training_flags_before_listening() {
    let tmp = TempDir::new("bad-asymml");
    let mut proc = Proc::spawn(
        "enclave",
        &tmp.0,
        &["enclave", "--listen", "127.0.0.1:0", "--dataset", "fashion-mnist", "--scheme", "asymml", "--clip-norm=-1"],
    );
    let status = proc.wait(DEADLINE);
    let err = proc.stderr();
    assert!(!status.success() && err.contains("--clip-norm must be a positive number, got -1"), "{err}");
    assert!(!err.contains("listening"), "it listened before checking its flags: {err}");
    let mut proc = Proc::spawn(
        "enclave",
        &tmp.0,
        &["enclave", "--listen", "127.0.0.1:0", "--dataset", "fashion-mnist", "--max-grad-norm", "0"],
    );
    let status = proc.wait(DEADLINE);
    let err = proc.stderr();
    assert!(!status.success() && err.contains("--max-grad-norm must be a positive number, got 0"), "{err}");
    assert!(!err.contains("listening"), "it listened before checking its flags: {err}");
    for (flag, value, message) in
        [("--optimizer", "lamb", "unknown optimizer 'lamb'"), ("--schedule", "linear", "unknown schedule 'linear'")]
    {
        let args = ["enclave", "--listen", "127.0.0.1:0", "--dataset", "fashion-mnist", flag, value];
        let mut proc = Proc::spawn("enclave", &tmp.0, &args);
        let status = proc.wait(DEADLINE);
        let err = proc.stderr();
        assert!(!status.success() && err.contains(message), "{err}");
        assert!(!err.contains("listening"), "it listened before checking its flags: {err}");
    }
}

#[test]
fn tdx_attestation_outside_a_confidential_vm_says_so_before_listening() {
    if std::path::Path::new("/sys/kernel/config/tsm/report").is_dir() {
        eprintln!("configfs-tsm is present: this machine may make TDX quotes; nothing to test here");
        return;
    }
    let tmp = TempDir::new("tdx");
    let args = ["enclave", "--listen", "127.0.0.1:0", "--dataset", "fashion-mnist", "--attestation", "tdx"];
    let mut proc = Proc::spawn("enclave", &tmp.0, &args);
    let status = proc.wait(DEADLINE);
    let err = proc.stderr();
    assert!(!status.success() && err.contains("not a TDX confidential VM"), "{err}");
    assert!(!err.contains("listening"), "it listened without a way to attest: {err}");
}

#[test]
fn owner_refusing_the_quote_sends_nothing() {
    let tmp = TempDir::new("refuse");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let other_measurement = "ab".repeat(32);
    // A valid ed25519 public key (the curve's base point) that is not the enclave's.
    let other_key = format!("58{}", "66".repeat(31));
    // (what the owner is given wrong, what its error must say)
    for (case, wrong_measurement, expected) in
        [("measurement", true, "measurement mismatch"), ("key", false, "signature does not verify")]
    {
        let mut enclave = start_enclave(&tmp.0);
        let (measurement, key) = if wrong_measurement {
            (other_measurement.clone(), enclave.key.clone())
        } else {
            (enclave.measurement.clone(), other_key.clone())
        };
        let (status, err) = upload(&tmp.0, &enclave, &data, &key, &measurement);
        assert!(!status.success(), "wrong {case}: upload succeeded:\n{err}");
        assert!(err.contains(expected) && err.contains("no data was sent"), "wrong {case}:\n{err}");
        if wrong_measurement {
            assert!(err.contains(&other_measurement) && err.contains(&enclave.measurement), "{err}");
        }

        // The enclave logs the refusal and keeps listening for its owner.
        let enclave_err = wait_for_stderr(&enclave.proc, "still listening");
        assert!(
            enclave_err.contains("closed the connection after our quote, before sending any data"),
            "{enclave_err}"
        );
        assert!(enclave.proc.child.try_wait().unwrap().is_none(), "the enclave stopped listening:\n{enclave_err}");
        assert!(enclave.proc.stdout().is_empty(), "{}", enclave.proc.stdout());
        assert!(!tmp.0.join("run").exists(), "the enclave trained on nothing");
    }
}

/// Waits until `proc`'s stderr contains `text`; returns it.
fn wait_for_stderr(proc: &Proc, text: &str) -> String {
    let start = Instant::now();
    loop {
        let err = proc.stderr();
        if err.contains(text) {
            return err;
        }
        assert!(start.elapsed() < DEADLINE, "no {text:?} within {DEADLINE:?}:\n{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn junk_and_strangers_do_not_end_the_enclave_and_only_its_owner_uploads() {
    let tmp = TempDir::new("strangers");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let mut enclave = start_enclave(&tmp.0);
    let (measurement, key) = (enclave.measurement.clone(), enclave.key.clone());
    // Junk on the port.
    let mut junk = std::net::TcpStream::connect(&enclave.addr).unwrap();
    std::io::Write::write_all(&mut junk, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(junk);
    wait_for_stderr(&enclave.proc, "still listening");
    // A stranger with a key of its own, and with the right attestation values: refused by the link.
    let (stranger, _) = keygen(&tmp.0, "stranger.key");
    let (status, err) = upload_as(&tmp.0, &enclave, &stranger, &data, &key, &measurement);
    assert!(!status.success() && err.contains("not allowed"), "{err}");
    // Plain TCP is refused too.
    let mut args = vec!["upload", "--to", &enclave.addr, "--insecure-plaintext-link", "--dataset", "fashion-mnist"];
    let data_dir = data.to_str().unwrap().to_string();
    args.extend_from_slice(&["--data-dir", &data_dir, "--attestation", "simulated", "--simulation-key", &key]);
    args.extend_from_slice(&["--expect-measurement", &measurement]);
    let mut plain = Proc::spawn("upload", &tmp.0, &args);
    assert!(!plain.wait(DEADLINE).success(), "{}", plain.stderr());
    // Silent connections that never finish a handshake do not hold the owner's up.
    let _silent: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(&enclave.addr).unwrap()).collect();
    // The owner still uploads, and gets the training's summary over the encrypted channel.
    let (status, err) = upload(&tmp.0, &enclave, &data, &key, &measurement);
    assert!(status.success(), "upload failed ({status}):\n{err}\nenclave:\n{}", enclave.proc.stderr());
    assert!(err.contains("the enclave finished training"), "{err}");
    assert!(enclave.proc.wait(TRAIN_DEADLINE).success(), "{}", enclave.proc.stderr());
    let refusals = enclave.proc.stderr().matches("refused a connection").count();
    assert!(refusals >= 3, "{}", enclave.proc.stderr());
}

#[test]
fn upload_checks_flags_and_files_before_connecting() {
    let tmp = TempDir::new("flags");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = Proc::spawn("upload", &tmp.0, &args);
        let status = p.wait(DEADLINE);
        assert!(!status.success(), "{args:?} succeeded:\n{}", p.stderr());
        p.stderr()
    };
    let base = ["upload", "--to", "127.0.0.1:1", "--dataset", "fashion-mnist", "--data-dir", data.to_str().unwrap()];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };

    // No measurement and no explicit opt-out.
    let err = run(with(&["--attestation", "simulated", "--simulation-key", "00"]));
    assert!(err.contains("--expect-measurement"), "{err}");
    // Simulated without its key; DCAP without collateral.
    let m = "00".repeat(32);
    let err = run(with(&["--attestation", "simulated", "--expect-measurement", &m]));
    assert!(err.contains("--simulation-key"), "{err}");
    let err = run(with(&["--expect-measurement", &m]));
    assert!(err.contains("--collateral"), "{err}");
    // A measurement that is not 32 bytes of hex.
    let err = run(with(&["--attestation", "simulated", "--simulation-key", &m, "--expect-measurement", "abc"]));
    assert!(err.contains("--expect-measurement: expected 64 hex digits"), "{err}");
    // --allow-any-measurement warns; a missing file is reported before connecting (port 1 is closed).
    std::fs::remove_file(data.join("t10k-labels-idx1-ubyte")).unwrap();
    let err = run(with(&["--attestation", "simulated", "--simulation-key", &m, "--allow-any-measurement"]));
    assert!(err.contains("warning: --allow-any-measurement"), "{err}");
    assert!(err.contains("t10k-labels-idx1-ubyte") && !err.contains("connecting"), "{err}");
}

/// A local port that nothing listens on (bound, then released).
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

/// The recorded TDX sample's collateral, a well-formed --collateral file.
const COLLATERAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../enclave/testdata/tdx_quote_collateral.json");

#[test]
fn upload_refuses_insecure_options_without_insecure_before_connecting() {
    let tmp = TempDir::new("insecure");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let to = closed_port();
    let owner_key = keygen(&tmp.0, "owner.key").0.to_str().unwrap().to_string();
    let run = |extra: &[&str]| -> String {
        let mut args = vec![
            "upload",
            "--to",
            &to,
            "--key",
            &owner_key,
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(&["--attestation", "dcap", "--collateral", COLLATERAL]);
        args.extend_from_slice(extra);
        let mut p = Proc::spawn("upload", &tmp.0, &args);
        let status = p.wait(DEADLINE);
        assert!(!status.success(), "{args:?} succeeded:\n{}", p.stderr());
        p.stderr()
    };
    let m = "00".repeat(32);

    // Refused: why, what to do, and before reading the data or connecting.
    let err = run(&["--allow-any-measurement"]);
    assert!(err.contains("--allow-any-measurement with --attestation dcap is refused"), "{err}");
    assert!(err.contains("including a malicious one, would then receive the data"), "{err}");
    assert!(err.contains("--expect-measurement HEX") && err.contains("add --insecure"), "{err}");
    assert!(!err.contains("connecting") && !err.contains("training and"), "{err}");
    let err = run(&["--expect-measurement", &m, "--allow-debug"]);
    assert!(err.contains("--allow-debug is refused") && err.contains("can be read by its host"), "{err}");
    assert!(err.contains("add --insecure") && !err.contains("connecting"), "{err}");

    // With --insecure it goes on (as far as the closed port) and warns loudly, every run.
    for _ in 0..2 {
        let err = run(&["--allow-any-measurement", "--allow-debug", "--insecure"]);
        assert!(err.contains("!!! WARNING: --insecure: this upload is NOT protected"), "{err}");
        assert!(err.contains("!!!   --allow-any-measurement: ANY enclave build"), "{err}");
        assert!(err.contains("!!!   --allow-debug: a debug enclave's memory"), "{err}");
        assert!(err.contains("300 training and 100 test images"), "{err}");
        assert!(err.contains(&format!("connecting to the enclave at {to}")), "{err}");
    }
    let err = run(&["--expect-measurement", &m, "--allow-debug", "--insecure"]);
    assert!(err.contains("!!!   --allow-debug") && !err.contains("!!!   --allow-any-measurement"), "{err}");
    assert!(err.contains(&format!("connecting to the enclave at {to}")), "{err}");

    // Simulated attestation is an explicit choice already: --allow-any-measurement needs no
    // --insecure there (it still warns).
    let mut args = vec![
        "upload",
        "--to",
        &to,
        "--key",
        &owner_key,
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(&["--attestation", "simulated", "--simulation-key", &m, "--allow-any-measurement"]);
    let mut p = Proc::spawn("upload", &tmp.0, &args);
    assert!(!p.wait(DEADLINE).success());
    let err = p.stderr();
    assert!(err.contains("warning: --allow-any-measurement") && !err.contains("--insecure"), "{err}");
    assert!(err.contains(&format!("connecting to the enclave at {to}")), "{err}");
}

#[test]
fn upload_takes_the_tdx_pins() {
    let tmp = TempDir::new("tdx-pins");
    let data = tmp.0.join("data");
    write_dataset(&data);
    let to = closed_port();
    let owner_key = keygen(&tmp.0, "owner.key").0.to_str().unwrap().to_string();
    let m = "00".repeat(32);
    let run = |extra: &[&str]| -> String {
        let mut args = vec![
            "upload",
            "--to",
            &to,
            "--key",
            &owner_key,
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(&["--expect-measurement", &m]);
        args.extend_from_slice(extra);
        let mut p = Proc::spawn("upload", &tmp.0, &args);
        let status = p.wait(DEADLINE);
        assert!(!status.success(), "{args:?} succeeded:\n{}", p.stderr());
        p.stderr()
    };
    let h48 = "00".repeat(48);
    let dcap = ["--attestation", "dcap", "--collateral", COLLATERAL];
    // Well-formed pins are accepted as far as the (closed) port.
    let mut ok = dcap.to_vec();
    ok.extend_from_slice(&["--expect-mrconfigid", &h48, "--expect-mrowner", &h48, "--expect-mrownerconfig", &h48]);
    ok.extend_from_slice(&["--expect-td-attributes", "0000001000000000"]);
    let err = run(&ok);
    assert!(err.contains(&format!("connecting to the enclave at {to}")), "{err}");
    // Wrong lengths name the flag and the size.
    for (flag, value, size) in [
        ("--expect-mrconfigid", "00", "96 hex digits (48 bytes)"),
        ("--expect-mrowner", &"00".repeat(32) as &str, "96 hex digits (48 bytes)"),
        ("--expect-mrownerconfig", &"00".repeat(49), "96 hex digits (48 bytes)"),
        ("--expect-td-attributes", &h48, "16 hex digits (8 bytes)"),
    ] {
        let mut args = dcap.to_vec();
        args.extend_from_slice(&[flag, value]);
        let err = run(&args);
        assert!(err.contains(&format!("{flag}: expected {size}")) && !err.contains("connecting"), "{err}");
    }
    let err = run(&["--expect-mrowner", &"zz".repeat(48), "--attestation", "dcap", "--collateral", COLLATERAL]);
    assert!(err.contains("--expect-mrowner: not hex"), "{err}");
    // They check TDX quotes, which simulated attestation never gives.
    let err = run(&["--attestation", "simulated", "--simulation-key", &m, "--expect-mrowner", &h48]);
    assert!(err.contains("apply to --attestation dcap only") && !err.contains("connecting"), "{err}");
}

#[test]
fn upload_help_lists_the_attestation_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_trustsplit")).args(["upload", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--insecure",
        "--allow-any-measurement",
        "--allow-debug",
        "--expect-measurement",
        "--expect-mrconfigid <HEX>",
        "--expect-mrowner <HEX>",
        "--expect-mrownerconfig <HEX>",
        "--expect-td-attributes <HEX>",
    ] {
        assert!(help.contains(flag), "{flag} missing from upload --help:\n{help}");
    }
    // Simulated attestation says it is insecure where it is offered.
    assert!(help.contains("simulated (INSECURE"), "{help}");
}
