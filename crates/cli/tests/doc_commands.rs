//! A newcomer's path as a test: every ```` ```sh ```` block of README.md and docs/**/*.md runs, in
//! order, each with bash (`set -euo pipefail`) in a fresh temporary folder, with small settings.
//!
//! `cargo test -p trustsplit --test doc_commands -- --ignored` runs them (ignored by default: it
//! starts many processes); the unit test below checks the extraction and the rewrite rules.
//!
//! A block may be preceded (blank lines between are allowed) by one marker line:
//! - `<!-- doc-commands: skip: REASON -->`: not run (it needs SGX hardware, a GPU, the internet,
//!   `cargo test` itself...); reported as skipped with the reason;
//! - `<!-- doc-commands: expect-failure -->`: must exit with a failure (e.g. `data fetch` offline).
//!
//! The rewrite rules, applied to each block before it runs, and nothing else:
//! 1. The binary: `cargo run --release -p trustsplit --` and the command word `trustsplit` (at the
//!    start of a command or of a quoted string) become the binary under test.
//! 2. Small settings, on each `trustsplit` command (a flag already given gets the small value
//!    instead): `train` and `enclave` get `--epochs 1` unless they ask for 1 or 2 (so that a
//!    `--resume` example can continue a 1-epoch run to 2), and `train` also gets
//!    `--train-limit 256 --test-limit 128`; `privacy-report` gets `--epochs 1 --train-limit 256
//!    --test-limit 128 --public-samples 128 --attack-steps 20`; `bench step` gets `--steps 1 --warmup 0 --batch-size 2`; `bench kernels` gets
//!    `--repeats 1 --vgg-batch 2 --threads 1`; `data fetch` without `--archive` gets `--url` of a
//!    closed local port, which stands for a machine without internet access (the test never
//!    downloads anything). A command with `--help` is left alone.
//! 3. Datasets: `/usr/share/datasets/` becomes the block folder's `datasets/`, which holds small
//!    stand-ins of `fashion-mnist/` and `mnist/` (IDX files of 256 training and 128 test images of
//!    noise); the block folder's `data/` holds small stand-ins of CIFAR-10 and CIFAR-100 in the
//!    folders their archives unpack to (`cifar-10-batches-bin/`, `cifar-100-binary/`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one block may run before it counts as failed (and its processes are killed).
const BLOCK_LIMIT: Duration = Duration::from_secs(150);

/// What a marker line asks of the block after it.
#[derive(Debug, Clone, PartialEq)]
enum Mark {
    Run,
    Skip(String),
    ExpectFailure,
}

/// One ```` ```sh ```` block.
#[derive(Debug)]
struct Block {
    file: String,
    /// 1-based line of the opening fence.
    line: usize,
    mark: Mark,
    script: String,
}

impl Block {
    fn first_line(&self) -> &str {
        self.script.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
    }
}

/// The ```` ```sh ```` blocks of one markdown file, with their markers. Other fenced blocks are
/// passed over; a marker that is not followed by a `sh` block, or that cannot be read, panics.
fn extract(file: &str, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut pending: Option<(usize, Mark)> = None;
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("<!-- doc-commands:") {
            let rest = rest.trim().strip_suffix("-->").map(str::trim);
            let mark = match rest {
                Some("expect-failure") => Mark::ExpectFailure,
                Some(r) if r.starts_with("skip:") && !r["skip:".len()..].trim().is_empty() => {
                    Mark::Skip(r["skip:".len()..].trim().to_string())
                }
                _ => panic!("{file}:{}: cannot read the marker {t:?}", i + 1),
            };
            assert!(pending.is_none(), "{file}:{}: two markers in a row", i + 1);
            pending = Some((i + 1, mark));
            continue;
        }
        if let Some(info) = t.strip_prefix("```") {
            let is_sh = info.trim() == "sh";
            let mut script = String::new();
            for (_, body) in lines.by_ref() {
                if body.trim() == "```" {
                    break;
                }
                script.push_str(body);
                script.push('\n');
            }
            let mark = pending.take().map(|(_, m)| m);
            if is_sh {
                blocks.push(Block { file: file.to_string(), line: i + 1, mark: mark.unwrap_or(Mark::Run), script });
            } else {
                assert!(mark.is_none(), "{file}:{}: a doc-commands marker before a block that is not ```sh", i + 1);
            }
            continue;
        }
        if !t.is_empty() {
            if let Some((at, _)) = pending {
                panic!("{file}:{at}: a doc-commands marker not followed by a ```sh block");
            }
        }
    }
    if let Some((at, _)) = pending {
        panic!("{file}:{at}: a doc-commands marker at the end of the file");
    }
    blocks
}

/// Sets `flag` to `value` in `tokens`: replaces its value where it is given, appends it otherwise.
fn set_flag(tokens: &mut Vec<String>, flag: &str, value: &str) {
    if let Some(i) = tokens.iter().position(|t| t == flag) {
        if i + 1 < tokens.len() {
            tokens[i + 1] = value.to_string();
            return;
        }
        tokens.push(value.to_string());
        return;
    }
    let prefix = format!("{flag}=");
    if let Some(t) = tokens.iter_mut().find(|t| t.starts_with(&prefix)) {
        *t = format!("{flag}={value}");
        return;
    }
    tokens.push(flag.to_string());
    tokens.push(value.to_string());
}

/// Rule 2: the small settings for one command's arguments (after the binary).
fn small_settings(args: &str) -> String {
    let mut tokens: Vec<String> = args.split_whitespace().map(String::from).collect();
    if tokens.iter().any(|t| t == "--help" || t == "-h") {
        return tokens.join(" ");
    }
    let words: Vec<String> = tokens.iter().take(2).cloned().collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let flags: &[(&str, &str)] = match words.as_slice() {
        ["train", ..] => &[("--train-limit", "256"), ("--test-limit", "128")],
        ["privacy-report", ..] => &[
            ("--epochs", "1"),
            ("--train-limit", "256"),
            ("--test-limit", "128"),
            ("--public-samples", "128"),
            ("--attack-steps", "20"),
        ],
        ["bench", "step"] => &[("--steps", "1"), ("--warmup", "0"), ("--batch-size", "2")],
        ["bench", "kernels"] => &[("--repeats", "1"), ("--vgg-batch", "2"), ("--threads", "1")],
        ["data", "fetch"] if !tokens.iter().any(|t| t == "--archive" || t.starts_with("--archive=")) => {
            &[("--url", "http://127.0.0.1:9/no-internet-here.tar.gz")]
        }
        _ => &[],
    };
    for (flag, value) in flags {
        set_flag(&mut tokens, flag, value);
    }
    if matches!(words.first(), Some(&"train" | &"enclave")) {
        let epochs = tokens.iter().position(|t| t == "--epochs").and_then(|i| tokens.get(i + 1)).cloned();
        let epochs = epochs.or_else(|| tokens.iter().find_map(|t| t.strip_prefix("--epochs=").map(String::from)));
        if epochs.and_then(|e| e.parse::<u32>().ok()).is_none_or(|e| e > 2) {
            set_flag(&mut tokens, "--epochs", "1");
        }
    }
    tokens.join(" ")
}

/// Where the `trustsplit` command that starts at byte `at` of `line` ends: at the first shell
/// operator, redirection or comment, or at `quote` where the command opened a quoted string (a
/// `2>` ends it before its digit).
fn command_end(line: &str, at: usize, quote: Option<char>) -> usize {
    let bytes = line.as_bytes();
    let stop = |c: char| "&;|<>)#`".contains(c) || Some(c) == quote;
    let mut end = line[at..].find(stop).map_or(line.len(), |i| at + i);
    if end < line.len() && bytes[end] == b'>' && end > at && bytes[end - 1].is_ascii_digit() {
        end -= 1;
    }
    end
}

/// Rules 1 to 3 on a whole block (lines continued with `\` are joined first).
fn rewrite(script: &str, bin: &str, datasets: &str) -> String {
    let joined = script.replace("\\\n", " ");
    let mut out = String::new();
    for line in joined.lines() {
        let line = line
            .replace("cargo run --release -p trustsplit --", "trustsplit")
            .replace("/usr/share/datasets/", datasets);
        let mut rest = line.as_str();
        let mut done = String::new();
        const WORD: &str = "trustsplit";
        loop {
            let Some(i) = rest.find(WORD) else {
                done.push_str(rest);
                break;
            };
            let before = &rest[..i];
            let prev = done.chars().chain(before.chars()).last();
            let next = rest[i + WORD.len()..].chars().next();
            let command_word = prev.is_none_or(|c| " \t\"'(;|&`".contains(c))
                && next.is_none_or(char::is_whitespace)
                && !format!("{done}{before}").trim_end().ends_with("-p");
            if !command_word {
                done.push_str(&rest[..i + WORD.len()]);
                rest = &rest[i + WORD.len()..];
                continue;
            }
            let quote = prev.filter(|c| *c == '"' || *c == '\'');
            let end = command_end(rest, i + WORD.len(), quote);
            let args = small_settings(&rest[i + WORD.len()..end]);
            let tail = &rest[end..];
            done.push_str(before);
            done.push_str(bin);
            if !args.is_empty() {
                done.push(' ');
                done.push_str(&args);
            }
            // The space that separated the command from what follows, if there was one.
            if !tail.is_empty() && rest[..end].ends_with(char::is_whitespace) {
                done.push(' ');
            }
            rest = tail;
        }
        out.push_str(&done);
        out.push('\n');
    }
    out
}

/// The markdown files the test reads: README.md, then docs/**/*.md in path order.
fn documents(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "md") {
                found.push(path);
            }
        }
    }
    let mut files = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut files);
    files
}

/// Deterministic pseudo-random bytes (xorshift64*), below `modulus`.
fn noise(n: usize, modulus: u8, seed: u64) -> Vec<u8> {
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

/// An IDX file: the magic (unsigned bytes, the number of dimensions), the sizes, the data.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// CIFAR records: `label_bytes` labels below `classes`, then a 3x32x32 image of noise.
fn cifar(records: usize, label_bytes: usize, classes: u8, seed: u64) -> Vec<u8> {
    let labels = noise(records * label_bytes, classes, seed);
    let images = noise(records * 3072, 255, seed + 1);
    let mut out = Vec::new();
    for r in 0..records {
        out.extend_from_slice(&labels[r * label_bytes..(r + 1) * label_bytes]);
        out.extend_from_slice(&images[r * 3072..(r + 1) * 3072]);
    }
    out
}

/// Rule 3's stand-ins, in a block's folder.
fn write_stand_ins(dir: &Path) {
    for name in ["fashion-mnist", "mnist"] {
        let d = dir.join("datasets").join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (prefix, n, seed) in [("train", 256u32, 1), ("t10k", 128, 2)] {
            std::fs::write(
                d.join(format!("{prefix}-images-idx3-ubyte")),
                idx(&[n, 28, 28], &noise(n as usize * 784, 255, seed)),
            )
            .unwrap();
            std::fs::write(d.join(format!("{prefix}-labels-idx1-ubyte")), idx(&[n], &noise(n as usize, 10, seed + 10)))
                .unwrap();
        }
    }
    let c10 = dir.join("data/cifar-10-batches-bin");
    std::fs::create_dir_all(&c10).unwrap();
    for i in 1..=5 {
        std::fs::write(c10.join(format!("data_batch_{i}.bin")), cifar(64, 1, 10, i)).unwrap();
    }
    std::fs::write(c10.join("test_batch.bin"), cifar(128, 1, 10, 9)).unwrap();
    let c100 = dir.join("data/cifar-100-binary");
    std::fs::create_dir_all(&c100).unwrap();
    std::fs::write(c100.join("train.bin"), cifar(256, 2, 20, 11)).unwrap();
    std::fs::write(c100.join("test.bin"), cifar(128, 2, 20, 12)).unwrap();
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills what is left of a block's process group (background servers it did not stop).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs one block in `dir`; `Err` says why it did not do what its marker asks.
fn run_block(block: &Block, dir: &Path, bin: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).unwrap();
    write_stand_ins(dir);
    let datasets = format!("{}/", dir.join("datasets").display());
    let script = format!("set -euo pipefail\n{}", rewrite(&block.script, bin, &datasets));
    std::fs::write(dir.join("block.sh"), &script).unwrap();
    let stdout = std::fs::File::create(dir.join("stdout")).unwrap();
    let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
    let mut child = std::os::unix::process::CommandExt::process_group(
        Command::new("bash").arg("block.sh").current_dir(dir).stdin(Stdio::null()).stdout(stdout).stderr(stderr),
        0,
    )
    .spawn()
    .expect("cannot start bash");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > BLOCK_LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill_group(child.id());
    let _ = child.wait();
    let err = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let why = match (status, &block.mark) {
        (None, _) => format!("did not finish within {BLOCK_LIMIT:?}"),
        (Some(s), Mark::ExpectFailure) if s.success() => "succeeded, but is marked expect-failure".to_string(),
        (Some(s), Mark::Run) if !s.success() => format!("failed ({s})"),
        _ => return Ok(()),
    };
    Err(format!(
        "{}:{}: the block starting `{}` {why}\nas run ({}):\n{script}\nstderr (last 25 lines):\n{}",
        block.file,
        block.line,
        block.first_line(),
        dir.join("block.sh").display(),
        tail(&err, 25)
    ))
}

#[test]
#[ignore = "runs every command block of the README and docs (many processes; about a minute)"]
fn every_documented_command_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = env!("CARGO_BIN_EXE_trustsplit");
    assert!(!bin.contains(char::is_whitespace), "the binary's path has a space: {bin}");
    let base = std::env::temp_dir().join(format!("trustsplit-doc-commands-{}", std::process::id()));
    let mut blocks = Vec::new();
    for path in documents(&root) {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.strip_prefix(&root).unwrap_or(&path).display().to_string();
        blocks.extend(extract(&name, &text));
    }
    assert!(blocks.iter().any(|b| b.file == "README.md"), "README.md has no ```sh block");
    let (mut ran, mut skipped, mut failures) = (0, 0, Vec::new());
    let mut log = std::io::stderr();
    for (n, block) in blocks.iter().enumerate() {
        if let Mark::Skip(reason) = &block.mark {
            skipped += 1;
            let _ = writeln!(log, "skipped {}:{} `{}`: {reason}", block.file, block.line, block.first_line());
            continue;
        }
        let dir = base.join(format!("{n:02}"));
        let start = Instant::now();
        let result = run_block(block, &dir, bin);
        ran += 1;
        let verdict = if result.is_ok() { "ok" } else { "FAILED" };
        let _ = writeln!(
            log,
            "{verdict} {}:{} `{}` ({:.1} s)",
            block.file,
            block.line,
            block.first_line(),
            start.elapsed().as_secs_f64()
        );
        match result {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e) => failures.push(e),
        }
    }
    let _ = writeln!(log, "doc commands: {ran} blocks run, {skipped} skipped, {} failed", failures.len());
    assert!(failures.is_empty(), "{} documented block(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn blocks_and_rewrite_rules() {
    let md = "# Title\n\n\
```sh\n\
cargo run --release -p trustsplit -- train --epochs 5 --json   # the main job\n\
cargo test --workspace\n\
```\n\n\
<!-- doc-commands: skip: needs SGX hardware -->\n\n\
```sh\n\
gramine-sgx trustsplit\n\
```\n\
```text\n\
trustsplit train (not a command block)\n\
```\n\
<!-- doc-commands: expect-failure -->\n\
```sh\n\
trustsplit data fetch cifar10 --data-dir data\n\
```\n\
```sh\n\
trustsplit device --listen 127.0.0.1:0 2> worker.log &\n\
trustsplit bench step --scheme asymml --model vgg16 \\\n    --batch-size 32 --json\n\
for z in 0 8; do trustsplit train --epochs=3 --data-dir /usr/share/datasets/fashion-mnist --noise-multiplier $z; done\n\
cargo build --release -p trustsplit && trustsplit bench kernels\n\
B=\"trustsplit eval --checkpoint runs/c.safetensors\"; trustsplit train --help\n\
trustsplit train --epochs 2 --resume --device \"tcp://$addr\" > out.json\n\
```\n";
    let blocks = extract("x.md", md);
    assert_eq!(blocks.len(), 4, "{blocks:?}");
    assert_eq!(blocks[0].mark, Mark::Run);
    assert_eq!(blocks[0].line, 3);
    assert_eq!(blocks[1].mark, Mark::Skip("needs SGX hardware".into()));
    assert_eq!(blocks[1].first_line(), "gramine-sgx trustsplit");
    assert_eq!(blocks[2].mark, Mark::ExpectFailure);
    assert_eq!(blocks[3].mark, Mark::Run);

    let r = |b: &Block| rewrite(&b.script, "/b/ts", "/t/datasets/");
    assert_eq!(
        r(&blocks[0]),
        "/b/ts train --epochs 1 --json --train-limit 256 --test-limit 128 # the main job\ncargo test --workspace\n"
    );
    assert_eq!(r(&blocks[1]), "gramine-sgx /b/ts\n");
    assert_eq!(
        r(&blocks[2]),
        "/b/ts data fetch cifar10 --data-dir data --url http://127.0.0.1:9/no-internet-here.tar.gz\n"
    );
    let lines: Vec<String> = r(&blocks[3]).lines().map(String::from).collect();
    assert_eq!(lines[0], "/b/ts device --listen 127.0.0.1:0 2> worker.log &");
    assert_eq!(lines[1], "/b/ts bench step --scheme asymml --model vgg16 --batch-size 2 --json --steps 1 --warmup 0");
    assert_eq!(
        lines[2],
        "for z in 0 8; do /b/ts train --epochs=1 --data-dir /t/datasets/fashion-mnist --noise-multiplier $z \
         --train-limit 256 --test-limit 128; done"
    );
    assert_eq!(
        lines[3],
        "cargo build --release -p trustsplit && /b/ts bench kernels --repeats 1 --vgg-batch 2 --threads 1"
    );
    assert_eq!(lines[4], "B=\"/b/ts eval --checkpoint runs/c.safetensors\"; /b/ts train --help");
    assert_eq!(
        lines[5],
        "/b/ts train --epochs 2 --resume --device \"tcp://$addr\" --train-limit 256 --test-limit 128 > out.json"
    );

    // Markers are read strictly.
    let bad = std::panic::catch_unwind(|| extract("y.md", "<!-- doc-commands: skip -->\n```sh\nls\n```\n"));
    assert!(bad.is_err(), "a skip without a reason is refused");
    let stray =
        std::panic::catch_unwind(|| extract("z.md", "<!-- doc-commands: expect-failure -->\ntext\n```sh\nls\n```\n"));
    assert!(stray.is_err(), "a marker must be followed by its block");
}
