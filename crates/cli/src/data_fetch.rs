//! `trustsplit data fetch`: the CIFAR binary archives, downloaded from their authors' site (or
//! taken from a copy the user already has), checked against pinned SHA-256 digests and sizes, and
//! unpacked into the folder `--dataset cifar10|cifar100 --data-dir DIR` reads.
//!
//! Nothing is trusted before its digest matches: the download goes to a hidden partial file that
//! is renamed into place only once its size and digest are right, and only the archive's known
//! members are unpacked (each to a partial file, then renamed), so an interrupted run leaves no
//! file that looks complete. The unpacked files are then parsed by the same loader training uses.
//!
//! Downloads go through `ureq` over rustls, without gzip decoding, so an archive's bytes arrive as
//! published and its digest holds. A cut download is kept and resumed by a range request (the whole
//! file's digest still decides); a range that does not continue the kept part is refused.
//! `--archive` takes a copy the user already has instead.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use trustsplit_data::DatasetKind;
use trustsplit_enclave::attestation::hex;

use crate::progress;

/// One dataset's official archive and what it must be.
#[derive(Clone, Debug)]
pub struct Archive {
    pub kind: DatasetKind,
    pub url: String,
    /// The archive's file name in `--data-dir`.
    pub file_name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// The binary versions published at <https://www.cs.toronto.edu/~kriz/cifar.html>. The site lists
/// their MD5 digests (`c32a1d4ab5d03f1284b67883e8d87530`, `03b5dce01913d631647c71ecec9e9cb8`);
/// the SHA-256 digests and sizes pinned here are those that independent projects record for the
/// same files.
pub fn official(kind: DatasetKind) -> Option<Archive> {
    let (name, size, sha256) = match kind {
        DatasetKind::Cifar10 => {
            ("cifar-10-binary.tar.gz", 170_052_171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")
        }
        DatasetKind::Cifar100 => {
            ("cifar-100-binary.tar.gz", 168_513_733, "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec")
        }
        _ => return None,
    };
    Some(Archive {
        kind,
        url: format!("https://www.cs.toronto.edu/~kriz/{name}"),
        file_name: name.to_string(),
        size,
        sha256: sha256.to_string(),
    })
}

/// Where the archive comes from.
pub enum Source {
    /// Downloaded from this URL (the official one unless `--url` says otherwise; the pinned
    /// digest applies either way).
    Download(String),
    /// A copy the user already has.
    Local(PathBuf),
}

/// What a fetch did, for the summary and `--json`.
#[derive(Debug, Serialize)]
pub struct Fetched {
    pub dataset: &'static str,
    pub data_dir: PathBuf,
    pub archive: PathBuf,
    /// Whether the archive was downloaded in this run (not already in `--data-dir`, not `--archive`).
    pub downloaded: bool,
    pub archive_bytes: u64,
    pub sha256: String,
    /// The files unpacked, under `data_dir`.
    pub files: Vec<PathBuf>,
    pub train_examples: usize,
    pub test_examples: usize,
}

/// Fetches `archive` into `dir`: reuses a verified copy already there, else downloads or copies
/// from `source`; then unpacks its members and loads them once to prove they parse.
pub fn fetch(archive: &Archive, source: Source, dir: &Path, show_progress: bool) -> Result<Fetched> {
    fs::create_dir_all(dir).with_context(|| format!("creating the data folder {}", dir.display()))?;
    let in_dir = dir.join(&archive.file_name);
    let (path, downloaded) = match source {
        Source::Local(path) => {
            check_file(archive, &path, show_progress)?;
            (path, false)
        }
        Source::Download(url) => {
            // A copy from an earlier run is kept only if it is the right file.
            if in_dir.is_file() && check_file(archive, &in_dir, show_progress).is_ok() {
                (in_dir, false)
            } else {
                download(archive, &url, &in_dir, show_progress)?;
                (in_dir, true)
            }
        }
    };
    let files = unpack(archive, &path, dir)?;
    let splits = trustsplit_data::load(archive.kind, Some(dir))
        .with_context(|| format!("the unpacked {} files do not load", archive.kind.name()))?;
    Ok(Fetched {
        dataset: archive.kind.name(),
        data_dir: dir.to_path_buf(),
        archive: path,
        downloaded,
        archive_bytes: archive.size,
        sha256: archive.sha256.clone(),
        files,
        train_examples: splits.train.len(),
        test_examples: splits.test.len(),
    })
}

/// A running SHA-256 and byte count of what has been read of an archive, refusing more than its
/// size.
struct Hashing<'a> {
    archive: &'a Archive,
    hasher: Sha256,
    total: u64,
}

impl<'a> Hashing<'a> {
    fn new(archive: &'a Archive) -> Self {
        Hashing { archive, hasher: Sha256::new(), total: 0 }
    }

    /// Reads `reader` to its end, hashing and copying into `out` (if any). `what` names the
    /// source in errors.
    fn read_from(
        &mut self,
        mut reader: impl Read,
        mut out: Option<&mut dyn Write>,
        what: &str,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {what} after {} bytes", self.total)),
            };
            self.total += n as u64;
            if self.total > self.archive.size {
                bail!("{what} is longer than the {} bytes {} has", self.archive.size, self.archive.file_name);
            }
            self.hasher.update(&buffer[..n]);
            if let Some(out) = out.as_mut() {
                out.write_all(&buffer[..n]).with_context(|| format!("writing {what}"))?;
            }
            bar.set_position(self.total);
        }
    }

    /// The byte count and the digest.
    fn finish(self) -> (u64, String) {
        (self.total, hex(&self.hasher.finalize()))
    }
}

/// Checks a file against the archive's size and digest.
fn check_file(archive: &Archive, path: &Path, show_progress: bool) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let what = path.display().to_string();
    let bar = progress::bytes_bar(archive.size, "checking", show_progress);
    let mut hashing = Hashing::new(archive);
    hashing.read_from(BufReader::new(file), None, &what, &bar)?;
    bar.finish_and_clear();
    let (size, digest) = hashing.finish();
    verify(archive, &what, size, &digest)
}

fn verify(archive: &Archive, what: &str, size: u64, digest: &str) -> Result<()> {
    if size != archive.size {
        bail!("{what} has {size} bytes; {} has {} (truncated or a different file)", archive.file_name, archive.size);
    }
    if digest != archive.sha256 {
        bail!(
            "{what} has SHA-256 {digest}; {} has {} (corrupt, or not the published file)",
            archive.file_name,
            archive.sha256
        );
    }
    Ok(())
}

/// Downloads `url` to `to` through a hidden partial file, renamed once size and digest match. A
/// download cut short leaves the partial file, and the next run asks only for the rest (an HTTP
/// range request; a server that ignores it sends the whole file again). The digest covers the
/// whole file either way, so a wrong partial file is found and removed at the end.
fn download(archive: &Archive, url: &str, to: &Path, show_progress: bool) -> Result<()> {
    let offline_hint = |e: ureq::Error| {
        anyhow::anyhow!(
            "could not download {url}: {e}. Without internet access, fetch {} ({} bytes, SHA-256 {}) on another \
             machine and run `trustsplit data fetch {} --archive FILE`",
            archive.file_name,
            archive.size,
            archive.sha256,
            archive.kind.name()
        )
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_recv_body(Some(Duration::from_secs(3600)))
        .build()
        .into();
    let partial = partial_path(to);
    let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let have = if have < archive.size { have } else { 0 };
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let response = request.call().map_err(offline_hint)?;
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let resumed = have > 0 && response.status() == 206;
    if resumed {
        let expected = format!("bytes {have}-{}/{}", archive.size - 1, archive.size);
        let range = header("content-range").unwrap_or_default();
        if range != expected {
            let _ = fs::remove_file(&partial);
            bail!("{url} answered the request for the rest with range {range:?}, not {expected:?}");
        }
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
        if length != archive.size {
            bail!("{url} offers {length} bytes; {} has {} (a different file?)", archive.file_name, archive.size);
        }
    }
    let bar = progress::bytes_bar(archive.size, "downloading", show_progress);
    let mut hashing = Hashing::new(archive);
    let file = if resumed {
        let kept = partial.display().to_string();
        let existing = File::open(&partial).with_context(|| format!("opening {kept}"))?;
        hashing.read_from(BufReader::new(existing), None, &kept, &bar)?;
        fs::OpenOptions::new().append(true).open(&partial)
    } else {
        File::create(&partial)
    };
    let mut out = BufWriter::new(file.with_context(|| format!("opening {}", partial.display()))?);
    let body = response.into_body().into_with_config().limit(archive.size + 1).reader();
    let copied = hashing.read_from(body, Some(&mut out), url, &bar);
    bar.finish_and_clear();
    // What arrived stays on disk for the next run, unless it cannot be the file.
    let written = out.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all());
    let (size, digest) = hashing.finish();
    let result = copied
        .and_then(|()| written.with_context(|| format!("writing {}", partial.display())))
        .and_then(|()| verify(archive, url, size, &digest));
    match result {
        Ok(()) => fs::rename(&partial, to).with_context(|| format!("moving the download to {}", to.display())),
        Err(e) if size < archive.size => Err(e.context(format!(
            "the download stopped after {size} of {} bytes; they are kept in {}, and running the command again \
             fetches the rest",
            archive.size,
            partial.display()
        ))),
        Err(e) => {
            let _ = fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// `dir/.name.partial` for `dir/name`.
fn partial_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Unpacks the members the loader reads (`FOLDER/FILE` in the archive) into `dir/FOLDER/`, each
/// through a partial file; other members (the label names, a readme) are skipped. Errors if one
/// is missing, appears twice, or is not a regular file.
fn unpack(archive: &Archive, path: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let (folder, names) = trustsplit_data::archive_layout(archive.kind)
        .with_context(|| format!("{} does not come as an archive", archive.kind.name()))?;
    let target = dir.join(folder);
    fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    let mut found: Vec<Option<PathBuf>> = vec![None; names.len()];
    let what = path.display();
    for entry in tar.entries().with_context(|| format!("reading {what} as a gzip'd tar archive"))? {
        let mut entry = entry.with_context(|| format!("reading {what} as a gzip'd tar archive"))?;
        let member = entry.path().with_context(|| format!("a member name in {what}"))?.into_owned();
        // Archives made with `tar -C dir .` name their members `./FOLDER/FILE`.
        let bare = member.strip_prefix(".").unwrap_or(&member);
        let Some(index) = names.iter().position(|n| bare == Path::new(folder).join(n)) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            bail!("{what}: member {} is not a regular file", member.display());
        }
        if found[index].is_some() {
            bail!("{what}: member {} appears twice", member.display());
        }
        let out_path = target.join(names[index]);
        let partial = partial_path(&out_path);
        let written = (|| -> io::Result<()> {
            let mut out = BufWriter::new(File::create(&partial)?);
            io::copy(&mut entry, &mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        if let Err(e) = written.and_then(|()| fs::rename(&partial, &out_path)) {
            let _ = fs::remove_file(&partial);
            return Err(e).with_context(|| format!("unpacking {} to {}", member.display(), out_path.display()));
        }
        found[index] = Some(out_path);
    }
    let missing: Vec<String> =
        names.iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(n, _)| format!("{folder}/{n}")).collect();
    if !missing.is_empty() {
        bail!("{what} lacks {}", missing.join(", "));
    }
    Ok(found.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Cursor};
    use std::net::TcpListener;

    /// A gzip'd tar holding CIFAR-10-shaped members (`records` each, labels `i % 10`), a readme
    /// beside them, and none of `omit`.
    fn cifar10_like(records: usize, omit: &[&str]) -> Vec<u8> {
        let (folder, names) = trustsplit_data::archive_layout(DatasetKind::Cifar10).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut add = |name: String, data: Vec<u8>| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // The name's bytes as given (`set_path` would drop a leading `./`).
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            tar.append(&header, Cursor::new(data)).unwrap();
        };
        add(format!("{folder}/readme.html"), b"<p>not data</p>".to_vec());
        // The official archives name members without `./`; one here has it, as `tar -C` writes.
        for (f, name) in names.iter().enumerate() {
            if omit.contains(name) {
                continue;
            }
            let mut data = Vec::new();
            for i in 0..records {
                data.push(((i + f) % 10) as u8);
                data.extend((0..3072).map(|p| ((p * 7 + i * 13 + f) % 256) as u8));
            }
            add(format!("{}{folder}/{name}", if f == 0 { "./" } else { "" }), data);
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    fn test_archive(bytes: &[u8]) -> Archive {
        Archive {
            kind: DatasetKind::Cifar10,
            url: "http://unused.invalid/".into(),
            file_name: "cifar-10-binary.tar.gz".into(),
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        }
    }

    #[test]
    fn a_local_archive_is_checked_unpacked_and_loaded() {
        let bytes = cifar10_like(3, &[]);
        let archive = test_archive(&bytes);
        let tmp = tempdir();
        let copy = tmp.join("copy.tar.gz");
        fs::write(&copy, &bytes).unwrap();
        let data = tmp.join("data");
        let fetched = fetch(&archive, Source::Local(copy.clone()), &data, false).unwrap();
        assert_eq!((fetched.train_examples, fetched.test_examples), (15, 3));
        assert_eq!(fetched.files.len(), 6);
        assert!(!fetched.downloaded);
        assert!(data.join("cifar-10-batches-bin/data_batch_5.bin").is_file());
        // The readme is not unpacked, and no partial file is left behind.
        assert!(!data.join("cifar-10-batches-bin/readme.html").exists());
        let leftovers: Vec<_> = fs::read_dir(data.join("cifar-10-batches-bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // The loader the trainer uses reads the same labels back.
        let splits = trustsplit_data::load(DatasetKind::Cifar10, Some(&data)).unwrap();
        assert_eq!(splits.test.labels, vec![5, 6, 7]);
    }

    #[test]
    fn a_wrong_or_short_archive_is_refused_before_anything_is_unpacked() {
        let bytes = cifar10_like(3, &[]);
        let archive = test_archive(&bytes);
        let tmp = tempdir();
        let data = tmp.join("data");
        // One byte changed: same size, other digest.
        let mut changed = bytes.clone();
        let middle = changed.len() / 2;
        changed[middle] ^= 1;
        let copy = tmp.join("changed.tar.gz");
        fs::write(&copy, &changed).unwrap();
        let err = format!("{:#}", fetch(&archive, Source::Local(copy), &data, false).unwrap_err());
        assert!(err.contains("SHA-256") && err.contains(&archive.sha256), "{err}");
        assert!(!data.join("cifar-10-batches-bin").exists(), "unpacked despite the wrong digest");
        // Truncated.
        let short = tmp.join("short.tar.gz");
        fs::write(&short, &bytes[..bytes.len() - 10]).unwrap();
        let err = format!("{:#}", fetch(&archive, Source::Local(short), &data, false).unwrap_err());
        assert!(err.contains(&format!("{} bytes", bytes.len() - 10)) && err.contains("truncated"), "{err}");
        // Longer than the published file.
        let long = tmp.join("long.tar.gz");
        fs::write(&long, [bytes.as_slice(), b"tail"].concat()).unwrap();
        let err = format!("{:#}", fetch(&archive, Source::Local(long), &data, false).unwrap_err());
        assert!(err.contains("longer than"), "{err}");
        // Missing file.
        let err = format!("{:#}", fetch(&archive, Source::Local(tmp.join("absent")), &data, false).unwrap_err());
        assert!(err.contains("absent"), "{err}");
    }

    #[test]
    fn an_archive_without_a_member_names_it() {
        let bytes = cifar10_like(2, &["test_batch.bin"]);
        let archive = test_archive(&bytes);
        let tmp = tempdir();
        let copy = tmp.join("copy.tar.gz");
        fs::write(&copy, &bytes).unwrap();
        let err = format!("{:#}", fetch(&archive, Source::Local(copy), &tmp.join("data"), false).unwrap_err());
        assert!(err.contains("lacks cifar-10-batches-bin/test_batch.bin"), "{err}");
    }

    /// Serves `responses` (raw HTTP) to one connection each on a local port; returns its URL and
    /// the requests' heads as they arrive.
    fn serve(responses: Vec<Vec<u8>>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/cifar-10-binary.tar.gz", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for response in responses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut line, mut head) = (String::new(), String::new());
                while reader.read_line(&mut line).unwrap() > 2 {
                    head.push_str(&line);
                    line.clear();
                }
                seen.lock().unwrap().push(head.to_ascii_lowercase());
                let mut stream = stream;
                let _ = stream.write_all(&response);
            }
        });
        (url, requests)
    }

    fn ok_response(length: usize, body: &[u8]) -> Vec<u8> {
        [format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n").as_bytes(), body].concat()
    }

    #[test]
    fn downloads_are_checked_and_only_a_verified_one_is_kept() {
        let bytes = cifar10_like(2, &[]);
        let archive = test_archive(&bytes);
        let tmp = tempdir();
        let data = tmp.join("data");
        let (url, _) = serve(vec![
            // Not found.
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            // Announces another size.
            ok_response(bytes.len() + 1, &bytes),
            // Drops the connection half way.
            ok_response(bytes.len(), &bytes[..bytes.len() / 2]),
            // Right size, wrong bytes.
            ok_response(bytes.len(), &vec![7u8; bytes.len()]),
            // The file.
            ok_response(bytes.len(), &bytes),
        ]);
        let attempt = || fetch(&archive, Source::Download(url.clone()), &data, false).map_err(|e| format!("{e:#}"));
        let err = attempt().unwrap_err();
        assert!(err.contains("404") && err.contains("--archive FILE"), "{err}");
        let err = attempt().unwrap_err();
        assert!(err.contains(&format!("offers {} bytes", bytes.len() + 1)), "{err}");
        let err = attempt().unwrap_err();
        assert!(err.contains(&url), "{err}");
        let err = attempt().unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        assert!(
            !data.join("cifar-10-binary.tar.gz").exists() && !data.join(".cifar-10-binary.tar.gz.partial").exists()
        );
        let fetched = attempt().unwrap();
        assert!(fetched.downloaded);
        assert_eq!(fs::read(data.join("cifar-10-binary.tar.gz")).unwrap(), bytes);
        assert_eq!((fetched.train_examples, fetched.test_examples), (10, 2));
        // A second run finds the verified archive and does not download again (the server is gone).
        let again = attempt().unwrap();
        assert!(!again.downloaded);
    }

    #[test]
    fn a_cut_download_is_resumed_from_where_it_stopped() {
        let bytes = cifar10_like(2, &[]);
        let archive = test_archive(&bytes);
        let tmp = tempdir();
        let data = tmp.join("data");
        let cut = bytes.len() / 3;
        let rest = |from: usize, body: &[u8]| {
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\
                 Connection: close\r\n\r\n",
                body.len(),
                bytes.len() - 1,
                bytes.len()
            );
            [head.as_bytes(), body].concat()
        };
        let (url, requests) = serve(vec![
            ok_response(bytes.len(), &bytes[..cut]),
            rest(cut, &bytes[cut..]),
            // Cut again, then a range that does not start where the kept part ends.
            ok_response(bytes.len(), &bytes[..cut]),
            rest(cut + 1, &bytes[cut + 1..]),
        ]);
        let attempt = || fetch(&archive, Source::Download(url.clone()), &data, false).map_err(|e| format!("{e:#}"));
        let err = attempt().unwrap_err();
        assert!(err.contains(&format!("stopped after {cut} of {} bytes", bytes.len())), "{err}");
        assert_eq!(fs::metadata(data.join(".cifar-10-binary.tar.gz.partial")).unwrap().len(), cut as u64);
        let fetched = attempt().unwrap();
        assert!(fetched.downloaded);
        assert_eq!(fs::read(data.join("cifar-10-binary.tar.gz")).unwrap(), bytes);
        assert!(!requests.lock().unwrap()[0].contains("range:"));
        assert!(requests.lock().unwrap()[1].contains(&format!("range: bytes={cut}-")), "{:?}", requests);
        // A fresh start: the verified archive is moved away so that it is downloaded again.
        fs::remove_file(data.join("cifar-10-binary.tar.gz")).unwrap();
        attempt().unwrap_err();
        let err = attempt().unwrap_err();
        assert!(err.contains("not \"bytes"), "{err}");
        assert!(
            !data.join(".cifar-10-binary.tar.gz.partial").exists(),
            "a partial file that cannot be resumed is kept"
        );
    }

    #[test]
    fn an_unreachable_server_says_how_to_proceed_offline() {
        // A port nothing listens on (bound, then closed).
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let archive = official(DatasetKind::Cifar10).unwrap();
        let tmp = tempdir();
        let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
        let err = format!("{:#}", fetch(&archive, Source::Download(url.clone()), &tmp, false).unwrap_err());
        assert!(err.contains(&format!("could not download {url}")), "{err}");
        assert!(err.contains("--archive FILE") && err.contains(&archive.sha256), "{err}");
    }

    #[test]
    fn the_pins_are_well_formed() {
        for kind in [DatasetKind::Cifar10, DatasetKind::Cifar100] {
            let a = official(kind).unwrap();
            assert_eq!(a.sha256.len(), 64);
            assert!(a.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            assert!(a.url.starts_with("https://") && a.url.ends_with(&a.file_name));
        }
        assert!(official(DatasetKind::Mnist).is_none());
    }

    /// A fresh folder, removed when dropped.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir() -> Scratch {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "trustsplit-fetch-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}
