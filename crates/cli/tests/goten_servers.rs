//! `--scheme goten` with its servers as processes: three `trustsplit goten-server` and one
//! `train --goten-servers` as their enclave, over authenticated, encrypted links on localhost; a
//! server started for another enclave's key is refused; the flags are checked before anything is
//! reached. Then as Goten runs it: two `train --goten-role` enclaves (servers 0 and 1) and one
//! `goten-server --role 2`, training in step; an enclave that dies ends the other's run.

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

/// `train --goten-role ROLE` as the enclave of server ROLE, linked with the other at `peer`.
fn enclave(role: usize, dir: &Path, peer: &str, keys: &[(PathBuf, String)], server2: &str, more: &[&str]) -> Child {
    let mut cmd = trustsplit();
    cmd.args(["train", "--scheme", "goten", "--train-limit", "96", "--test-limit", "64", "--seed", "5", "--json"])
        .args(more)
        .args(["--goten-role", &role.to_string(), "--goten-peer", peer, "--goten-peer-key", &keys[1 - role].1])
        .arg("--key")
        .arg(&keys[role].0)
        .arg("--transcript")
        .arg(dir.join(format!("enclave{role}.jsonl")))
        .arg("--out")
        .arg(dir.join(format!("run{role}")));
    if role == 0 {
        cmd.args(["--goten-servers", server2, "--goten-keys", &keys[2].1]);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// `goten-server --role 2` on `addr`, pinning enclave 0's key (`keys[0]`), once it listens.
fn start_server2(addr: &str, keys: &[(PathBuf, String)]) -> Server {
    let mut child = trustsplit()
        .args(["goten-server", "--role", "2", "--listen", addr, "--key"])
        .arg(&keys[2].0)
        .args(["--enclave-key", &keys[0].1])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("listening on"));
    std::thread::spawn(move || lines.for_each(drop));
    Server(child)
}

#[test]
fn two_enclave_processes_train_in_step_with_server_2_and_one_that_dies_ends_the_other_s_run() {
    let dir = temp("enclaves");
    // Enclaves 0 and 1, and server 2.
    let keys: Vec<(PathBuf, String)> = (0..3).map(|i| keygen(&dir, &format!("party{i}"))).collect();
    let addrs = free_addrs();
    let server2 = start_server2(&addrs[2], &keys);
    // Enclave 1 first: it dials until enclave 0 listens.
    let one = enclave(1, &dir, &addrs[0], &keys, &addrs[2], &["--epochs", "1", "--goten-offline"]);
    let zero = enclave(0, &dir, &addrs[0], &keys, &addrs[2], &["--epochs", "1", "--goten-offline"]);
    let (out0, out1) = (zero.wait_with_output().unwrap(), one.wait_with_output().unwrap());
    drop(server2);
    for (role, out) in [&out0, &out1].into_iter().enumerate() {
        assert!(out.status.success(), "enclave {role}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (v0, v1): (serde_json::Value, serde_json::Value) =
        (serde_json::from_slice(&out0.stdout).unwrap(), serde_json::from_slice(&out1.stdout).unwrap());
    // The same training on both: the same accuracy and losses, to the last bit.
    for field in ["accuracy", "loss", "train_loss", "steps"] {
        assert_eq!(v0[field], v1[field], "{field}: {v0} / {v1}");
    }
    // Each enclave's transcript: its own server's operands, server 2's for enclave 0, and the
    // other server's masked partial result; never the other server's operands.
    for role in 0..2 {
        let text = std::fs::read_to_string(dir.join(format!("enclave{role}.jsonl"))).unwrap();
        let mut kinds = std::collections::BTreeSet::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            kinds.insert(v["kind"].as_str().unwrap().to_string());
        }
        let expected: Vec<String> = if role == 0 {
            ["A0", "B0", "E", "F", "CM0", "C0", "C1 (from enclave 1)"]
                .iter()
                .map(|k| format!("server 0: {k}"))
                .chain(["U", "V", "CMZ", "Z"].iter().map(|k| format!("server 2: {k}")))
                .collect()
        } else {
            ["A1", "B1", "E", "F", "CM1", "C1", "C0 (from enclave 0)", "Z (from enclave 0)"]
                .iter()
                .map(|k| format!("server 1: {k}"))
                .collect()
        };
        assert_eq!(kinds, expected.into_iter().collect(), "enclave {role}");
    }

    // Enclave 1 dies mid-run: enclave 0 stops with an error that names it.
    let addrs = free_addrs();
    let server2 = start_server2(&addrs[2], &keys);
    let more = ["--epochs", "30"];
    let mut one = Server(enclave(1, &dir, &addrs[0], &keys, &addrs[2], &more));
    let zero = enclave(0, &dir, &addrs[0], &keys, &addrs[2], &more);
    // Let them link and start, then kill enclave 1.
    std::thread::sleep(Duration::from_secs(3));
    let _ = one.0.kill();
    let out = zero.wait_with_output().unwrap();
    drop(server2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("goten enclave 1"), "{err}");

    // Both resume from their checkpoints (the same epoch) and finish the run in step.
    let addrs = free_addrs();
    let _server2 = start_server2(&addrs[2], &keys);
    let more = ["--epochs", "30", "--resume"];
    let one = enclave(1, &dir, &addrs[0], &keys, &addrs[2], &more);
    let zero = enclave(0, &dir, &addrs[0], &keys, &addrs[2], &more);
    let (out0, out1) = (zero.wait_with_output().unwrap(), one.wait_with_output().unwrap());
    for (role, out) in [&out0, &out1].into_iter().enumerate() {
        assert!(out.status.success(), "enclave {role}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (v0, v1): (serde_json::Value, serde_json::Value) =
        (serde_json::from_slice(&out0.stdout).unwrap(), serde_json::from_slice(&out1.stdout).unwrap());
    assert!(v0["resumed_from_epoch"].as_u64().unwrap() > 0, "{v0}");
    for field in ["resumed_from_epoch", "accuracy", "loss"] {
        assert_eq!(v0[field], v1[field], "{field}: {v0} / {v1}");
    }

    // Flags: a role without its peer; enclave 1 given server 2.
    let out = trustsplit()
        .args(["train", "--scheme", "goten", "--goten-role", "0", "--out"])
        .arg(dir.join("run3"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--goten-role needs --goten-peer"), "{err}");
    let out = trustsplit()
        .args(["train", "--scheme", "goten", "--goten-role", "1", "--goten-peer", &addrs[0], "--goten-peer-key"])
        .arg(&keys[0].1)
        .arg("--key")
        .arg(&keys[1].0)
        .args(["--goten-servers", &addrs[2], "--goten-keys", &keys[2].1, "--out"])
        .arg(dir.join("run3"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("enclave 1 reaches only enclave 0"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
