//! `--scheme cryptgpu` with its parties as processes: three `trustsplit party` and one `train
//! --peers` as their data owner, over authenticated, encrypted links on localhost; then a party
//! killed before the run, which the owner names; the owner's flags, checked before anything is
//! reached; and where the parties run left out of a run's recorded settings.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

fn trustsplit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trustsplit"))
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trustsplit-parties-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A key file made by `trustsplit keygen`, and its public key.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.key"));
    let out = trustsplit().args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (path, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

/// Three free localhost ports (bound, then released for the parties to listen on).
fn free_addrs() -> Vec<String> {
    let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect()
}

/// The keys of a run: the three parties' and the owner's.
struct Keys {
    parties: Vec<(PathBuf, String)>,
    owner: (PathBuf, String),
}

impl Keys {
    fn new(dir: &Path) -> Keys {
        Keys { parties: (0..3).map(|i| keygen(dir, &format!("party{i}"))).collect(), owner: keygen(dir, "owner") }
    }

    fn party_keys(&self) -> String {
        self.parties.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>().join(",")
    }
}

/// A `trustsplit party` process and what it has printed; killed when dropped.
struct PartyProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl PartyProcess {
    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit; its success.
    fn wait(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The last lines may still be in the reader thread.
                std::thread::sleep(Duration::from_millis(100));
                return status.success();
            }
            assert!(start.elapsed() < limit, "the party did not exit:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PartyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the three parties and waits until each has linked with the other two.
fn start_parties(addrs: &[String], keys: &Keys) -> Vec<PartyProcess> {
    start_parties_with_stores(addrs, keys, None)
}

/// [`start_parties`], party `i` keeping uploads in `stores/party{i}` when `stores` is given.
fn start_parties_with_stores(addrs: &[String], keys: &Keys, stores: Option<&Path>) -> Vec<PartyProcess> {
    let (ready_tx, ready) = mpsc::channel();
    let parties: Vec<PartyProcess> = (0..3)
        .map(|id| {
            let mut child = trustsplit()
                .args(["party", "--id", &id.to_string(), "--listen", &addrs[id], "--peers", &addrs.join(",")])
                .arg("--key")
                .arg(&keys.parties[id].0)
                .args(["--party-keys", &keys.party_keys(), "--owner-key", &keys.owner.1, "--wait-s", "60"])
                .args(stores.map(|d| format!("--store={}", d.join(format!("party{id}")).display())))
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = child.stderr.take().unwrap();
            let lines = Arc::new(Mutex::new(Vec::new()));
            let (seen, ready_tx) = (lines.clone(), ready_tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains(&format!("party {id} ready")) {
                        let _ = ready_tx.send(id);
                    }
                    seen.lock().unwrap().push(line);
                }
            });
            PartyProcess { child, lines }
        })
        .collect();
    for _ in 0..3 {
        if ready.recv_timeout(Duration::from_secs(60)).is_err() {
            let outputs: Vec<String> = parties.iter().map(PartyProcess::output).collect();
            panic!("the parties did not link:\n{}", outputs.join("\n---\n"));
        }
    }
    parties
}

/// `train` as the parties' data owner.
fn train(dir: &Path, addrs: &[String], keys: &Keys) -> Output {
    train_with(dir, addrs, keys, &[])
}

fn train_with(dir: &Path, addrs: &[String], keys: &Keys, extra: &[&str]) -> Output {
    trustsplit()
        .args(["train", "--scheme", "cryptgpu", "--model", "lenet", "--epochs", "1", "--train-limit", "128"])
        .args(["--test-limit", "64", "--batch-size", "32", "--peers", &addrs.join(","), "--party-keys"])
        .arg(keys.party_keys())
        .arg("--key")
        .arg(&keys.owner.0)
        .arg("--out")
        .arg(dir.join("run"))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn the_owner_uploads_once_and_trains_on_the_parties_stores() {
    let dir = temp("upload");
    let keys = Keys::new(&dir);
    let stores = dir.join("stores");

    let addrs = free_addrs();
    let mut parties = start_parties_with_stores(&addrs, &keys, Some(&stores));
    let out = trustsplit()
        .args(["upload", "--scheme", "cryptgpu", "--to", &addrs.join(","), "--party-keys", &keys.party_keys()])
        .arg("--key")
        .arg(&keys.owner.0)
        .args(["--dataset", "embedded", "--name", "emb", "--train-limit", "128", "--test-limit", "64"])
        .output()
        .unwrap();
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(stdout.contains("128 training and 64 test samples") && stdout.contains("--uploaded emb"), "{stdout}");
    for (id, p) in parties.iter_mut().enumerate() {
        assert!(p.wait(Duration::from_secs(30)), "party {id} failed:\n{}", p.output());
        for split in ["train", "test"] {
            let file = stores.join(format!("party{id}")).join(format!("emb.{split}.party{id}.shares"));
            assert!(file.is_file(), "{} is missing", file.display());
        }
    }

    // Training on the stores: each step sends record numbers only.
    let addrs = free_addrs();
    let mut parties = start_parties_with_stores(&addrs, &keys, Some(&stores));
    let out = train_with(&dir, &addrs, &keys, &["--uploaded", "emb"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    for id in 0..3 {
        assert!(err.contains(&format!("party {id}: sent")), "{err}");
    }
    for (id, p) in parties.iter_mut().enumerate() {
        assert!(p.wait(Duration::from_secs(30)), "party {id} failed:\n{}", p.output());
    }

    // The owner's copy is not what was uploaded (fewer samples): every party refuses the run.
    let addrs = free_addrs();
    let _parties = start_parties_with_stores(&addrs, &keys, Some(&stores));
    let out = trustsplit()
        .args(["train", "--scheme", "cryptgpu", "--model", "lenet", "--train-limit", "96", "--test-limit", "64"])
        .args(["--peers", &addrs.join(","), "--party-keys", &keys.party_keys(), "--uploaded", "emb", "--key"])
        .arg(&keys.owner.0)
        .arg("--out")
        .arg(dir.join("run-other"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is not the data the owner holds"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn three_party_processes_train_for_the_owner_and_a_dead_party_is_named() {
    let dir = temp("train");
    let keys = Keys::new(&dir);

    let addrs = free_addrs();
    let mut parties = start_parties(&addrs, &keys);
    let out = train(&dir, &addrs, &keys);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    for id in 0..3 {
        assert!(err.contains(&format!("party {id}: sent")), "{err}");
    }
    for (id, p) in parties.iter_mut().enumerate() {
        assert!(p.wait(Duration::from_secs(30)), "party {id} failed:\n{}", p.output());
        assert!(p.output().contains(&format!("party {id}: the run ended")), "{}", p.output());
    }

    // A party killed after linking: the owner cannot reach it and says which; the others,
    // whose owner then leaves, stop instead of waiting for ever.
    let addrs = free_addrs();
    let mut parties = start_parties(&addrs, &keys);
    parties[1].child.kill().unwrap();
    let out = train(&dir, &addrs, &keys);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("cannot reach party 1 at {}", addrs[1])), "{err}");
    for id in [0, 2] {
        assert!(!parties[id].wait(Duration::from_secs(30)), "party {id} succeeded:\n{}", parties[id].output());
        assert!(parties[id].output().contains("the data owner"), "{}", parties[id].output());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn peers_without_keys_is_a_clear_error() {
    let dir = temp("keys");
    let keys = Keys::new(&dir);
    let addrs = free_addrs().join(",");
    let base = ["train", "--scheme", "cryptgpu", "--model", "lenet", "--train-limit", "32", "--test-limit", "32"];
    let base = || {
        let mut command = trustsplit();
        command.args(base).arg("--out").arg(dir.join("run"));
        command
    };

    let out = base().args(["--peers", &addrs, "--party-keys", &keys.party_keys()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--peers needs --key FILE"), "{err}");

    let out = base().args(["--peers", &addrs, "--key"]).arg(&keys.owner.0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--peers needs --party-keys"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn where_the_parties_run_is_not_part_of_a_runs_recorded_settings() {
    // Checkpoints record the serialised settings and `--resume` compares them: a run started on
    // threads may go on with party processes, and the reverse.
    let local = trustsplit::train::TrainConfig::new("lenet", "embedded");
    let mut remote = local.clone();
    remote.options.cryptgpu.peers = vec!["a:7100".into(), "b:7100".into(), "c:7100".into()];
    let key = trustsplit_boundary::KeyPair::generate().unwrap().public();
    remote.options.cryptgpu.party_keys = vec![key; 3];
    assert_eq!(serde_json::to_value(&local).unwrap(), serde_json::to_value(&remote).unwrap());
}
