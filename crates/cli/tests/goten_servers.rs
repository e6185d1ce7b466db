//! `--scheme goten` with its servers as processes: three `trustsplit goten-server` and one
//! `train --goten-servers` as their enclave, over authenticated, encrypted links on localhost; a
//! server started for another enclave's key is refused; the flags are checked before anything is
//! reached.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn trustsplit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trustsplit"))
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trustsplit-goten-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.key"));
    let out = trustsplit().args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (path, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

fn free_addrs() -> Vec<String> {
    let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect()
}

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the server listening on `addr` records what it sees.
fn record_dir(dir: &Path, addr: &str) -> PathBuf {
    dir.join(format!("record-{}", addr.replace([':', '.'], "-")))
}

/// Starts the three servers pinning `enclave_pub` and waits until each listens; server `r`
/// writes its transcript to `dir/server{r}.jsonl`.
fn start(addrs: &[String], keys: &[(PathBuf, String)], enclave_pub: &str, dir: &Path) -> Vec<Server> {
    let (tx, rx) = mpsc::channel();
    let servers = (0..3)
        .map(|role| {
            let mut child = trustsplit()
                .args(["goten-server", "--role", &role.to_string(), "--listen", &addrs[role], "--key"])
                .arg(&keys[role].0)
                .args(["--enclave-key", enclave_pub, "--transcript"])
                .arg(dir.join(format!("server{role}.jsonl")))
                .arg("--record")
                .arg(record_dir(dir, &addrs[role]))
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = child.stderr.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening on") {
                        let _ = tx.send(role);
                    }
                }
            });
            Server(child)
        })
        .collect();
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(60)).expect("a goten server did not start");
    }
    servers
}

fn train(
    dir: &Path,
    addrs: &[String],
    keys: &[(PathBuf, String)],
    enclave_key: &Path,
    more: &[&str],
) -> std::process::Output {
    let pubs: Vec<&str> = keys.iter().map(|(_, k)| k.as_str()).collect();
    trustsplit()
        .args(["train", "--scheme", "goten", "--train-limit", "96", "--test-limit", "64", "--json"])
        .args(more)
        .args(["--goten-offline", "--goten-servers", &addrs.join(","), "--goten-keys", &pubs.join(","), "--key"])
        .arg(enclave_key)
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap()
}

#[test]
fn three_server_processes_serve_the_enclave_new_ones_resume_the_run_and_another_enclaves_key_is_refused() {
    let dir = temp("servers");
    let keys: Vec<(PathBuf, String)> = (0..3).map(|i| keygen(&dir, &format!("server{i}"))).collect();
    let enclave = keygen(&dir, "enclave");

    let addrs = free_addrs();
    let mut servers = start(&addrs, &keys, &enclave.1, &dir);
    let out = train(&dir, &addrs, &keys, &enclave.0, &["--epochs", "1"]);
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{:?}: {err}", out.status);
    let all = format!("{stdout}{err}");
    assert!(all.contains("goten offline:") && all.contains("products on shares"), "{all}");
    for (role, s) in servers.iter_mut().enumerate() {
        let status = s.0.wait().unwrap();
        assert!(status.success(), "server {role} exited with {status}");
        // Its own transcript: only its shares and masks came in, only its partial result went out.
        let text = std::fs::read_to_string(dir.join(format!("server{role}.jsonl"))).unwrap();
        let allowed: &[&str] = match role {
            0 => &["A0", "B0", "E", "F", "CM0", "C0"],
            1 => &["A1", "B1", "E", "F", "CM1", "C1"],
            _ => &["U", "V", "CMZ", "Z"],
        };
        assert!(text.lines().count() > 10, "{text}");
        let mut digests = std::collections::BTreeSet::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let kind = v["kind"].as_str().unwrap();
            let name = kind.strip_prefix(&format!("server {role}: ")).unwrap_or(kind);
            assert!(allowed.contains(&name), "server {role} recorded {kind}");
            digests.insert(v["sha256"].as_str().unwrap().to_string());
        }
        // Its recording holds the values its transcript names, under the same names.
        let index = std::fs::read_to_string(record_dir(&dir, &addrs[role]).join("index.jsonl")).unwrap();
        for line in index.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for t in v["tensors"].as_array().unwrap() {
                assert!(allowed.contains(&t["name"].as_str().unwrap()), "server {role} recorded {t}");
                assert!(digests.contains(t["sha256"].as_str().unwrap()), "server {role}: {t} is not in its transcript");
            }
        }
    }

    // Fresh server processes (elsewhere: new addresses) continue the run from its checkpoint.
    let addrs = free_addrs();
    let _servers = start(&addrs, &keys, &enclave.1, &dir);
    let out = train(&dir, &addrs, &keys, &enclave.0, &["--epochs", "2", "--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["resumed_from_epoch"].as_u64(), v["epochs"].as_u64()), (Some(1), Some(2)), "{v}");

    // Servers that pin another enclave refuse this one; the error names the first.
    let other = keygen(&dir, "other");
    let addrs = free_addrs();
    let _servers = start(&addrs, &keys, &other.1, &dir);
    let out = train(&dir, &addrs, &keys, &enclave.0, &["--epochs", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot reach goten server 0"), "{err}");

    // Flags: servers without keys, or without this side's key.
    let out = trustsplit()
        .args(["train", "--scheme", "goten", "--goten-servers", &addrs.join(","), "--out"])
        .arg(dir.join("run2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--goten-servers needs --key FILE"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
