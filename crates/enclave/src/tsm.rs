//! TDX quotes from inside an Intel TDX confidential VM, through Linux's configfs-tsm interface
//! (Linux 6.7 and later; the kernel ABI is `Documentation/ABI/testing/configfs-tsm-report`).
//!
//! A quote is made in a report entry of its own: `mkdir /sys/kernel/config/tsm/report/NAME`
//! creates it; its `provider` names the TEE (`tdx_guest` for TDX); writing the 64 report-data bytes
//! to `inblob` asks for a quote, which `outblob` then returns (the host must run a quote
//! generation service). The kernel counts every write to the entry in `generation`, so reading it
//! before and after tells whether anyone else wrote to the entry in between; a quote over someone
//! else's report data would bind the wrong key, so it is refused. The entry is removed afterwards.
//!
//! Untested on hardware: this project's machines have no TDX. The tests drive the provider
//! against an imitation of the kernel's entry semantics.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::attestation::{AttestationError, AttestationProvider, Quote, QuoteKind};

/// Where configfs-tsm's report entries are made.
pub const REPORTS: &str = "/sys/kernel/config/tsm/report";

/// The file operations a quote takes, so that tests can stand in for the kernel.
pub trait ReportFs: Send + Sync {
    fn create_dir(&self, path: &Path) -> std::io::Result<()>;
    fn remove_dir(&self, path: &Path) -> std::io::Result<()>;
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
}

/// The real file system.
pub struct Os;

impl ReportFs for Os {
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(path, bytes)
    }
}

/// TDX DCAP quotes through configfs-tsm. The data owner verifies them with
/// [`DcapVerifier`](crate::attestation::DcapVerifier), as SGX quotes.
pub struct ConfigfsTsmProvider<F: ReportFs = Os> {
    fs: F,
    reports: PathBuf,
    /// Numbers this process's report entries.
    next: AtomicU64,
}

impl ConfigfsTsmProvider {
    /// The provider at [`REPORTS`]; fails with [`AttestationError::Unavailable`] where it is
    /// missing (not a confidential VM, Linux before 6.7, or configfs not mounted).
    pub fn new() -> Result<ConfigfsTsmProvider, AttestationError> {
        ConfigfsTsmProvider::with(Os, REPORTS)
    }
}

impl<F: ReportFs> ConfigfsTsmProvider<F> {
    /// The provider making its entries under `reports` through `fs`.
    pub fn with(fs: F, reports: impl Into<PathBuf>) -> Result<ConfigfsTsmProvider<F>, AttestationError> {
        let reports = reports.into();
        if !reports.is_dir() {
            return Err(AttestationError::Unavailable(format!(
                "{} does not exist: not a TDX confidential VM, a kernel before Linux 6.7, or configfs not \
                 mounted (mount -t configfs none /sys/kernel/config)",
                reports.display()
            )));
        }
        Ok(ConfigfsTsmProvider { fs, reports, next: AtomicU64::new(0) })
    }

    fn quote_in(&self, entry: &Path, report_data: [u8; 64]) -> Result<Quote, AttestationError> {
        let io = |path: PathBuf| move |source| AttestationError::Io { path, source };
        let read = |name: &str| {
            let path = entry.join(name);
            self.fs.read(&path).map_err(io(path))
        };
        let text = |name: &str| read(name).map(|b| String::from_utf8_lossy(&b).trim().to_string());
        let provider = text("provider")?;
        if !provider.starts_with("tdx") {
            return Err(AttestationError::Unavailable(format!(
                "configfs-tsm's provider is {provider:?}: only TDX quotes (tdx_guest) are supported"
            )));
        }
        let generation = |value: String| {
            value.parse::<u64>().map_err(|_| {
                AttestationError::Unavailable(format!("{}: generation {value:?} is not a number", entry.display()))
            })
        };
        let before = generation(text("generation")?)?;
        let inblob = entry.join("inblob");
        self.fs.write(&inblob, &report_data).map_err(io(inblob))?;
        let bytes = read("outblob")?;
        let after = generation(text("generation")?)?;
        if before.checked_add(1) != Some(after) {
            return Err(AttestationError::Unavailable(format!(
                "{}: {} writes where this process made one (generation {before} -> {after}); another process \
                 used the entry, so the quote may not be over this report data",
                entry.display(),
                after.wrapping_sub(before)
            )));
        }
        if bytes.is_empty() {
            return Err(AttestationError::Unavailable(format!(
                "{}: empty quote (is the host's quote generation service running?)",
                entry.display()
            )));
        }
        Ok(Quote { bytes, kind: QuoteKind::TdxDcap })
    }
}

impl<F: ReportFs> AttestationProvider for ConfigfsTsmProvider<F> {
    fn kind(&self) -> QuoteKind {
        QuoteKind::TdxDcap
    }

    fn quote(&self, report_data: [u8; 64]) -> Result<Quote, AttestationError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = self.reports.join(format!("trustsplit-{}-{n}", std::process::id()));
        self.fs.create_dir(&entry).map_err(|source| AttestationError::Io { path: entry.clone(), source })?;
        let quote = self.quote_in(&entry, report_data);
        // The entry is this process's alone; a failure to remove it does not affect the quote.
        let _ = self.fs.remove_dir(&entry);
        quote
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An imitation of configfs-tsm: a created entry has a provider and a generation; a write to
    /// `inblob` counts in the generation (and `meddle` more writes from another process), and
    /// `outblob` is a quote made from the last `inblob` (empty where the host runs no quote
    /// service: `quote_prefix` None).
    struct FakeTsm {
        provider: &'static str,
        meddle: u64,
        quote_prefix: Option<&'static [u8]>,
        files: Mutex<HashMap<PathBuf, Vec<u8>>>,
        removed: Mutex<Vec<PathBuf>>,
    }

    impl FakeTsm {
        fn new(provider: &'static str, meddle: u64, quote_prefix: Option<&'static [u8]>) -> FakeTsm {
            FakeTsm { provider, meddle, quote_prefix, files: Mutex::default(), removed: Mutex::default() }
        }
    }

    impl ReportFs for FakeTsm {
        fn create_dir(&self, path: &Path) -> std::io::Result<()> {
            let mut files = self.files.lock().unwrap();
            files.insert(path.join("provider"), format!("{}\n", self.provider).into_bytes());
            files.insert(path.join("generation"), b"7\n".to_vec());
            Ok(())
        }
        fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
            self.removed.lock().unwrap().push(path.to_path_buf());
            Ok(())
        }
        fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
            let files = self.files.lock().unwrap();
            if path.ends_with("outblob") {
                let inblob = files.get(&path.with_file_name("inblob")).cloned().unwrap_or_default();
                return Ok(self.quote_prefix.map(|prefix| [prefix, &inblob].concat()).unwrap_or_default());
            }
            files.get(path).cloned().ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
            let mut files = self.files.lock().unwrap();
            files.insert(path.to_path_buf(), bytes.to_vec());
            let generation = path.with_file_name("generation");
            let value: u64 = String::from_utf8_lossy(&files[&generation]).trim().parse().unwrap();
            files.insert(generation, format!("{}\n", value + 1 + self.meddle).into_bytes());
            Ok(())
        }
    }

    fn provider(fake: FakeTsm) -> ConfigfsTsmProvider<FakeTsm> {
        ConfigfsTsmProvider::with(fake, std::env::temp_dir()).unwrap()
    }

    #[test]
    fn a_quote_is_made_in_an_entry_of_its_own_over_the_report_data() {
        let p = provider(FakeTsm::new("tdx_guest", 0, Some(b"QUOTE:")));
        assert_eq!(p.kind(), QuoteKind::TdxDcap);
        let data: [u8; 64] = std::array::from_fn(|i| (i * 3) as u8);
        let q = p.quote(data).unwrap();
        assert_eq!(q.kind, QuoteKind::TdxDcap);
        assert_eq!(q.bytes, [b"QUOTE:".as_slice(), &data].concat());
        let again = p.quote([1; 64]).unwrap();
        assert_eq!(&again.bytes[6..], &[1; 64]);
        // Two entries, each removed after its quote.
        let removed = p.fs.removed.lock().unwrap().clone();
        assert_eq!(removed.len(), 2);
        assert_ne!(removed[0], removed[1]);
        assert!(removed[0].starts_with(std::env::temp_dir()));
    }

    #[test]
    fn another_writer_or_another_tee_is_refused() {
        let err = provider(FakeTsm::new("tdx_guest", 1, Some(b"Q"))).quote([0; 64]).unwrap_err().to_string();
        assert!(err.contains("generation 7 -> 9") && err.contains("another process"), "{err}");
        let err = provider(FakeTsm::new("sev_guest", 0, Some(b"Q"))).quote([0; 64]).unwrap_err().to_string();
        assert!(err.contains("\"sev_guest\"") && err.contains("only TDX"), "{err}");
        let err = provider(FakeTsm::new("tdx_guest", 0, None)).quote([0; 64]).unwrap_err().to_string();
        assert!(err.contains("empty quote") && err.contains("quote generation service"), "{err}");
    }

    #[test]
    fn outside_a_confidential_vm_it_is_unavailable() {
        let missing = std::env::temp_dir().join(format!("trustsplit-no-tsm-{}", std::process::id()));
        let err = ConfigfsTsmProvider::with(Os, &missing).err().expect("no such directory");
        assert!(matches!(err, AttestationError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("Linux 6.7"), "{err}");
        if !Path::new(REPORTS).is_dir() {
            assert!(matches!(ConfigfsTsmProvider::new(), Err(AttestationError::Unavailable(_))));
        }
    }
}
